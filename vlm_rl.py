"""
vlm_rl: fine-tune a vision-language model (VLM) as a decision-making agent with PPO, after
"Fine-Tuning Large Vision-Language Models as Decision-Making Agents via Reinforcement Learning"
(Zhai et al., NeurIPS 2024, "RL4VLM").

The method, in the order the data flows through this file (paper step -> function):
  1. The agent sees a picture of the game and a prompt: the task, the legal actions and the
     answer format, JSON with chain-of-thought (CoT) fields first, "action" last.  build_prompt
  2. The VLM samples answers at temperature T, a batch of games at once.  generate, Runner
  3. A parser maps an answer to a legal action; an unparseable, illegal or cut-off answer
     becomes a random legal action, flagged invalid and penalised.  parse_action, Runner.step
  4. The answer's log-probability weighs the thought tokens by lambda (paper: 0.5):
         log pi(answer) = lambda * sum log p(thought tokens) + sum log p(action tokens)
     The action part starts at the token holding the start of `"action"`, found from the
     decoded text, so any tokenizer works.  action_token_mask, answer_logprob, score
  5. A value head (an MLP) reads the final hidden state of the last prompt token.  Agent, score
  6. PPO at env-step granularity, a whole answer one action: GAE over env steps, clipped
     surrogate and value losses, normalised advantages.  gae, ppo_loss, collect_rollout,
     ppo_update, train
  Before RL, a warm start (SFT) on CoT demonstrations teaches the format.  sft
  Evaluation plays held-out deals that training never sees; an invalid answer loses.  evaluate

Simplifications and differences from the paper's code (all deliberate):
  1. The default model is a tiny random-init Llava (CLIP + Llama) with a BPE tokenizer trained
     offline on the game's text, so everything runs on a CPU in minutes.
  2. The SFT demonstrator reads the state right but picks a wrong action with probability
     --demo-noise: SFT teaches format and perception, RL must learn the decisions.
  3. Old log-probs and values come from a scoring pass right after sampling (no reference
     model, no KL penalty), as in the paper's code.
  4. A constant or linearly annealed lr (paper: cosine), AdamW minibatches (paper: 1 sample x
     128 accumulation steps), grad-norm clip 1.0 (paper: 0.01), time-limit truncation
     bootstraps from V(last state) (paper: a terminal zero); PRESETS tuned per game.
  5. An answer without a parseable action counts whole as its action part (paper: a constant).
  6. With --dtype bfloat16 the frozen weights are bf16, everything trained (and its AdamW
     state) float32, matmuls under autocast; LoRA is merged in float32.

Commands (README.md has more):
  python vlm_rl.py --env numberline              # tiny model, CPU, a few minutes
  python vlm_rl.py --help                        # every setting, with the per-game presets
  python vlm_rl.py --env numberline --model llava-hf/llava-v1.6-mistral-7b-hf --device cuda \\
      --dtype bfloat16 --gradient-checkpointing --lora-rank 64 --num-envs 8 --micro-batch 4
  python vlm_rl.py --resume runs/numberline-s1   # continue a run from its last checkpoint
  torchrun --nproc_per_node 8 vlm_rl.py --env numberline --model ...   # one process per GPU
"""
import argparse
import bisect
import collections
import csv
import dataclasses
import itertools
import json
import os
import random
import re
import sys
import textwrap
import time
import typing

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import envs

ENVS = {cls.name: cls for cls in (envs.NumberLine, envs.Blackjack, envs.EZPoints, envs.Points24)}
# Held-out episode k is dealt from seed EVAL_SEED + k (the test deals results report) or
# VALID_SEED + k (validation deals, to choose settings on); training seeds stay below both.
EVAL_SEED = 10 ** 9
VALID_SEED = 2 * 10 ** 9

# --- Config: one dataclass; its fields are the command-line flags, their help the descriptions

def option(default, help, choices=None):
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})

@dataclasses.dataclass
class Config:
    env: str = option("numberline", "the game")
    model: str = option("", "a hub id or local path (default: the built-in tiny model)")
    # rollout
    num_envs: int = option(64, "environments stepped together (one generate call per step)")
    num_steps: int = option(4, "env steps per environment per PPO update")
    total_steps: int | None = option(None, "RL env steps in all (default: the game's preset)")
    temperature: float = option(0.5, "sampling temperature (paper: 0.2 for a 7B model)")
    max_new_tokens: int | None = option(None, "answer length limit (default: 48; 256 with --model)")
    no_cot: bool = option(False, "action-only prompts and demonstrations (paper's no-CoT ablation)")
    invalid_penalty: float = option(1.0, "subtracted from the reward of an invalid answer")
    # the lambda-weighted log-prob and PPO (paper values for gamma, GAE lambda, clip and epochs)
    thought_coef: float = option(0.5, "lambda: the weight of the thought tokens' log-prob")
    gamma: float = option(0.9, "discount factor")
    gae_lambda: float = option(0.95, "GAE lambda")
    clip: float = option(0.1, "PPO clip range of the probability ratio")
    epochs: int = option(4, "PPO epochs over each rollout")
    minibatch_size: int = option(64, "samples per PPO minibatch")
    micro_batch: int = option(0, "rows per forward/backward, gradients accumulate (0: all at once)")
    lr: float | None = option(None, "PPO learning rate (default: 2e-5, or 1e-4 with LoRA)")
    value_lr: float | None = option(None, "the value head's learning rate (default: --lr's)")
    lr_anneal: float = option(0.0, "the lrs fall linearly by this fraction over the run (1: to 0)")
    vf_coef: float = option(0.5, "weight of the value loss")
    value_clip: float = option(0.1, "new values stay within +-value_clip of the old (0: off)")
    ent_coef: float = option(0.0, "bonus on the entropy of the action tokens")
    max_grad_norm: float = option(1.0, "gradient-norm clip")
    # SFT warm start
    sft_steps: int | None = option(None, "SFT steps (default: the game's preset)")
    sft_batch: int = option(32, "demonstrations per SFT step")
    sft_lr: float | None = option(None, "SFT learning rate (default: 3e-4, or 1e-3 with LoRA)")
    demo_noise: float | None = option(None, "P(the demonstrator acts wrong) (default: the game's)")
    # evaluation and outputs
    eval_on: str = option("test", "held-out deals to play (choose settings on valid, report test)",
                          ["test", "valid"])
    eval_greedy: bool = option(False, "evaluations also play the deals greedily (T = 0)")
    eval_episodes: int | None = option(None, "held-out episodes an evaluation (default: preset)")
    seed: int = option(1, "random seed (also of the built-in model's tokenizer and weights)")
    save_every: int = option(1, "checkpoint every N PPO updates")
    resume: str = option("", "an --out-dir to continue from its checkpoint.safetensors")
    out_dir: str = option("", "output directory (default: runs/<env>-s<seed>)")
    # model, precision, hardware
    device: str | None = option(None, "cpu or cuda (default: cuda if available)")
    dtype: str = option("float32", "of the frozen weights and the matmuls", ["float32", "bfloat16"])
    lora_rank: int = option(0, "> 0: LoRA on every linear layer but lm_head")
    lora_alpha: float = option(16.0, "LoRA alpha (the adapters are scaled by alpha / rank)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward (saves memory)")

# Tuned for the tiny model on a 2-core CPU; any flag overrides them.
PRESETS = {
    "numberline": dict(total_steps=5120, sft_steps=400, eval_episodes=1000),
    # Blackjack's reward is noisy: bigger batches, fewer epochs, a smaller step. gamma 1: the
    # objective is the hand's outcome (0.9 would make every hit look worse). The lr anneals
    # to zero to settle close calls (16 against a 10).
    "blackjack": dict(total_steps=40960, sft_steps=1000, eval_episodes=5000, num_envs=128,
                      minibatch_size=128, epochs=2, lr=5e-5, lr_anneal=1.0, gamma=1.0,
                      temperature=0.3),
    "ezpoints": dict(total_steps=10240, sft_steps=600, eval_episodes=1000),
    # Points24 samples ~9 tokens an answer at T 0.2, so log-probs move 5x a logit: a smaller lr
    # and 2 epochs (with 4, the KL reached 2).
    "points24": dict(total_steps=20480, sft_steps=1000, eval_episodes=500, temperature=0.2,
                     epochs=2, lr=1e-5),
}

# A resumed run must keep these: its games and weights (the built-in model's come from the seed).
RESUME_MUST_MATCH = ("env", "model", "num_envs", "num_steps", "lora_rank", "lora_alpha")

def parse_config(argv=None):
    """Flags -> (Config, the checkpoint's state or None). Bad input: a one-line error."""
    parser = build_parser()
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    ckpt = None
    if given.get("resume"):  # continue a run: its own config, unless a flag overrides it
        ckpt = read_resume_state(parser, given["resume"])
        must_match = RESUME_MUST_MATCH + (() if ckpt["config"]["model"] else ("seed",))
        for k in must_match:
            saved = ckpt["config"][k]
            if given.setdefault(k, saved) != saved:
                parser.error(f"--resume {given['resume']!r}: that run has --"
                             f"{k.replace('_', '-')} {saved!r}, not {given[k]!r}")
        given = {**ckpt["config"], "out_dir": given["resume"], **given}
    env = given.get("env", Config.env)
    cfg = Config(**{**PRESETS.get(env, {}), **given})
    for k in ("total_steps", "sft_steps", "eval_episodes"):
        if getattr(cfg, k) is None:
            parser.error(f"--{k.replace('_', '-')} is needed: {env} has no preset")

    # the defaults that depend on other settings
    if cfg.lr is None:
        cfg.lr = 1e-4 if cfg.lora_rank else 2e-5
    if cfg.sft_lr is None:
        cfg.sft_lr = 1e-3 if cfg.lora_rank else 3e-4
    if cfg.value_lr is None:
        cfg.value_lr = cfg.lr
    cfg.max_new_tokens = cfg.max_new_tokens or (256 if cfg.model else 48)
    cfg.demo_noise = ENVS[env].default_noise if cfg.demo_noise is None else cfg.demo_noise
    cfg.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg.out_dir = cfg.out_dir or f"runs/{cfg.env}-s{cfg.seed}"
    error = check_config(cfg, given)
    if error:
        parser.error(error)
    cfg.minibatch_size = min(cfg.minibatch_size, cfg.num_envs * cfg.num_steps)  # presets' too
    return cfg, ckpt

def build_parser():
    presets = "\n".join(textwrap.fill(f"{env}: " + ", ".join(f"{k}={v}" for k, v in p.items()),
                                       78, initial_indent="  ", subsequent_indent="    ")
                         for env, p in PRESETS.items())
    parser = argparse.ArgumentParser(
        description="PPO fine-tuning of a vision-language model as a game-playing agent (RL4VLM).",
        epilog=f"per-game presets (a flag overrides them):\n{presets}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = lambda msg: sys.exit(f"vlm_rl.py: error: {msg}")  # one line, no usage dump
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        help = f.metadata["help"]
        if f.type is bool:
            parser.add_argument(flag, action="store_true", default=None, help=help)
            continue
        if f.default not in (None, ""):
            help += f" (default: {f.default})"
        kind = typing.get_args(f.type)[0] if typing.get_args(f.type) else f.type
        choices = sorted(ENVS) if f.name == "env" else f.metadata["choices"]
        parser.add_argument(flag, type=kind, default=None, choices=choices, help=help)
    return parser

def read_resume_state(parser, run):
    """The saved state of run directory `run`: tensors and JSON only, reading it runs no code."""
    path = os.path.join(run, "checkpoint.safetensors")
    if not os.path.isfile(path):
        pickle = os.path.exists(os.path.join(run, "checkpoint.pt"))
        hint = " (a checkpoint.pt is never loaded: unpickling can run code)" if pickle else ""
        parser.error(f"--resume {run!r}: no checkpoint.safetensors in that directory{hint}")
    try:
        with safe_open(path, "pt") as f:
            state = json.loads(f.metadata()["state"])
        [state["config"][k] for k in RESUME_MUST_MATCH + ("seed",)]
    except Exception as e:
        parser.error(f"--resume {run!r}: not a vlm_rl checkpoint ({type(e).__name__})")
    return state

def check_config(c, given):
    """The first problem with the settings, as a message, or None."""
    batch = c.num_envs * c.num_steps
    ranks = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's processes, each with its own envs
    counts = (c.num_envs, c.num_steps, c.minibatch_size, c.sft_batch, c.save_every, c.epochs)
    problems = [
        (not (0 <= c.thought_coef <= 1 and 0 <= c.lr_anneal <= 1),
         "--thought-coef, --lr-anneal must be in [0, 1]"),
        (not 0 < c.temperature <= 10, "--temperature must be in (0, 10]"),
        (not (0 < c.lr < 1 and 0 < c.sft_lr < 1 and 0 < c.value_lr < 1),
         "learning rates must be in (0, 1)"),
        (min(counts) < 1, "--num-envs, --num-steps, --minibatch-size, --sft-batch, --save-every "
                          "and --epochs must be >= 1"),
        (min(c.total_steps, c.sft_steps, c.eval_episodes, c.micro_batch, c.max_new_tokens) < 0,
         "negative count"),
        (0 < c.total_steps < batch * ranks,
         f"--total-steps {c.total_steps} is below one PPO update ({batch * ranks})"),
        (given.get("minibatch_size", 0) > batch,
         f"--minibatch-size {c.minibatch_size} is larger than {batch}"),
        (not 0 <= c.seed < 10 ** 5, "--seed must be in [0, 100000)"),  # below the eval seeds
        (not 0 <= c.demo_noise <= 1, "--demo-noise must be in [0, 1]"),
        (c.device.startswith("cuda") and not torch.cuda.is_available(),
         "--device cuda: CUDA is not available"),
    ]
    return next((message for bad, message in problems if bad), None)

# --- Prompt and parser: the task, the legal actions, the answer format (CoT first, then action)

def build_prompt(env, cot=True):
    actions = " or ".join(f'"{a}"' for a in env.action_names)
    fields = env.cot_fields + ", " if cot else ""
    return (f"{env.task} Legal actions: {actions}. Reply with JSON only: "
            f'{{{fields}"action": {actions}}}')

ACTION_RE = re.compile(r'"action"\s*:\s*"([^"\n]{0,40})"')

Parsed = collections.namedtuple("Parsed", "action action_start")

def parse_action(text, action_names):
    """Parsed(action index or None if invalid, character where `"action"` starts). The first
    `"action": "<value>"` wins; the value must be a legal action name (case and surrounding
    spaces ignored). No match: Parsed(None, 0), the whole answer counts as its action, so that
    the invalid-answer penalty reaches it at any lambda. The text is only matched, never run."""
    match = ACTION_RE.search(text[:4096])  # answers are short; bound the work on hostile text
    if match is None:
        return Parsed(None, 0)
    value = match.group(1).strip().lower()
    names = [a.lower() for a in action_names]
    return Parsed(names.index(value) if value in names else None, match.start())

# --- Rollout: one batched generate call samples every environment's answer

@dataclasses.dataclass
class Sample:
    """One observation and the answer given to it: what PPO and SFT score again later."""
    prompt: dict           # per-token prompt tensors (input_ids, ...) without their padding
    extra: dict            # the rest of the processor's output (pixels, ...), batch dim 1
    answer: torch.Tensor   # [M] the answer's token ids, ending with end-of-turn if not cut off
    action_start: int = 0  # character of the decoded answer where `"action"` starts
    action_mask: torch.Tensor | None = None  # [M] True for the action tokens (filled in later)

def sampling_kwargs(agent, temperature, max_new_tokens):
    """generate() settings that sample from exactly softmax(logits / T): no top-k (transformers'
    default is 50), no top-p, no repetition penalty. T = 0: greedy."""
    if temperature:
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        sampling = dict(do_sample=False)
    return dict(**sampling, repetition_penalty=1.0, max_new_tokens=max_new_tokens,
                suppress_tokens=agent.suppress or None, eos_token_id=agent.stop_ids,
                pad_token_id=agent.tokenizer.pad_token_id)  # batches need a pad token

@torch.no_grad()
def generate(agent, inputs, temperature, max_new_tokens):
    """One answer per prompt: 1-D token tensors, each cut after its first end-of-turn token
    (an answer without one was cut off by the length limit)."""
    with agent.autocast():
        out = agent.vlm.generate(**inputs, **sampling_kwargs(agent, temperature, max_new_tokens))
    answers = out[:, inputs["input_ids"].shape[1]:].cpu()  # [B, M]
    ends = torch.isin(answers, torch.tensor(agent.stop_ids)).int()
    lengths = torch.where(ends.any(1), ends.argmax(1) + 1, answers.shape[1])
    return [a[:n] for a, n in zip(answers, lengths.tolist())]

# what one batched step of the environments returns, a list with an entry per environment
Step = collections.namedtuple("Step", "samples rewards dones truncated successes invalid final_obs")

class Runner:
    """Steps a list of environments with the agent and resets finished episodes. Env i is first
    dealt from seed + i * stride, later from its own RNG; with fresh_seeds every deal takes the
    next seed (evaluation: episode k is always the same deal)."""

    def __init__(self, agent, env_cls, n, seed, cfg, fresh_seeds=False, stride=1):
        self.agent, self.cfg, self.temperature = agent, cfg, cfg.temperature
        self.seeds, self.fresh = itertools.count(seed, stride), fresh_seeds
        self.rng = random.Random(seed)  # the random actions that replace invalid answers
        self.envs = [env_cls() for _ in range(n)]
        self.obs = [e.reset(seed=next(self.seeds))[0] for e in self.envs]
        self.text = prompt_text(agent.processor, build_prompt(env_cls(), not cfg.no_cot))

    def step(self, idx=None):
        """Act in envs `idx` (default: all): sample answers, parse them, step the games."""
        idx = range(len(self.envs)) if idx is None else idx
        inputs = encode_prompts(self.agent, [self.obs[i] for i in idx], self.text)
        inputs = inputs.to(self.agent.device)
        answers = generate(self.agent, inputs, self.temperature, self.cfg.max_new_tokens)
        texts = self.agent.tokenizer.batch_decode(answers, skip_special_tokens=True)
        rows = []
        for j, i in enumerate(idx):
            env = self.envs[i]
            action, action_start = parse_action(texts[j], env.action_names)
            cut_off = answers[j][-1].item() not in self.agent.stop_ids
            invalid = action is None or cut_off
            if invalid:  # a random legal action is played, and the answer is penalised
                action = self.rng.randrange(len(env.action_names))
            final_obs, reward, terminated, truncated, info = env.step(action)
            done = terminated or truncated
            self.obs[i] = final_obs
            if done:
                self.obs[i] = env.reset(seed=next(self.seeds) if self.fresh else None)[0]
            rows.append((prompt_sample(inputs, j, answers[j], action_start),
                         reward - self.cfg.invalid_penalty * invalid, done,
                         truncated and not terminated, info["success"], invalid, final_obs))
        return Step(*map(list, zip(*rows)))  # a row per env -> a list per field

# --- The lambda-weighted log-prob of an answer

def action_token_mask(tokenizer, answer_ids, action_starts):
    """[B, M] bool: True for the action part, from the token that holds character
    action_starts[b] of the decoded answer on. Found by decoding prefixes (a binary search: a
    longer prefix never decodes shorter), so it needs no knowledge of token ids."""
    mask = torch.zeros(len(answer_ids), max(len(a) for a in answer_ids), dtype=torch.bool)
    for b, (ids, start) in enumerate(zip(answer_ids, action_starts)):
        ids = list(ids)

        def decodes_past_start(k):
            return len(tokenizer.decode(ids[:k + 1], skip_special_tokens=True)) > start

        first = bisect.bisect_left(range(len(ids)), True, key=decodes_past_start)
        mask[b, first:len(ids)] = True
    return mask

def answer_logprob(token_logp, action_mask, valid, thought_coef):
    """log pi = lambda * sum(thought token log-probs) + sum(action token log-probs), [B, M] ->
    [B]. torch.where, not a product: -inf at padded positions cannot become NaN."""
    weight = torch.where(action_mask, 1.0, thought_coef)
    return torch.where(valid, token_logp * weight, 0.0).sum(-1)

# what scoring a batch of answers gives: [B, M] x 3, [B]
Scored = collections.namedtuple("Scored", "token_logp entropy valid value")

def score(agent, batch, temperature):
    """One forward pass over prompt + answer: the answer tokens' log-probs under
    softmax(logits / T), their entropies, the answer mask, and the value of the prompt.
    Only the last M + 1 positions get logits: no [B, P + M, vocab] tensor for the prompt."""
    inputs, P = collate(agent, batch, agent.device)
    M = inputs["input_ids"].shape[1] - P
    if "image_grid_thw" not in inputs:  # (Qwen-VL and GLM-4V build their 3-D positions)
        # positions as generate() gives them: counted from each row's first real token
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with agent.autocast():
        out = agent.vlm(**inputs, logits_to_keep=M + 1, output_hidden_states=True)
        last_prompt_token = out.hidden_states[-1][:, P - 1]  # [B, hidden]
        value = agent.value_head(last_prompt_token).squeeze(-1).float()  # [B]
    logits = out.logits[:, -(M + 1):-1].float() / temperature  # [B, M, V]: t predicts t + 1
    logits[..., agent.suppress] = float("-inf")  # never sampled either (an empty list: no-op)
    logp = torch.log_softmax(logits, -1)
    answers = inputs["input_ids"][:, P:]  # [B, M]
    token_logp = logp.gather(-1, answers.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp.masked_fill(logp.isinf(), 0)).sum(-1)  # suppressed ids: 0
    valid = inputs["attention_mask"][:, P:].bool()  # False on the right padding
    return Scored(token_logp, entropy, valid, value)

@torch.no_grad()
def value_of(agent, images, text):
    """V(s) of observations [B]: scored with a stand-in one-token answer, only the value read."""
    inputs = encode_prompts(agent, images, text)
    end = torch.tensor(agent.stop_ids[:1])
    batch = [prompt_sample(inputs, j, end) for j in range(len(images))]
    return score(agent, batch, 1.0).value.cpu()

# --- GAE over env steps (the names follow CleanRL's ppo.py)

def gae(rewards, values, dones, next_value, gamma, gae_lambda):
    """rewards, values, dones: [S, E]; dones[t]: the episode ended at step t; next_value: [E].
    Returns (advantages, returns), both [S, E]."""
    advantages = torch.zeros_like(rewards)
    lastgaelam = 0
    for t in reversed(range(rewards.shape[0])):
        nextvalues = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        nextnonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t]
        lastgaelam = delta + gamma * gae_lambda * nextnonterminal * lastgaelam
        advantages[t] = lastgaelam
    return advantages, advantages + values

def explained_variance(values, returns):
    """1 - Var(returns - values) / Var(returns): 1 for a perfect critic, 0 for a constant one."""
    if len(returns) < 2 or returns.var() == 0:
        return float("nan")
    return (1 - (returns - values).var() / returns.var()).item()

# --- The PPO loss, on whole answers

PPOLoss = collections.namedtuple("PPOLoss", "loss pg_loss v_loss stats")

def ppo_loss(logp, old_logp, advantages, values, returns, clip, vf_coef,
             old_values=None, value_clip=0.0):
    """Clipped surrogate (Schulman et al. 2017) + value loss. With value_clip, the value loss is
    the larger of the plain and the clipped squared error (as in the paper's code)."""
    # policy loss
    logratio = logp - old_logp
    ratio = logratio.exp()
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * ratio.clamp(1 - clip, 1 + clip)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()

    # value loss
    v_loss = (values - returns) ** 2
    if value_clip:
        v_clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
        v_loss = torch.max(v_loss, (v_clipped - returns) ** 2)
    v_loss = 0.5 * v_loss.mean()

    with torch.no_grad():
        stats = {"approx_kl": ((ratio - 1) - logratio).mean().item(),
                 "clip_frac": ((ratio - 1).abs() > clip).float().mean().item()}
    return PPOLoss(pg_loss + vf_coef * v_loss, pg_loss, v_loss, stats)

# --- PPO: rollout -> GAE -> minibatch epochs

class Rollout(typing.NamedTuple):
    """num_steps x num_envs env steps, with what PPO needs of each."""
    samples: list            # [S * E] Samples, in step order
    old_logp: torch.Tensor   # [S, E] log pi(answer) when it was sampled
    values: torch.Tensor     # [S, E] V(observation)
    rewards: torch.Tensor    # [S, E] (a time limit adds gamma * V(final observation))
    dones: torch.Tensor      # [S, E] 1.0 where the episode ended
    next_value: torch.Tensor  # [E] V(the observation each env is at now)
    successes: list          # the success flag of every episode that ended
    invalid: int             # how many answers were invalid
    seconds: dict            # gen_seconds, score_seconds

@torch.no_grad()
def collect_rollout(agent, runner, cfg):
    """Step every environment cfg.num_steps times, scoring each answer right after sampling."""
    S, E = cfg.num_steps, cfg.num_envs
    agent.eval()
    rewards, dones, values, old_logp = (torch.zeros(S, E) for _ in range(4))
    samples, successes, invalid, seconds = [], [], 0, collections.Counter()
    for t in range(S):
        t0 = time.time()
        step = runner.step()
        t1 = time.time()

        # old log-probs and values, from our own scoring pass
        token_logp, _, valid, value = score(agent, step.samples, cfg.temperature)
        answers = [s.answer for s in step.samples]
        action_mask = action_token_mask(agent.tokenizer, answers,
                                        [s.action_start for s in step.samples])
        for s, mask in zip(step.samples, action_mask):
            s.action_mask = mask[:len(s.answer)]  # kept with the sample for the epochs
        action_mask = action_mask.to(valid.device)
        old_logp[t] = answer_logprob(token_logp, action_mask, valid, cfg.thought_coef).cpu()
        values[t] = value.cpu()
        rewards[t] = torch.tensor(step.rewards)
        dones[t] = torch.tensor(step.dones, dtype=torch.float)

        # a time limit is no terminal: bootstrap from the value of where the episode was cut
        cut = [j for j in range(E) if step.truncated[j]]
        if cut:
            final_obs = [step.final_obs[j] for j in cut]
            rewards[t, cut] += cfg.gamma * value_of(agent, final_obs, runner.text)

        successes += [s for s, d in zip(step.successes, step.dones) if d]
        invalid += sum(step.invalid)
        samples += step.samples
        seconds.update(gen_seconds=t1 - t0, score_seconds=time.time() - t1)
    next_value = value_of(agent, runner.obs, runner.text)
    return Rollout(samples, old_logp, values, rewards, dones, next_value, successes, invalid,
                   seconds)

def ppo_update(agent, opt, samples, old_logp, advantages, returns, old_values, cfg, update):
    """cfg.epochs passes over the rollout in shuffled minibatches; the tensors are flat [S * E].
    Returns [policy loss, value loss, entropy, approx KL, clip fraction] of every micro-batch,
    and the gradient norm of every optimizer step."""
    params = [p for group in opt.param_groups for p in group["params"]]
    agent.train()
    stats, grad_norms = [], []
    for epoch in range(cfg.epochs):
        for mb in torch.randperm(len(samples)).split(cfg.minibatch_size):
            opt.zero_grad()
            finite = True
            # gradient accumulation over micro-batches (all at once without --micro-batch)
            for part in mb.split(cfg.micro_batch or len(mb)):
                batch = [samples[i] for i in part.tolist()]
                token_logp, entropy, valid, value = score(agent, batch, cfg.temperature)
                masks = [s.action_mask for s in batch]
                action_mask = nn.utils.rnn.pad_sequence(masks, True).to(valid.device)
                logp = answer_logprob(token_logp, action_mask, valid, cfg.thought_coef)

                # policy loss and value loss
                loss, pg_loss, v_loss, loss_stats = ppo_loss(
                    logp, old_logp[part], advantages[part], value, returns[part], cfg.clip,
                    cfg.vf_coef, old_values[part], cfg.value_clip)

                # entropy bonus, on the action tokens
                entropy = torch.where(action_mask & valid, entropy, 0.0).sum(-1).mean()
                loss = loss - cfg.ent_coef * entropy

                finite = finite and torch.isfinite(loss).item()
                (loss * len(part) / len(mb)).backward()
                stats.append([pg_loss.item(), v_loss.item(), entropy.item(),
                              loss_stats["approx_kl"], loss_stats["clip_frac"]])
            # NaN/inf in log-probs or values on any rank: every rank stops before stepping
            # (one collective a minibatch, not one a micro-batch)
            if not all(gather(finite)):
                sys.exit(f"vlm_rl.py: error: non-finite loss in PPO update {update}; the last "
                         f"good checkpoint (update {update - 1}) is kept in {cfg.out_dir}")
            average_gradients(params)
            grad_norms.append(nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item())
            opt.step()
    return stats, grad_norms

def train(agent, opt, runner, cfg, state, log, save):
    """PPO updates from state["update"] + 1 on: `log` gets a metrics row after each, `save`
    checkpoints after every cfg.save_every."""
    S, E = cfg.num_steps, cfg.num_envs
    rank, ranks = world()  # each rank steps its own E envs
    updates = cfg.total_steps // (S * E * ranks)
    bar = tqdm(range(state["update"] + 1, updates + 1), desc="ppo", initial=state["update"],
               total=updates, disable=rank > 0)
    for update in bar:
        t_start = time.time()
        # linear lr annealing (CleanRL's anneal_lr), a function of the update: resumes alike
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * (1 - cfg.lr_anneal * (update - 1) / updates)

        rollout = collect_rollout(agent, runner, cfg)

        # GAE, then flatten to [S * E]
        advantages, returns = gae(rollout.rewards, rollout.values, rollout.dones,
                                  rollout.next_value, cfg.gamma, cfg.gae_lambda)
        advantages = advantages.flatten().to(agent.device)
        returns = returns.flatten().to(agent.device)
        old_logp = rollout.old_logp.flatten().to(agent.device)
        old_values = rollout.values.flatten().to(agent.device)

        # normalised advantages and the critic's explained variance, over every rank's batch
        explained_var = explained_variance(torch.cat(gather(old_values.cpu())),
                                           torch.cat(gather(returns.cpu())))
        all_advantages = torch.cat(gather(advantages.cpu()))
        if len(all_advantages) > 1:  # one advantage has no spread to normalise by
            mean, std = all_advantages.mean().item(), all_advantages.std().item()
            advantages = (advantages - mean) / (std + 1e-8)

        t_ppo = time.time()
        stats, grad_norms = ppo_update(agent, opt, rollout.samples, old_logp, advantages,
                                       returns, old_values, cfg, update)

        # one metrics row for all ranks
        successes, invalid, rank_stats = zip(*gather((rollout.successes, rollout.invalid, stats)))
        pg_loss, v_loss, entropy, approx_kl, clip_frac = np.mean(sum(rank_stats, []), 0)
        row = {"update": update, "env_steps": update * S * E * ranks,
               "train_success": np.mean(sum(successes, []) or [np.nan]),
               "invalid_rate": sum(invalid) / (S * E * ranks),
               "policy_loss": pg_loss, "value_loss": v_loss, "entropy": entropy,
               "approx_kl": approx_kl, "clip_frac": clip_frac, "explained_var": explained_var,
               "grad_norm": np.mean(grad_norms), **rollout.seconds,
               "ppo_seconds": time.time() - t_ppo, "seconds": time.time() - t_start}
        log(row)
        state["update"] = update
        if update % cfg.save_every == 0 or update == updates:
            save()
        bar.set_postfix(success=f"{row['train_success']:.2f}", ev=f"{explained_var:.2f}",
                        invalid=f"{row['invalid_rate']:.1%}", kl=f"{approx_kl:.3f}")

# --- SFT warm start: cross-entropy on the demonstrator's answers

def sft(agent, env_cls, cfg):
    """The demonstrator plays cfg.sft_batch envs; each step is one batch of (image, prompt,
    answer), and the demonstrator then acts on its own answer."""
    rank = world()[0]  # under torchrun, rank r plays its own deals
    games = [env_cls() for _ in range(cfg.sft_batch)]
    obs = [g.reset(seed=cfg.seed * 7919 + rank * cfg.sft_batch + i)[0]
           for i, g in enumerate(games)]
    text = prompt_text(agent.processor, build_prompt(games[0], not cfg.no_cot))
    rng = random.Random(cfg.seed + 100003 * rank)
    params = [p for p in agent.vlm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.sft_lr)
    agent.train()
    bar = tqdm(range(cfg.sft_steps), desc="sft", disable=rank > 0)
    for _ in bar:
        demos = [g.demo(cfg.demo_noise, rng, cot=not cfg.no_cot) for g in games]
        inputs = encode_prompts(agent, obs, text)
        end = agent.stop_ids[:1]
        answers = [a + end for a in agent.tokenizer(demos, add_special_tokens=False)["input_ids"]]
        batch = [prompt_sample(inputs, j, torch.tensor(a)) for j, a in enumerate(answers)]

        # the mean is over every answer token of the batch, accumulated over micro-batches
        opt.zero_grad()
        loss, tokens, micro = 0.0, sum(map(len, answers)), cfg.micro_batch or len(batch)
        for k in range(0, len(batch), micro):
            token_logp, _, valid, _ = score(agent, batch[k:k + micro], 1.0)
            part = -token_logp[valid].sum() / tokens
            part.backward()
            loss += part.item()
        average_gradients(params)
        opt.step()
        bar.set_postfix(loss=f"{loss:.3f}")

        for j, g in enumerate(games):  # the demonstrator acts on its own answer
            o, _, terminated, truncated, _ = g.step(parse_action(demos[j], g.action_names).action)
            obs[j] = g.reset()[0] if terminated or truncated else o

# --- Evaluation: held-out episodes; an invalid answer loses

@torch.no_grad()
def evaluate(agent, env_cls, cfg, episodes, greedy=False, watch=None):
    """Success on held-out episodes: episode k is dealt from seed EVAL_SEED + k (VALID_SEED + k
    with --eval-on valid), so every evaluation of a run plays the same deals, which training never
    sees. An episode with an invalid answer fails. Sampling uses a forked RNG: training's streams
    are untouched. "paper_success": total reward > 0 (the paper's measure). Under torchrun rank
    r plays episodes r, r + W, ... `watch(episode, picture, step, j)` sees every step."""
    agent.eval()
    rank, ranks = world()
    total = episodes
    episodes = len(range(rank, total, ranks))  # this rank's share
    n = min(2 * cfg.num_envs, episodes)  # no gradients to hold: a bigger batch fits
    devices = [agent.device] if agent.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed + 100003 * rank)
        first = (VALID_SEED if cfg.eval_on == "valid" else EVAL_SEED) + rank
        runner = Runner(agent, env_cls, n, first, cfg, fresh_seeds=True, stride=ranks)
        runner.temperature = 0.0 if greedy else cfg.temperature
        # per env: the episode it plays, its return so far, whether it gave an invalid answer
        episode, ret, bad, dealt = list(range(n)), [0.0] * n, [False] * n, n
        wins, paper_wins, invalid, steps = 0, 0, 0, 0
        bar = tqdm(total=episodes, desc="eval", leave=False, disable=rank > 0)
        active = list(range(n))
        while active:
            shown = [runner.obs[i] for i in active]
            step = runner.step(active)
            steps += len(active)
            invalid += sum(step.invalid)
            for j, i in enumerate(active):
                ret[i] += step.rewards[j]
                bad[i] = bad[i] or step.invalid[j]
                if watch:
                    watch(episode[i], shown[j], step, j)
                if step.dones[j]:
                    wins += step.successes[j] and not bad[i]
                    paper_wins += ret[i] > 0
                    # the runner has dealt env i the next seed, in this same order
                    episode[i], ret[i], bad[i] = dealt, 0.0, False
                    dealt += 1
                    bar.update(1)
            active = [i for i in range(n) if episode[i] < episodes]
        bar.close()
    wins, paper_wins, invalid, steps = map(sum, zip(*gather((wins, paper_wins, invalid, steps))))
    p = wins / total
    return {"success": p, "se": (p * (1 - p) / total) ** 0.5, "paper_success": paper_wins / total,
            "invalid_rate": invalid / max(steps, 1), "episodes": total}

def evaluations(agent, env_cls, cfg, when):
    """Held-out success, sampled at the training temperature (and greedy with --eval-greedy),
    printed; None without episodes."""
    if not cfg.eval_episodes:
        return None
    sampled = evaluate(agent, env_cls, cfg, cfg.eval_episodes)
    greedy = None
    if cfg.eval_greedy:
        greedy = evaluate(agent, env_cls, cfg, cfg.eval_episodes, greedy=True)
    if world()[0] == 0:
        also = f" (greedy {greedy['success']:.3f})" if greedy else ""
        print(f"{when}: success {sampled['success']:.3f}{also}, invalid "
              f"{sampled['invalid_rate']:.1%} ({cfg.eval_episodes} {cfg.eval_on} deals)")
    return {"sampled": sampled, "greedy": greedy}

# --- main: SFT, evaluate, PPO, evaluate; metrics.csv, checkpoints, summary.json, the model

def main(argv=None):
    cfg, ckpt = parse_config(argv)
    t_start = time.time()
    rank, ranks = init_distributed(cfg)
    metrics_path = os.path.join(cfg.out_dir, "metrics.csv")
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        open(metrics_path, "a").close()
    except OSError as e:
        sys.exit(f"vlm_rl.py: error: cannot write to --out-dir {cfg.out_dir!r}: {e.strerror}")
    for seed in (random.seed, np.random.seed, torch.manual_seed):
        seed(cfg.seed + 100003 * rank)  # under torchrun each rank samples its own episodes

    env_cls = ENVS[cfg.env]
    agent = load_agent(cfg, env_cls)
    for p in agent.parameters() if ranks > 1 else []:  # rank 0's weights everywhere (as DDP)
        dist.broadcast(p.data, 0)
    if rank == 0:
        millions = sum(p.numel() for p in agent.parameters()) / 1e6
        print(f"model: {cfg.model or 'built-in tiny Llava'} ({millions:.2f}M parameters), "
              f"env: {cfg.env}, device: {cfg.device}, dtype: {cfg.dtype}")
    policy = [p for p in agent.vlm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": policy, "initial_lr": cfg.lr},
                             {"params": agent.value_head.parameters(), "initial_lr": cfg.value_lr}],
                            lr=cfg.lr, eps=1e-5)
    runner = Runner(agent, env_cls, cfg.num_envs, cfg.seed * 1009 + rank * cfg.num_envs, cfg)
    ckpt_path = os.path.join(cfg.out_dir, "checkpoint.safetensors")

    # SFT and its evaluation, or the state of the run that is resumed
    if ckpt is None:
        t0 = time.time()
        if cfg.sft_steps:
            sft(agent, env_cls, cfg)
        t1 = time.time()
        sft_eval = evaluations(agent, env_cls, cfg, "after SFT") if cfg.total_steps else None
        state = {"config": dataclasses.asdict(cfg), "update": 0, "rows": [], "sft_eval": sft_eval,
                 "seconds": {"sft": t1 - t0, "eval_sft": time.time() - t1}}
    else:
        state = load_checkpoint(ckpt_path, agent, opt, runner)
        state["config"] = dataclasses.asdict(cfg)
        if rank == 0:
            print(f"resuming {cfg.out_dir} after PPO update {state['update']}")

    def save():
        save_checkpoint(ckpt_path, agent, opt, runner, state)

    if state["update"] == 0 and cfg.total_steps:
        save()  # the SFT'd agent: a crash during RL never repeats SFT

    # PPO, a metrics.csv row per update
    rows = state["rows"]
    with open(metrics_path if rank == 0 else os.devnull, "w", newline="") as f:
        def log(row, keep=True):
            if f.tell() == 0:
                csv.writer(f).writerow(row)  # the header: the first row's keys
            csv.DictWriter(f, fieldnames=list(row)).writerow(row)
            f.flush()
            if keep:
                rows.append(row)

        for row in rows:  # on resume: exactly the rows of the checkpoint, none twice
            log(row, keep=False)
        train(agent, opt, runner, cfg, state, log, save)

    # The model that is saved is the one evaluated: LoRA merged, trained weights cast to --dtype.
    merge_lora(agent.vlm)
    cast(agent.vlm.parameters(), agent.dtype)
    t0 = time.time()
    final = evaluations(agent, env_cls, cfg, "after RL" if rows else "evaluation")
    before = state["sft_eval"] or final  # no RL: the saved model is the SFT model

    # where the time went, by phase (RL: the sums over its updates)
    seconds = dict(state.get("seconds", {}))
    for phase in ("gen", "score", "ppo"):
        seconds[f"rl_{phase}"] = sum(row[f"{phase}_seconds"] for row in rows)
    seconds["eval_rl"] = time.time() - t0
    seconds = {k: round(v, 1) for k, v in seconds.items()}

    def sampled(e, key):
        return e and e["sampled"][key]

    summary = {"sft_success": sampled(before, "success"), "rl_success": sampled(final, "success"),
               "sft_invalid_rate": sampled(before, "invalid_rate"),
               "invalid_rate": sampled(final, "invalid_rate"), "eval_episodes": cfg.eval_episodes,
               "eval": {"sft": before, "rl": final},
               "wall_seconds": round(time.time() - t_start, 1), "seconds": seconds,
               "config": dataclasses.asdict(cfg)}
    if rank == 0:  # under torchrun every rank holds the same weights and figures
        save_model(agent, os.path.join(cfg.out_dir, "model"))
        with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(json.dumps({k: v for k, v in summary.items() if k not in ("config", "eval")}))
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary

# =================================================================================================
# What follows makes it run on any model and machine: the built-in tiny model, hub models with
# LoRA and mixed precision, each VLM family's prompt tensors, torchrun and checkpoints.
# =================================================================================================

# --- The built-in tiny VLM: a real Llava with a BPE tokenizer trained offline

def train_bpe(corpus, vocab_size, special_tokens):
    """A byte-level BPE tokenizers.Tokenizer trained on `corpus` (a list of strings)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return bpe

def build_tiny_model(env_cls, seed=0):
    """A ~0.7M-parameter LlavaForConditionalGeneration and LlavaProcessor, built without
    downloading anything; the same code path then drives hub models."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor,
                              PreTrainedTokenizerFast)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    # the tokenizer: the prompts, and the answers of the states a random player visits
    rng, env = random.Random(seed), env_cls()
    corpus = [build_prompt(env, True), build_prompt(env, False)] * 20
    for i in range(3000):
        env.reset(seed=seed * 100003 + i)
        for _ in range(rng.randint(0, 3)):
            if env.step(rng.randrange(len(env.action_names)))[2]:
                env.reset()
        corpus.append(env.demo(0.5, rng, cot=i % 4 > 0))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(corpus, 384, ["<pad>", "<s>", "</s>", "<image>"]),
        pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"})

    # the processor: an image token per 14-px patch, plus CLIP's class token
    size, patch = env_cls.image_size, 14
    image_proc = CLIPImageProcessorPil(size={"shortest_edge": size},
                                       crop_size={"height": size, "width": size},
                                       image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = LlavaProcessor(image_processor=image_proc, tokenizer=tok, patch_size=patch,
                               vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)

    # the model: CLIP 64-d and Llama 128-d, 2 layers each
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, image_size=size, patch_size=patch)
    text = LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                       num_attention_heads=4, vocab_size=len(tok), max_position_embeddings=512,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config), processor

# --- The agent: a VLM and a value head; LoRA; precision

class Agent(nn.Module):
    """The VLM policy plus a value head: an MLP on the last prompt token's final hidden state.
    `dtype` is the compute dtype (autocast); trained tensors are float32 whatever it is."""

    def __init__(self, vlm, processor, dtype=None):
        super().__init__()
        self.vlm, self.processor, self.tokenizer = vlm, processor, processor.tokenizer
        self.dtype = dtype or next(vlm.parameters()).dtype
        hidden = vlm.config.get_text_config().hidden_size
        self.value_head = nn.Sequential(nn.Linear(hidden, 256), nn.Tanh(), nn.Linear(256, 1))
        # Placeholder tokens (<image>) are never sampled (the next forward pass would find more
        # image tokens than images) nor scored. The processor's name for one can differ from the
        # model's (Gemma3): take both.
        ids = {getattr(vlm.config, f"{m}_token_{s}", None)
               for m in ("image", "video") for s in ("id", "index")}
        for name in ("image_token", "video_token"):
            if getattr(processor, name, None):
                ids.add(self.tokenizer.convert_tokens_to_ids(getattr(processor, name)))
        self.suppress = sorted(ids - {None})
        self.stop_ids = end_of_turn_ids(vlm, processor)

    @property
    def device(self):
        return next(self.parameters()).device

    def autocast(self):
        enabled = self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

def end_of_turn_ids(vlm, processor):
    """Every id that ends a reply, the one SFT teaches first. Chat models have their own (Qwen
    <|im_end|>, Gemma <end_of_turn>, Llama-3 <|eot_id|>): read from the chat template and the
    generation config."""
    tok, ids = processor.tokenizer, []
    try:  # the token the chat template writes right after an assistant reply, if a special one
        turn = [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "XQZ"}]}]
        after = processor.apply_chat_template(turn).split("XQZ", 1)[1]
        end = tok(after, add_special_tokens=False).input_ids[:1]
        special, added = set(tok.all_special_ids), tok.get_added_vocab()
        ids += [i for i in end if i in special or tok.convert_ids_to_tokens(i) in added]
    except Exception:  # no chat template (the tiny model), or one without assistant turns
        pass
    eos = vlm.generation_config.eos_token_id  # None, an id or a list of ids
    ids += (eos if isinstance(eos, list) else [eos]) + [tok.eos_token_id]
    return list(dict.fromkeys(i for i in ids if i is not None))

class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A x, with W frozen and B = 0 at the start (Hu et al. 2021).
    A and B are float32 whatever W's dtype: an update below bf16's resolution must not vanish."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        device = base.weight.device
        a = torch.randn(rank, base.in_features, device=device) / base.in_features ** 0.5
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))

    def forward(self, x):
        return self.base(x) + (x @ self.A.t() @ self.B.t()) * self.scale

    def merged(self):
        """The plain nn.Linear with the adapter folded in (in float32, then cast once)."""
        w = self.base.weight
        w.data = (w.data.float() + self.scale * (self.B @ self.A).detach().float()).to(w.dtype)
        return self.base

def add_lora(vlm, rank, alpha):
    """Adapters on every linear layer but lm_head (vision tower and projector included, as in
    the paper's code); all original weights frozen."""
    vlm.requires_grad_(False)
    head = vlm.get_output_embeddings()
    for module in list(vlm.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child is not head:
                setattr(module, name, LoRALinear(child, rank, alpha))

def merge_lora(vlm):
    for module in list(vlm.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())

UNSUPPORTED = {
    "mllama": "its 4-D cross-attention mask is not extended over answer tokens when scoring",
    "florence2": "encoder-decoder models are not scored (the log-prob assumes a decoder-only VLM)",
}

def load_agent(cfg, env_cls):
    """The VLM (frozen weights in --dtype), optional LoRA adapters, the value head; every
    trained tensor in float32. Generation is reset to plain sampling from softmax(logits / T)."""
    from transformers import GenerationConfig
    dtype = getattr(torch, cfg.dtype)
    if cfg.model:
        vlm, processor = load_hub_model(cfg.model, dtype)
    else:
        vlm, processor = build_tiny_model(env_cls, cfg.seed)
    if cfg.gradient_checkpointing:
        enable = getattr(vlm, "activation_checkpointing_enable", None)
        (enable or vlm.gradient_checkpointing_enable)()
    cast(vlm.parameters(), dtype)
    if cfg.lora_rank:
        add_lora(vlm, cfg.lora_rank, cfg.lora_alpha)
        # the tiny model's output layer is random too: frozen, it caps the logits' scale
        vlm.get_output_embeddings().requires_grad_(not cfg.model)
    agent = Agent(vlm, processor, dtype)
    # Published generation configs (top_k, repetition_penalty, ...) would change the sampled
    # distribution away from softmax(logits / T): replace the whole config (end ids read above).
    vlm.generation_config = GenerationConfig()
    head = os.path.join(cfg.model, "value_head.safetensors")
    if cfg.model and os.path.exists(head):
        agent.value_head.load_state_dict(load_file(head))
    cast([p for p in agent.parameters() if p.requires_grad], torch.float32)  # float32 masters
    return agent.to(cfg.device)

def load_hub_model(name, dtype):
    """A hub id or local directory -> (VLM, processor), or a one-line error."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    hub_logging.set_verbosity_error()  # one error line below instead of a retry log
    try:
        model_type = AutoConfig.from_pretrained(name).model_type
        if model_type in UNSUPPORTED:
            sys.exit(f"vlm_rl.py: error: {model_type} models are not supported: "
                     f"{UNSUPPORTED[model_type]}")
        vlm = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype)
        return vlm, AutoProcessor.from_pretrained(name)
    except Exception as e:  # missing path, no network, unsupported architecture...
        sys.exit(f"vlm_rl.py: error: cannot load model {name!r}: {str(e).splitlines()[0]}")

def cast(params, dtype):
    """Parameters only: buffers such as RoPE frequencies keep the dtype the model gave them."""
    for p in params:
        p.data = p.data.to(dtype)

def save_model(agent, model_dir):
    """save_pretrained (it loads with transformers alone) plus value_head.safetensors."""
    agent.vlm.save_pretrained(model_dir)
    agent.processor.save_pretrained(model_dir)
    head = {k: v.contiguous() for k, v in agent.value_head.state_dict().items()}
    save_file(head, os.path.join(model_dir, "value_head.safetensors"))

# --- Prompt tensors of every VLM family: chat templates, left padding, per-token extras

def prompt_text(processor, prompt):
    """The prompt in the model's chat template (one image, one user turn), if it has one."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}, {"type": "text", "text": prompt}]
        return processor.apply_chat_template([{"role": "user", "content": content}],
                                             add_generation_prompt=True)
    return f"{processor.image_token}\n{prompt}\n"

def encode_prompts(agent, images, text):
    """Left-padded prompt batch: one image per environment; one prompt text for all, or one each."""
    texts = [text] * len(images) if isinstance(text, str) else text
    bos = agent.tokenizer.bos_token  # a chat template that already wrote BOS must not get two
    has_bos = bool(bos) and texts[0].startswith(bos)
    return agent.processor(images=[[im] for im in images], text=texts, return_tensors="pt",
                           padding=True, padding_side="left", add_special_tokens=not has_bos)

def prompt_sample(inputs, j, answer, action_start=0):
    """A Sample of row j of a processor's prompt batch, on the CPU: the per-token tensors without
    their left padding, and the rest (pixels, image sizes, ...) with a batch dimension of 1."""
    keep = inputs["attention_mask"][j].bool()
    prompt, extra = {}, {}
    for k, v in inputs.items():
        if k in ("attention_mask", "labels"):  # collate rebuilds the mask; PaliGemma's SFT labels
            continue
        if v.shape == inputs["input_ids"].shape:
            prompt[k] = v[j][keep].cpu()
        elif k == "pixel_values" and "image_grid_thw" in inputs:
            # Qwen-VL: [patches of all images, D], one image a prompt
            extra[k] = v.split(inputs["image_grid_thw"].prod(-1).tolist())[j].cpu()
        else:
            extra[k] = v[j:j + 1].cpu()
    return Sample(prompt, extra, answer, action_start)

# Per-token processor outputs (besides input_ids, attention_mask) and the value generate() gives
# them at sampled tokens, so that scoring sees what sampling saw (a missing one: a KeyError).
ANSWER_TOKEN_FILL = {
    "mm_token_type_ids": 0,              # Qwen-VL: text (its 3-D RoPE positions come from it)
    "token_type_ids": 0,                 # Gemma3: 0 = text, as generate() repeats it
    ("paligemma", "token_type_ids"): 1,  # PaliGemma: causal suffix; 0 would join the prefix
}

def collate(agent, batch, device):
    """Join left-padded prompts and right-padded answers: (inputs with [B, P + M] tensors, P).
    Other per-token tensors are padded alike, then filled over the answer (ANSWER_TOKEN_FILL)."""
    model_type = agent.vlm.config.model_type
    P = max(len(s.prompt["input_ids"]) for s in batch)
    M = max(len(s.answer) for s in batch)
    inputs = {k: torch.zeros(len(batch), P + M, dtype=v.dtype) for k, v in batch[0].prompt.items()}
    inputs["input_ids"].fill_(agent.tokenizer.pad_token_id or 0)
    inputs["attention_mask"] = torch.zeros(len(batch), P + M, dtype=torch.long)
    for b, s in enumerate(batch):
        p, a = len(s.prompt["input_ids"]), len(s.answer)
        for k, v in s.prompt.items():
            inputs[k][b, P - p:P] = v
        inputs["input_ids"][b, P:P + a] = s.answer
        inputs["attention_mask"][b, P - p:P + a] = 1
    for k in inputs.keys() - {"input_ids", "attention_mask"}:
        key = (model_type, k) if (model_type, k) in ANSWER_TOKEN_FILL else k
        inputs[k][:, P:] = ANSWER_TOKEN_FILL[key]
    inputs = {k: v.to(device) for k, v in inputs.items()}
    for k in batch[0].extra:
        v = torch.cat([s.extra[k] for s in batch]).to(device)
        inputs[k] = v.to(agent.dtype) if v.is_floating_point() else v
    return inputs, P

# --- Data parallelism (as nanoGPT): inactive unless torchrun launched this process

def init_distributed(cfg):
    """(rank, world size) from torchrun's environment; NCCL with a GPU per local rank, or gloo."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1
    if cfg.device.startswith("cuda"):
        cfg.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(cfg.device)
    dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    return world()

def world():
    """(rank, number of processes): (0, 1) unless torchrun launched this one."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

def gather(x):
    """[x of every rank], in rank order ([x] in a single process)."""
    out = [x] * world()[1]
    if dist.is_initialized():
        dist.all_gather_object(out, x)
    return out

def average_gradients(params):
    """Each gradient -> its mean over the ranks (with LoRA only the adapters travel)."""
    for p in params if dist.is_initialized() else []:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()

# --- Checkpoints: safetensors and JSON, so that loading one runs no code

def save_checkpoint(path, agent, opt, runner, state):
    """What training changes: the trained tensors (with LoRA: adapters and value head, never the
    frozen base), AdamW's state, RNG states, games and metrics. Written to a temporary file,
    then renamed: never half a checkpoint. Rank 0 writes every rank's games and RNG states."""
    cuda_rng = agent.device.type == "cuda" and torch.cuda.get_rng_state().tolist()
    games = [{**vars(e), "rng": e.rng.getstate()} for e in runner.envs]
    ranks = gather({"envs": games, "cuda_rng": cuda_rng, "runner_rng": runner.rng.getstate(),
                    "python_rng": random.getstate(), "numpy_rng": np.random.get_state(legacy=False),
                    "torch_rng": torch.get_rng_state().tolist()})
    if world()[0] != 0:
        return
    opt_state = opt.state_dict()
    tensors = {f"param.{k}": p for k, p in agent.named_parameters() if p.requires_grad}
    for i, s in opt_state["state"].items():
        tensors.update({f"opt.{i}.{k}": v for k, v in s.items()})
    meta = {**state, "opt_groups": opt_state["param_groups"], "ranks": ranks}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path + ".tmp",
              metadata={"state": json.dumps(meta, default=np.ndarray.tolist)})
    os.replace(path + ".tmp", path)

def load_checkpoint(path, agent, opt, runner):
    """The inverse of save_checkpoint; returns the run's state (config, update, rows, evals)."""
    def as_state(s):  # a random.Random state, back from JSON lists
        return s[0], tuple(s[1]), s[2]

    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["state"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    ranks = meta.pop("ranks")
    if len(ranks) != world()[1]:
        sys.exit(f"vlm_rl.py: error: --resume: that run had {len(ranks)} process(es), "
                 f"not {world()[1]}")
    mine = ranks[world()[0]]

    # weights and optimizer
    params = {k: t[f"param.{k}"] for k, p in agent.named_parameters() if p.requires_grad}
    agent.load_state_dict(params, strict=False)
    opt_state = collections.defaultdict(dict)
    for key in (k for k in t if k.startswith("opt.")):
        _, i, name = key.split(".", 2)
        opt_state[int(i)][name] = t[key]
    opt.load_state_dict({"state": dict(opt_state), "param_groups": meta.pop("opt_groups")})

    # games and random streams
    for e, s in zip(runner.envs, mine["envs"]):
        e.rng.setstate(as_state(s.pop("rng")))
        vars(e).update(s)
    runner.obs = [e.render() for e in runner.envs]
    runner.rng.setstate(as_state(mine["runner_rng"]))
    random.setstate(as_state(mine["python_rng"]))
    np.random.set_state(mine["numpy_rng"])
    torch.set_rng_state(torch.tensor(mine["torch_rng"], dtype=torch.uint8))
    if mine["cuda_rng"] and agent.device.type == "cuda":
        torch.cuda.set_rng_state(torch.tensor(mine["cuda_rng"], dtype=torch.uint8))
    return meta

if __name__ == "__main__":
    main()
