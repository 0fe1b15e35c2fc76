"""Draw a run's learning curve: training success (moving average) vs env steps, with the held-out
evaluations.

    python scripts/curve.py runs/numberline-s1 [more run dirs]   # writes <run>/curve.png for each

Reads the run's metrics.csv and summary.json (a run still going has no summary yet: its
evaluations are left out). Pillow only, like everything else here.
"""
import argparse
import csv
import json
import os

import numpy as np
from PIL import Image, ImageDraw


def draw_curve(rows, sft_success, rl_success, path, window=10, W=640, H=400):
    """Training success (moving average over `window` updates) vs env steps, and the
    evaluations."""
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    x_max = max([r["env_steps"] for r in rows] + [1])

    def X(steps):  # env steps -> pixel column
        return 50 + (W - 60) * steps / x_max

    def Y(v):  # success rate -> pixel row
        return H - 40 - (H - 50) * v

    d.rectangle([50, 10, W - 10, H - 40], outline="black")
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        d.text((8, Y(v) - 6), f"{v:.2f}", fill="black")
    last_steps = rows[-1]["env_steps"] if rows else 0
    d.text((W - 110, H - 32), f"{last_steps:.0f} env steps", fill="black")
    evals = ((sft_success, "gray", "SFT eval", 3), (rl_success, "green", "RL eval", -14))
    for value, color, name, dy in evals:
        if value is not None:  # labels: SFT below its line, RL above, so they never overlap
            d.line([50, Y(value), W - 10, Y(value)], fill=color)
            d.text((W - 140, max(12, Y(value) + dy)), f"{name} {value:.3f}", fill=color)
    s = np.array([r["train_success"] for r in rows], dtype=float)
    windows = [s[max(0, i - window + 1):i + 1] for i in range(len(s))]
    points = [(X(r["env_steps"]), Y(np.nanmean(w)))
              for r, w in zip(rows, windows) if not np.isnan(w).all()]
    d.line(points, fill="blue", width=2)
    d.text((56, 14), "train success (blue, moving average)", fill="blue")
    img.save(path)


def read_metrics(path):
    """metrics.csv rows as {column: float}; an empty or "nan" cell is nan."""
    with open(path) as f:
        return [{k: float(v) if v not in ("", "nan") else float("nan") for k, v in r.items()}
                for r in csv.DictReader(f)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("runs", nargs="+", help="run directories (vlm_rl.py --out-dir)")
    for run in p.parse_args().runs:
        metrics = os.path.join(run, "metrics.csv")
        summary = os.path.join(run, "summary.json")
        if not os.path.isfile(metrics):
            p.error(f"{run!r}: no metrics.csv (not a vlm_rl.py run directory?)")
        rows = read_metrics(metrics)
        s = {}
        if os.path.isfile(summary):
            with open(summary) as f:
                s = json.load(f)
        rl_success = s.get("rl_success") if rows else None
        draw_curve(rows, s.get("sft_success"), rl_success, os.path.join(run, "curve.png"))
        print(os.path.join(run, "curve.png"))


if __name__ == "__main__":
    main()
