"""Rollout throughput of vlm_rl: env steps per second against the number of environments.

One env step here is what a PPO rollout does per environment and step: the batched generate
call, parsing the answer, the env step, and the scoring pass that gives the old log-probs and
values (vlm_rl.score under torch.no_grad). Every size runs on the same model, in one process,
one after another, each after one untimed warm-up step. The model gets a short SFT first, so
its answers have a realistic length (an untrained model babbles up to --max-new-tokens); the
table shows the mean answer length (a NumberLine demonstration is 27 tokens of the tiny model).

    python scripts/bench_rollout.py          # tiny model, NumberLine, 1/8/32/128 envs
    python scripts/bench_rollout.py --env blackjack --sizes 1,16,64 --steps 3
    python scripts/bench_rollout.py --device cuda --model <hub id or local dir> --sft-steps 0

Prints a Markdown table: num_envs, env steps/s, seconds per env step, speed-up over the
smallest size (1 env by default). Only vlm_rl's public functions are used: parse_config,
load_agent, sft, Runner(agent, env_cls, n, seed, cfg).step() and score(agent, samples, T).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vlm_rl  # noqa: E402


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def rollout_step(agent, runner, cfg):
    samples = runner.step().samples
    with torch.no_grad():
        vlm_rl.score(agent, samples, cfg.temperature)
    return len(samples), sum(len(s.answer) for s in samples)


def bench(agent, env_cls, cfg, n, steps, min_seconds):
    """(env steps, answer tokens, seconds) of at least `steps` rollout steps of `n` envs and at
    least `min_seconds`, after one warm-up step."""
    runner = vlm_rl.Runner(agent, env_cls, n, cfg.seed * 1009, cfg)
    rollout_step(agent, runner, cfg)  # warm-up: allocator, kernels, first-call caches
    sync(cfg.device)
    done = 0  # env steps
    tokens = 0  # answer tokens
    k = 0  # rollout steps
    t0 = time.perf_counter()
    while k < steps or time.perf_counter() - t0 < min_seconds:
        n_samples, n_tokens = rollout_step(agent, runner, cfg)
        done += n_samples
        tokens += n_tokens
        k += 1
    sync(cfg.device)
    return done, tokens, time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="numberline", choices=sorted(vlm_rl.ENVS))
    p.add_argument("--sizes", default="1,8,32,128", help="comma-separated numbers of envs")
    p.add_argument("--steps", type=int, default=4,
                   help="timed rollout steps per size, at least (default 4)")
    p.add_argument("--min-seconds", type=float, default=3.0,
                   help="timed seconds per size, at least (default 3)")
    p.add_argument("--sft-steps", type=int, default=200,
                   help="SFT steps before the benchmark (default 200)")
    p.add_argument("--sft-batch", type=int, default=8,
                   help="SFT batch (default 8: enough for the answer length)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="", help="hub id or local dir (default: vlm_rl's tiny model)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: vlm_rl's")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default torch's; 1 on a busy machine)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]

    flags = ["--env", args.env, "--device", args.device, "--sft-steps", str(args.sft_steps),
             "--sft-batch", str(args.sft_batch), "--seed", str(args.seed)]
    if args.model:
        flags += ["--model", args.model]
    if args.max_new_tokens:
        flags += ["--max-new-tokens", str(args.max_new_tokens)]
    cfg, _ = vlm_rl.parse_config(flags)
    env_cls = vlm_rl.ENVS[cfg.env]
    torch.manual_seed(cfg.seed)
    t_all = time.perf_counter()
    agent = vlm_rl.load_agent(cfg, env_cls)
    if cfg.sft_steps:
        t0 = time.perf_counter()
        vlm_rl.sft(agent, env_cls, cfg)
        print(f"SFT: {cfg.sft_steps} steps in {time.perf_counter() - t0:.1f} s", flush=True)
    agent.eval()

    rates = {}  # env steps per second
    lengths = {}  # tokens per answer
    for n in sizes:
        done, tokens, secs = bench(agent, env_cls, cfg, n, args.steps, args.min_seconds)
        rates[n] = done / secs
        lengths[n] = tokens / done
        print(f"{n} envs: {done} env steps in {secs:.2f} s = {rates[n]:.1f} env steps/s, "
              f"{lengths[n]:.1f} tokens/answer", flush=True)

    base = rates[sizes[0]]
    device = cfg.device
    if args.device == "cpu":
        device += f" ({torch.get_num_threads()} threads)"
    print(f"\nRollout throughput (generate + parse + env step + scoring pass), env {cfg.env}, "
          f"model {cfg.model or 'built-in tiny Llava'}, device {device}, "
          f"temperature {cfg.temperature}, max new tokens {cfg.max_new_tokens}, "
          f"SFT {cfg.sft_steps} steps x {cfg.sft_batch}, at least {args.steps} timed rollout "
          f"steps and {args.min_seconds:g} s per size, after 1 warm-up; "
          f"total {time.perf_counter() - t_all:.0f} s\n")
    smallest = f"{sizes[0]} env{'s' * (sizes[0] > 1)}"
    print(f"| num_envs | env steps/s | seconds per env step | speed-up over {smallest} "
          "| tokens/answer |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n in sizes:
        print(f"| {n} | {rates[n]:.1f} | {1 / rates[n]:.4f} | {rates[n] / base:.1f}x "
              f"| {lengths[n]:.1f} |")
    best = max(sizes, key=rates.get)
    print(f"\nbest: {best} envs, {rates[best] / base:.1f}x over {sizes[0]}", flush=True)
    return rates


if __name__ == "__main__":
    main()
