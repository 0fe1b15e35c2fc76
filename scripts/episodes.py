"""The episode viewer: a GIF of a saved agent playing held-out episodes, a frame per step with the
picture, the agent's answer and what happened. The episodes are the first held-out deals that
vlm_rl.py's evaluation plays (seed EVAL_SEED + k), sampled at the training temperature.

    python scripts/episodes.py runs/numberline-s1 --episodes 4 --out assets/episodes.gif
    python scripts/episodes.py runs/blackjack-s1 --greedy

The first frame also goes to a PNG beside the GIF (the README shows one).
"""
import argparse
import collections
import json
import os
import sys
import textwrap

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vlm_rl  # noqa: E402


def draw_frame(picture, answer, caption, width=480):
    """The game picture enlarged, the agent's answer wrapped, and what happened."""
    img = Image.new("RGB", (width, 400), "white")
    img.paste(picture.resize((200, 200), Image.NEAREST), ((width - 200) // 2, 6))
    lines = textwrap.wrap(answer, 62, max_lines=8, placeholder=" ...") or ["(an empty answer)"]
    lines += [""] + textwrap.wrap(caption, 62)
    font = ImageFont.load_default(size=13)
    ImageDraw.Draw(img).multiline_text((8, 214), "\n".join(lines), fill="black", font=font)
    return img


def record(agent, env_cls, cfg, episodes, greedy=False):
    """{episode: [frames]} of the first `episodes` held-out episodes."""
    frames = collections.defaultdict(list)
    returns = collections.defaultdict(float)

    def watch(episode, picture, step, j):
        returns[episode] += step.rewards[j]
        text = agent.tokenizer.decode(step.samples[j].answer, skip_special_tokens=True)
        what = "INVALID answer, a random action played; " if step.invalid[j] else ""
        caption = (f"episode {episode + 1}, step {len(frames[episode]) + 1}: {what}"
                   f"reward {step.rewards[j]:+g}, return {returns[episode]:+g}")
        frames[episode].append(draw_frame(picture, text, caption))

    vlm_rl.evaluate(agent, env_cls, cfg, episodes, greedy=greedy, watch=watch)
    return frames


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a vlm_rl.py --out-dir (its model/ and summary.json are read)")
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--greedy", action="store_true", help="greedy answers instead of sampled")
    p.add_argument("--out", default="", help="the GIF (default: <run>/episodes.gif)")
    args = p.parse_args(argv)
    summary = os.path.join(args.run, "summary.json")
    if not os.path.isfile(summary):
        p.error(f"{args.run!r}: no summary.json (not a finished vlm_rl.py run?)")
    saved = json.load(open(summary))["config"]
    cfg, _ = vlm_rl.parse_config(["--env", saved["env"], "--model", os.path.join(args.run, "model"),
                                  "--temperature", str(saved["temperature"]),
                                  "--max-new-tokens", str(saved["max_new_tokens"]),
                                  "--seed", str(saved["seed"]), "--num-envs", str(args.episodes)]
                                 + ["--no-cot"] * saved["no_cot"])
    env_cls = vlm_rl.ENVS[cfg.env]
    agent = vlm_rl.load_agent(cfg, env_cls)
    frames = record(agent, env_cls, cfg, args.episodes, args.greedy)
    frames = [f for k in sorted(frames) for f in frames[k]]
    out = args.out or os.path.join(args.run, "episodes.gif")
    frames[0].save(out, save_all=True, append_images=frames[1:], duration=1500, loop=0)
    frames[0].save(out[:-4] + ".png")
    print(f"{out}: {len(frames)} frames")


if __name__ == "__main__":
    main()
