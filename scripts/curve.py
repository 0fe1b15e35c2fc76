"""Draw a run's learning curve: training success (moving average) vs env steps, with the held-out evaluations.

    python scripts/curve.py runs/numberline-s1 [more run dirs]   # writes <run>/curve.png for each

Reads the run's metrics.csv and summary.json (a run still going has no summary yet: its evaluations are left out).
Pillow only, like everything else here.
"""
import argparse
import csv
import json
import os

import numpy as np
from PIL import Image, ImageDraw


def draw_curve(rows, sft_success, rl_success, path, window=10, W=640, H=400):
    """Training success (moving average over `window` updates) vs env steps, and the evaluations."""
    d = ImageDraw.Draw(img := Image.new("RGB", (W, H), "white"))
    X = lambda s: 50 + (W - 60) * s / max([r["env_steps"] for r in rows] + [1])
    Y = lambda v: H - 40 - (H - 50) * v
    d.rectangle([50, 10, W - 10, H - 40], outline="black")
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        d.text((8, Y(v) - 6), f"{v:.2f}", fill="black")
    d.text((W - 110, H - 32), f"{rows[-1]['env_steps'] if rows else 0:.0f} env steps", fill="black")
    for value, color, name, dy in ((sft_success, "gray", "SFT eval", 3), (rl_success, "green", "RL eval", -14)):
        if value is not None:  # labels: SFT below its line, RL above, so they never overlap
            d.line([50, Y(value), W - 10, Y(value)], fill=color)
            d.text((W - 140, max(12, Y(value) + dy)), f"{name} {value:.3f}", fill=color)
    s = np.array([r["train_success"] for r in rows], dtype=float)
    windows = [s[max(0, i - window + 1):i + 1] for i in range(len(s))]
    d.line([(X(r["env_steps"]), Y(np.nanmean(w))) for r, w in zip(rows, windows) if not np.isnan(w).all()],
           fill="blue", width=2)
    d.text((56, 14), "train success (blue, moving average)", fill="blue")
    img.save(path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run directories (vlm_rl.py --out-dir)")
    for run in p.parse_args().runs:
        metrics, summary = os.path.join(run, "metrics.csv"), os.path.join(run, "summary.json")
        if not os.path.isfile(metrics):
            p.error(f"{run!r}: no metrics.csv (not a vlm_rl.py run directory?)")
        with open(metrics) as f:
            rows = [{k: float(v) if v not in ("", "nan") else float("nan") for k, v in r.items()} for r in csv.DictReader(f)]
        s = json.load(open(summary)) if os.path.isfile(summary) else {}
        draw_curve(rows, s.get("sft_success"), s.get("rl_success") if rows else None, os.path.join(run, "curve.png"))
        print(os.path.join(run, "curve.png"))


if __name__ == "__main__":
    main()
