"""How close a trained NumberLine critic comes to the true values of its policy.

For a policy that walks straight to the target, the value of a state at distance d is
gamma ** (d - 1): d - 1 steps of reward 0, then 1 on reaching it. This reads the saved value head
of a run on every NumberLine state (current != target, 30 of them) and prints both, with the
explained variance of the head over those states.

    python scripts/critic_check.py runs/numberline-s1
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vlm_rl  # noqa: E402
from envs import NumberLine  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a finished vlm_rl.py --env numberline run directory")
    args = p.parse_args(argv)
    saved = json.load(open(os.path.join(args.run, "summary.json")))["config"]
    if saved["env"] != "numberline":
        p.error(f"{args.run!r} is a {saved['env']} run, not numberline")
    cfg, _ = vlm_rl.parse_config(["--model", os.path.join(args.run, "model"),
                                  "--device", "cpu", "--seed", str(saved["seed"])])
    agent = vlm_rl.load_agent(cfg, NumberLine).eval()
    text = vlm_rl.prompt_text(agent.processor, vlm_rl.build_prompt(NumberLine(), True))
    states, images, truth = [], [], []
    for target in range(6):
        for current in range(6):
            if current == target:
                continue
            env = NumberLine()
            env.reset(seed=0)
            env.target, env.current = target, current
            states.append((current, target))
            images.append(env.render())
            truth.append(saved["gamma"] ** (abs(current - target) - 1))
    values = vlm_rl.value_of(agent, images, text)
    truth = torch.tensor(truth)
    print("| current | target | true value | value head |")
    print("| --- | --- | --- | --- |")
    for (current, target), t, v in zip(states, truth.tolist(), values.tolist()):
        print(f"| {current} | {target} | {t:.3f} | {v:.3f} |")
    ev = vlm_rl.explained_variance(values, truth)
    rmse = (values - truth).pow(2).mean().sqrt().item()
    print(f"\nexplained variance over the 30 states: {ev:.3f}; RMSE {rmse:.3f}")


if __name__ == "__main__":
    main()
