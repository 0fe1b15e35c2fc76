"""Reproduce the paper's findings across seeds: drives `vlm_rl.py` runs, then writes results.md
and plots.

Each cell is a normal run in its own directory, DIR/<group>/<setting>-s<seed>, so it can be
rerun or inspected by hand (its command is the first line of its run.log). Groups, each over
seeds 1..N:
  main         NumberLine and Blackjack, default flags: SFT only (the run's sft_* figures) vs
               SFT + RL
  cot          with and without chain of thought (--no-cot), both games; the CoT cells are
               main's runs
  lambda       NumberLine, --thought-coef 0, 0.1, 0.3, 0.5 (main's run), 0.7, 0.9, 1.0
  cards        EZPoints and Points24, default flags: SFT only vs SFT + RL
  temperature  Blackjack, --temperature 0.2, 0.3 (the default: main's run), 1.0

Commands:
  python scripts/reproduce.py                         # the full grid, 3 seeds: hours on 2 CPU cores
  python scripts/reproduce.py --only lambda --jobs 2  # one group, two runs at a time
  python scripts/reproduce.py --quick                 # tiny budgets, 1 seed (see below)
It is resumable: a run whose summary.json exists is skipped; a run with a checkpoint continues
with `vlm_rl.py --resume DIR`; anything else starts over. So after a kill, the same command
finishes the grid. --quick (14 runs of ~10 s on 2 idle cores) is a smoke test of the pipeline
(CI, tests), not a measurement: its numbers are noise. Its default --out is
runs/reproduce-quick, so it never mixes with real runs.
Writes DIR/results.md (a table per group: mean ± standard error across seeds, per-seed values
in brackets, the paper's number beside it) and DIR/<group>.png (training success vs env steps).
"""
import argparse
import csv
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

VLM_RL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vlm_rl.py")
QUICK = ["--sft-steps", "10", "--sft-batch", "8", "--total-steps", "64", "--num-envs", "8",
         "--num-steps", "4", "--epochs", "1", "--minibatch-size", "16", "--eval-episodes", "8",
         "--max-new-tokens", "40"]
LAMBDAS = ["0", "0.1", "0.3", "0.5", "0.7", "0.9", "1.0"]
NL = ["--env", "numberline"]
BJ = ["--env", "blackjack"]
# run key -> vlm_rl.py flags (besides seed, out dir)
RUNS = {
    "main/numberline": NL,
    "main/blackjack": BJ,
    "cot/numberline-nocot": NL + ["--no-cot"],
    "cot/blackjack-nocot": BJ + ["--no-cot"],
    "temperature/blackjack-t0.2": BJ + ["--temperature", "0.2"],
    "temperature/blackjack-t1.0": BJ + ["--temperature", "1.0"],
    "cards/ezpoints": ["--env", "ezpoints"],
    "cards/points24": ["--env", "points24"],
    **{f"lambda/numberline-l{v}": NL + ["--thought-coef", v] for v in LAMBDAS if v != "0.5"},
}
# the paper's λ figure, read off by eye
PAPER_LAMBDA = {"0.3": "~85–89", "0.5": "~85–89", "0.1": "~22–30", "0.7": "~22–30",
                "0.9": "~22–30"}


def lambda_run(v):
    return "main/numberline" if v == "0.5" else f"lambda/numberline-l{v}"


# group -> rows: (label, run key, "sft" or "rl" figures, the paper's number: LLaVA-1.6-7B,
# 15k env steps of RL)
GROUPS = {
    "main": [("NumberLine, SFT only", "main/numberline", "sft", "24.8"),
             ("NumberLine, SFT + RL", "main/numberline", "rl", "89.4"),
             ("Blackjack, SFT only", "main/blackjack", "sft", "23.1"),
             ("Blackjack, SFT + RL", "main/blackjack", "rl", "40.2")],
    "cot": [("NumberLine, CoT", "main/numberline", "rl", "89.4"),
            ("NumberLine, no CoT", "cot/numberline-nocot", "rl", "26.9"),
            ("Blackjack, CoT", "main/blackjack", "rl", "40.2"),
            ("Blackjack, no CoT", "cot/blackjack-nocot", "rl", "40.4")],
    "lambda": [(f"λ = {v}", lambda_run(v), "rl", PAPER_LAMBDA.get(v, "–")) for v in LAMBDAS],
    "cards": [("EZPoints, SFT only", "cards/ezpoints", "sft", "23.0"),
              ("EZPoints, SFT + RL", "cards/ezpoints", "rl", "50.0"),
              ("Points24, SFT only", "cards/points24", "sft", "2.6"),
              ("Points24, SFT + RL", "cards/points24", "rl", "2.3")],
    "temperature": [("T = 0.2", "temperature/blackjack-t0.2", "rl", "40.2 (the paper's T)"),
                    ("T = 0.3 (default)", "main/blackjack", "rl", "–"),
                    ("T = 1.0", "temperature/blackjack-t1.0", "rl", "–")],
}
NOTES = {
    "main": "Paper: LLaVA-1.6-7B; SFT only vs SFT + RL.",
    "cot": "Paper: RL without CoT, 7B model.",
    "lambda": "Paper's λ figure (NumberLine): 0.3 and 0.5 reach ~85–89%, 0.1/0.7/0.9 stay at "
              "~22–30%; its authors recommend λ in [0.2, 0.5].",
    "cards": "Paper: LLaVA-1.6-7B on its arithmetic card games; success = the formula is solved "
             "(total reward > 0).",
    "temperature": "The paper sampled at T = 0.2 (40.2% on Blackjack).",
}


def run_dir(out, key, seed):
    return os.path.join(out, f"{key}-s{seed}")


def command(out, key, seed, quick):
    """vlm_rl.py command line of one cell: a fresh run, or --resume when a checkpoint exists."""
    d = run_dir(out, key, seed)
    checkpoints = ("checkpoint.safetensors", "checkpoint.pt")
    if any(os.path.exists(os.path.join(d, f)) for f in checkpoints):
        return [sys.executable, VLM_RL, "--resume", d]
    budget = QUICK if quick else []
    return [sys.executable, VLM_RL, *RUNS.get(key, []), *budget, "--eval-greedy",
            "--seed", str(seed), "--out-dir", d]


def launch(cmd, d, threads, procs, stop):
    """Run one vlm_rl.py process, its output appended to d/run.log; returns the exit status."""
    if stop.is_set():
        return None
    os.makedirs(d, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(os.path.join(d, "run.log"), "a") as log:
        if log.tell():  # a killed run's log may end mid-line
            log.write("\n")
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        procs.add(p)
        rc = p.wait()
        procs.discard(p)
    return rc


# --- reading results ---
def load_summary(d):
    try:
        with open(os.path.join(d, "summary.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def metric(s, phase, mode, key):
    """One figure of a summary: s["eval"][phase][mode][key] when there, else the flat field
    (sampled only)."""
    evals = s.get("eval") or {}
    phase_evals = evals.get(phase) or {}
    v = (phase_evals.get(mode) or {}).get(key)
    if v is None and mode == "sampled":
        flat = {"success": f"{phase}_success",
                "invalid_rate": f"{'sft_' * (phase == 'sft')}invalid_rate"}
        v = s.get(flat.get(key))
    return v


def mean_se(values):
    """(mean, standard error = sample std / sqrt(n)) of the non-missing values; se None when
    n < 2."""
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return None, None
    m = sum(v) / len(v)
    if len(v) > 1:
        se = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1) / len(v))
    else:
        se = None
    return m, se


def cell(values, scale=100.0, digits=1):
    """'mean ± se [v1, v2, ...]' in percent (scale 100) or seconds (scale 1); '–' for a missing
    value."""
    m, se = mean_se(values)
    if m is None:
        return "–"

    def f(x):
        return "–" if x is None else f"{x * scale:.{digits}f}"

    spread = "" if se is None else " ± " + f(se)
    return f"{f(m)}{spread} [{', '.join(f(x) for x in values)}]"


def write_results(out, groups, seeds, quick):
    title = f"# Reproduction results{' (--quick: tiny budgets, numbers are noise)' * quick}"
    intro = (f"Regenerate: `python scripts/reproduce.py{' --quick' * quick} --seeds {len(seeds)} "
             f"--out {out}` (`--only GROUP` for one group; finished runs are skipped, so it only "
             "adds what is missing). Each cell: mean ± standard error across seeds [per-seed "
             f"values, seeds {', '.join(map(str, seeds))}], in %, on the run's held-out "
             "evaluation episodes. Sampled: at the training temperature; an episode with an "
             "invalid answer is a failure. Greedy: argmax answers. Paper's measure: share of "
             "episodes whose total reward is > 0 (sampled). Invalid: share of sampled answers "
             "that could not be parsed. Wall time: the run's whole process (SFT, evaluations, "
             "RL; a resumed run: its last process only). '–': not in that run's summary.json "
             "(not finished, or written by an older vlm_rl.py).")
    lines = [title, "", intro, ""]
    for g in groups:
        header = ("| setting | sampled success | greedy success | paper's measure (reward > 0) "
                  "| invalid answers | wall time (s) | paper |")
        lines += [f"## {g}", "", NOTES[g], "", header, "|" + " --- |" * 7]
        for label, key, phase, paper in GROUPS[g]:
            s = [load_summary(run_dir(out, key, seed)) or {} for seed in seeds]

            def get(mode, k):  # one figure across the seeds
                return [metric(x, phase, mode, k) for x in s]

            if phase == "rl":
                wall = cell([x.get("wall_seconds") for x in s], 1, 0)
            else:
                wall = "(the run below)"
            lines.append(f"| {label} | {cell(get('sampled', 'success'))} "
                         f"| {cell(get('greedy', 'success'))} "
                         f"| {cell(get('sampled', 'paper_success'))} "
                         f"| {cell(get('sampled', 'invalid_rate'))} | {wall} | {paper} |")
        lines += ["", f"![{g}]({g}.png)", ""]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines))


# --- plots: mean training success vs env steps, one line per setting, band = min..max over seeds
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def read_curve(d, window=10):
    """{env_steps: train_success moving average over `window` updates} of one run's
    metrics.csv."""
    try:
        with open(os.path.join(d, "metrics.csv")) as f:
            rows = [(int(r["env_steps"]), float(r["train_success"])) for r in csv.DictReader(f)]
    except (OSError, KeyError, ValueError):
        return {}
    s = np.array([v for _, v in rows])
    avg = [s[max(0, i - window + 1):i + 1] for i in range(len(s))]
    return {x: float(np.nanmean(a)) for (x, _), a in zip(rows, avg) if not np.all(np.isnan(a))}


def draw_group(out, g, seeds, W=800, H=420, L=50, B=46, R=180, T=30):
    """DIR/<group>.png: one line per setting (the mean over seeds), a translucent min..max band,
    legend at the right."""
    lines = []  # (legend label, one curve per seed) of each RL setting
    for label, key, phase, _ in GROUPS[g]:
        if phase == "rl":  # the bundled font has no Greek
            name = label.replace("λ", "lambda").replace(", SFT + RL", "")
            lines.append((name, [read_curve(run_dir(out, key, s)) for s in seeds]))
    xmax = max([x for _, cs in lines for c in cs for x in c] + [1])

    def X(steps):  # env steps -> pixel column
        return L + (W - R - L) * steps / xmax

    def Y(v):  # success rate -> pixel row
        return H - B - (H - B - T) * v

    img = Image.new("RGBA", (W, H), "white")
    font = ImageFont.load_default(size=12)
    d = ImageDraw.Draw(img)
    band_note = ", band = min..max" * (len(seeds) > 1)
    d.text((L, 8), f"{g}: training success (moving average of 10 updates) vs env steps; mean of "
                   f"{len(seeds)} seed(s){band_note}", fill="black", font=font)
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        d.line([L - 4, Y(v), L, Y(v)], fill="black")
        d.line([L, Y(v), W - R, Y(v)], fill=(230, 230, 230))
        d.text((8, Y(v) - 7), f"{v:.2f}", fill="black", font=font)
    d.rectangle([L, T, W - R, H - B], outline="black")
    for q in range(5):  # x ticks at quarters of the longest run
        x = xmax * q / 4
        d.line([X(x), H - B, X(x), H - B + 4], fill="black")
        d.text((X(x), H - B + 7), f"{x:g}", fill="black", font=font, anchor="ma")
    d.text(((L + W - R) / 2, H - 20), "env steps", fill="black", font=font, anchor="ma")
    for i, (label, curves) in enumerate(lines):
        color = COLORS[i % len(COLORS)]
        xs = sorted({x for c in curves for x in c})
        vals = [[c[x] for c in curves if x in c] for x in xs]
        if len(xs) > 1 and len(seeds) > 1:  # the band, on its own layer so it can be translucent
            layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
            upper = [(X(x), Y(max(v))) for x, v in zip(xs, vals)]
            lower = [(X(x), Y(min(v))) for x, v in zip(xs, vals)]
            ImageDraw.Draw(layer).polygon(upper + lower[::-1], fill=color + (45,))
            img.alpha_composite(layer)
        d = ImageDraw.Draw(img)
        pts = [(X(x), Y(sum(v) / len(v))) for x, v in zip(xs, vals)]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        elif pts:
            px, py = pts[0]
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        y = T + 4 + 18 * i  # legend, right of the plot
        d.rectangle([W - R + 12, y + 3, W - R + 30, y + 9], fill=color)
        d.text((W - R + 36, y), label if pts else f"{label} (no runs)", fill="black", font=font)
    img.convert("RGB").save(os.path.join(out, f"{g}.png"))


def pct(v):
    return "–" if v is None else f"{100 * v:.1f}%"


def on_sigterm(*_):
    sys.exit(143)  # a kill ends the children too (the finally in main)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--only", nargs="+", choices=list(GROUPS), default=list(GROUPS),
                   metavar="GROUP", help=f"groups to run, of {list(GROUPS)} (default: all)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 1..N (default 3; 1 with --quick)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time; each gets cores // jobs threads")
    p.add_argument("--quick", action="store_true",
                   help="tiny budgets: a smoke test of the whole pipeline")
    p.add_argument("--out", default=None,
                   help="default runs/reproduce (runs/reproduce-quick with --quick)")
    a = p.parse_args(argv)
    n_seeds = a.seeds or (1 if a.quick else 3)
    seeds = list(range(1, n_seeds + 1))
    out = a.out or ("runs/reproduce-quick" if a.quick else "runs/reproduce")
    if a.jobs < 1 or not seeds:
        p.error("--jobs and --seeds must be >= 1")
    threads = max(1, (os.cpu_count() or 1) // a.jobs)
    # every run once, though groups share some
    keys = list(dict.fromkeys(key for g in a.only for _, key, _, _ in GROUPS[g]))
    cells = [(k, s) for s in seeds for k in keys]
    todo = [(k, s) for k, s in cells if load_summary(run_dir(out, k, s)) is None]
    print(f"{len(cells)} runs in {out}: {len(cells) - len(todo)} skipped (summary.json exists), "
          f"{len(todo)} to run, {a.jobs} at a time with {threads} thread(s) each")
    procs = set()
    stop = threading.Event()
    failed = []
    t0 = time.time()
    signal.signal(signal.SIGTERM, on_sigterm)
    pool = ThreadPoolExecutor(a.jobs)
    futures = {}
    try:
        for k, s in todo:
            cmd = command(out, k, s, a.quick)
            fut = pool.submit(launch, cmd, run_dir(out, k, s), threads, procs, stop)
            futures[fut] = (k, s, "--resume" in cmd)
        for fut in tqdm(as_completed(futures), total=len(futures), desc="runs", unit="run"):
            k, s, resumed = futures[fut]
            d = run_dir(out, k, s)
            rc = fut.result()
            summary = load_summary(d) if rc == 0 else None
            if summary is None:
                failed.append(d)
                tqdm.write(f"FAILED {d} (exit status {rc}; see {d}/run.log)")
            else:
                sft = pct(metric(summary, "sft", "sampled", "success"))
                rl = pct(metric(summary, "rl", "sampled", "success"))
                tqdm.write(f"done{' (resumed)' * resumed} {d}: SFT {sft} -> RL {rl}, "
                           f"{summary.get('wall_seconds')} s")
    finally:  # on Ctrl-C or a kill: start nothing more, stop what runs (its checkpoint resumes it)
        stop.set()
        for proc in list(procs):
            proc.terminate()
        pool.shutdown(cancel_futures=True)
    # report every group with a finished run of its own in `out`, not only this call's:
    # results.md grows group by group
    groups = []
    for g in GROUPS:
        own_runs = [key for key in RUNS if key.startswith(g + "/")]
        if g in a.only or any(load_summary(run_dir(out, key, seed))
                              for key in own_runs for seed in seeds):
            groups.append(g)
    write_results(out, groups, seeds, a.quick)
    for g in groups:
        draw_group(out, g, seeds)
    print(f"wrote {os.path.join(out, 'results.md')} and {len(groups)} plot(s) "
          f"in {time.time() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
