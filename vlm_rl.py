"""
vlm_rl: fine-tune a vision-language model (VLM) as a decision-making agent with PPO,
after "Fine-Tuning Large Vision-Language Models as Decision-Making Agents via
Reinforcement Learning" (Zhai et al., NeurIPS 2024, "RL4VLM").

The method, in the order the data flows through this file:
  1. The agent sees an image of the game and a prompt: the task, the legal actions, and the
     answer format, JSON with chain-of-thought (CoT) fields first and "action" last.
  2. The VLM samples an answer at temperature T; `parse_action` maps it to a legal action
     (unparseable or illegal -> a random legal action, flagged invalid, optionally penalised).
  3. The answer's log-probability under the policy weighs the thoughts by lambda (paper: 0.5):
         log pi(answer) = lambda * sum log p(thought tokens) + sum log p(action tokens)
     where the action part starts at the token that holds the start of `"action"`, found
     from the decoded text, so it works with any tokenizer.
  4. A value head (MLP) reads the final hidden state of the last prompt token.
  5. PPO at environment-step granularity: one whole answer is one action; GAE over env
     steps; clipped surrogate + value loss with normalised advantages.
  Before RL, a supervised warm start (SFT) on CoT demonstrations teaches the format.

Simplifications (all deliberate):
  1. The default model is a tiny random-init Llava (CLIP + Llama) with a BPE tokenizer
     trained offline on the game's own text, so everything runs on a CPU in minutes.
  2. The SFT demonstrator reads the state right but picks a wrong action with probability
     `--demo-noise`, so SFT gives format and perception, and RL must learn the decisions.
  3. Time-limit truncation is treated as termination (no bootstrap from the last state).
  4. Old log-probs and values come from a scoring pass right after sampling (no reference
     model, no KL penalty), as in the paper's code.
  5. Hyperparameters are tuned for the tiny model per game (PRESETS); the paper's 7B values are
     in the comments.

Commands:
  python vlm_rl.py --env numberline          # tiny model, CPU, about 6 minutes
  python vlm_rl.py --env blackjack           # tiny model, CPU, about 17 minutes
  python vlm_rl.py --env numberline --model llava-hf/llava-v1.6-mistral-7b-hf --device cuda \
      --dtype bfloat16 --gradient-checkpointing --lora-rank 64 --num-envs 8 --minibatch-size 4 --lr 1e-5
  python vlm_rl.py --env numberline --sft-steps 0 --total-steps 0 --model runs/numberline-s1/model   # evaluate
  python vlm_rl.py --resume runs/numberline-s1   # continue a run from its last checkpoint
"""
import argparse
import csv
import dataclasses
import json
import os
import random
import re
import sys
import time

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw
from tqdm import tqdm

import envs

ENVS = {"numberline": envs.NumberLine, "blackjack": envs.Blackjack}


# --- config: one dataclass, turned into argparse flags ---
@dataclasses.dataclass
class Config:
    env: str = "numberline"        # numberline | blackjack
    model: str = ""                # "" = the built-in tiny model; else a hub id or local path
    num_envs: int = 64             # environments stepped together (one generate call per step)
    num_steps: int = 4             # env steps per environment per PPO update
    total_steps: int = 0           # RL env steps in all (per-env preset when not given)
    sft_steps: int = 0             # SFT warm-start steps (per-env preset when not given)
    sft_batch: int = 32
    sft_lr: float = 3e-4
    demo_noise: float = -1.0       # P(demonstrator picks a wrong action); <0 = the env's default
    thought_coef: float = 0.5      # lambda: weight of the thought tokens' log-prob (paper: 0.5)
    no_cot: bool = False           # action-only prompt (the paper's "no CoT" ablation)
    temperature: float = 0.5       # sampling temperature (paper: 0.2 for a 7B model)
    max_new_tokens: int = 48
    lr: float = 5e-5               # PPO learning rate (paper: 1e-5 for a 7B LoRA model)
    gamma: float = 0.9             # paper values for gamma, GAE lambda, clip, epochs
    gae_lambda: float = 0.95
    clip: float = 0.1
    epochs: int = 4
    minibatch_size: int = 64
    vf_coef: float = 0.5
    ent_coef: float = 0.0          # bonus on the entropy of the action tokens (keeps exploring)
    max_grad_norm: float = 1.0
    invalid_penalty: float = 1.0   # subtracted from the reward of an invalid answer
    eval_episodes: int = 0         # per-env preset when not given
    seed: int = 1
    save_every: int = 1            # checkpoint every N PPO updates (cheap for the tiny model)
    resume: str = ""               # an --out-dir to continue from its checkpoint.pt
    out_dir: str = ""              # default runs/<env>-s<seed>
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "float32"         # float32 | bfloat16 | float16
    lora_rank: int = 0             # > 0: train LoRA adapters on the language model (+ value head) only
    lora_alpha: float = 16.0
    gradient_checkpointing: bool = False


PRESETS = {  # tuned for the tiny model on a 2-core CPU
    "numberline": dict(total_steps=5120, sft_steps=400, eval_episodes=1000),
    # Blackjack's reward is noisy: bigger batches, fewer epochs, a smaller step; gamma 1 because the
    # objective is the undiscounted outcome of a hand (0.9 would make every hit look worse)
    "blackjack": dict(total_steps=20480, sft_steps=1000, eval_episodes=5000, num_envs=128, minibatch_size=128,
                      epochs=2, lr=5e-5, gamma=1.0, temperature=0.3),
}


def parse_config(argv=None):
    p = argparse.ArgumentParser(description="PPO fine-tuning of a VLM agent (RL4VLM).")
    p.error = lambda msg: sys.exit(f"vlm_rl.py: error: {msg}")  # one line, no usage dump
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            p.add_argument(flag, action="store_true", default=None)
        else:
            p.add_argument(flag, type=f.type, default=None, help=f"default: {f.default}")
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    ckpt = None
    if given.get("resume"):  # continue a run: its own config, unless a flag overrides it
        path = os.path.join(given["resume"], "checkpoint.pt")
        if not os.path.isfile(path):
            p.error(f"--resume {given['resume']!r}: no checkpoint.pt in that directory")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if given.setdefault("env", ckpt["config"]["env"]) != ckpt["config"]["env"]:
            p.error(f"--resume {given['resume']!r} is a {ckpt['config']['env']} run, not {given['env']}")
        given = {**ckpt["config"], "out_dir": given["resume"], **given}
    if given.get("env", Config.env) not in ENVS:
        p.error(f"unknown env {given['env']!r}; choose from {sorted(ENVS)}")
    cfg = Config(**{**PRESETS[given.get("env", Config.env)], **given})
    for bad, msg in [(not 0 <= cfg.thought_coef <= 1, "--thought-coef must be in [0, 1]"),
                     (not 0 < cfg.temperature <= 10, "--temperature must be in (0, 10]"),
                     (not 0 < cfg.lr < 1 or not 0 < cfg.sft_lr < 1, "learning rates must be in (0, 1)"),
                     (min(cfg.num_envs, cfg.num_steps, cfg.minibatch_size, cfg.sft_batch, cfg.save_every) < 1,
                      "--num-envs, --num-steps, --minibatch-size, --sft-batch and --save-every must be >= 1"),
                     (min(cfg.total_steps, cfg.sft_steps, cfg.eval_episodes) < 0, "step counts must be >= 0"),
                     (cfg.demo_noise > 1, "--demo-noise must be <= 1"),
                     (cfg.dtype not in ("float32", "bfloat16", "float16"), f"unknown --dtype {cfg.dtype!r}"),
                     (cfg.device.startswith("cuda") and not torch.cuda.is_available(),
                      f"--device {cfg.device} but CUDA is not available")]:
        if bad:
            p.error(msg)
    cfg.out_dir = cfg.out_dir or f"runs/{cfg.env}-s{cfg.seed}"
    return cfg, ckpt


# --- prompt: task, legal actions, answer format (CoT fields first, then the action) ---
def build_prompt(env, cot=True):
    actions = " or ".join(f'"{a}"' for a in env.action_names)
    fields = env.cot_fields + ", " if cot else ""
    return (f"{env.task} Legal actions: {actions}. Reply with JSON only: "
            f'{{{fields}"action": {actions}}}')


def prompt_text(processor, prompt):
    """Wrap the prompt in the model's chat template (one image, one user turn) if it has one."""
    if getattr(processor, "chat_template", None):
        msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(msg, add_generation_prompt=True)
    return f"{processor.image_token}\n{prompt}\n"


# --- parser: answer text -> legal action ---
ACTION_RE = re.compile(r'"action"\s*:\s*"([^"\n]{0,40})"')


def parse_action(text, action_names):
    """Return (action index or None if invalid, character offset where `"action"` starts).

    The first `"action": "<value>"` in the text wins; the value must equal a legal action
    name (case and surrounding spaces ignored). No match -> (None, len(text)): then every
    token counts as a thought token. The text is never evaluated, only matched.
    """
    m = ACTION_RE.search(text[:4096])  # answers are short; bound the work on hostile text
    if m is None:
        return None, len(text)
    value = m.group(1).strip().lower()
    names = [a.lower() for a in action_names]
    return (names.index(value) if value in names else None), m.start()


# --- the built-in tiny VLM: a real Llava with a BPE tokenizer trained offline ---
def build_tiny_model(env_cls, seed=0):
    """A ~0.7M-parameter LlavaForConditionalGeneration + LlavaProcessor, built without
    downloading anything; the same code path then drives hub models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor, PreTrainedTokenizerFast)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    rng, env = random.Random(seed), env_cls()
    corpus = [build_prompt(env, True), build_prompt(env, False)] * 20
    for i in range(3000):  # answers of the states a random player visits
        env.reset(seed=seed * 100003 + i)
        for _ in range(rng.randint(0, 3)):
            if env.step(rng.randrange(len(env.action_names)))[2]:
                env.reset()
        corpus.append(env.demo(0.5, rng, cot=i % 4 > 0))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<pad>", "<s>", "</s>", "<image>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  extra_special_tokens={"image_token": "<image>"})
    size, patch = env_cls.image_size, 14
    image_proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                       image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = LlavaProcessor(image_processor=image_proc, tokenizer=tok, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=size, patch_size=patch),
        text_config=LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                                vocab_size=len(tok), max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config), processor


class Agent(nn.Module):
    """The VLM policy plus a value head: an MLP on the last prompt token's final hidden state."""

    def __init__(self, vlm, processor):
        super().__init__()
        self.vlm, self.processor, self.tokenizer = vlm, processor, processor.tokenizer
        hidden = vlm.config.get_text_config().hidden_size
        self.value_head = nn.Sequential(nn.Linear(hidden, 256), nn.Tanh(), nn.Linear(256, 1))
        # Placeholder tokens (e.g. <image>) must never be sampled: the next forward pass would
        # find more image tokens than images. They are masked the same way when scoring. The
        # processor's name for one can differ from the model's (Gemma3: <start_of_image>): take both.
        ids = {getattr(vlm.config, f"{m}_token_{s}", None) for m in ("image", "video") for s in ("id", "index")}
        ids |= {self.tokenizer.convert_tokens_to_ids(getattr(processor, t)) for t in ("image_token", "video_token")
                if getattr(processor, t, None)}
        self.suppress = sorted(ids - {None})


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A x, with W frozen and B = 0 at the start (Hu et al. 2021)."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.A = nn.Parameter(torch.randn(rank, base.in_features, dtype=base.weight.dtype) / base.in_features ** 0.5)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))

    def forward(self, x):
        return self.base(x) + (x @ self.A.t() @ self.B.t()) * self.scale

    def merged(self):
        """The plain nn.Linear with the adapter folded in, for a checkpoint any transformers can load."""
        self.base.weight.data += self.scale * (self.B @ self.A).to(self.base.weight.dtype)
        return self.base


def add_lora(vlm, rank, alpha):
    """Adapters on every linear layer of the language model (not the vision tower, not lm_head);
    all original weights frozen."""
    vlm.requires_grad_(False)
    lm = vlm.get_decoder() if hasattr(vlm, "get_decoder") else vlm.model.language_model
    for name, module in list(lm.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha))


def merge_lora(vlm):
    for module in list(vlm.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())


def load_agent(cfg, env_cls):
    from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig
    dtype = getattr(torch, cfg.dtype)
    if not cfg.model:
        vlm, processor = build_tiny_model(env_cls, cfg.seed)
    else:
        from huggingface_hub.utils import logging as hub_logging
        hub_logging.set_verbosity_error()  # one error line below instead of a retry log
        try:
            vlm = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=dtype)
            processor = AutoProcessor.from_pretrained(cfg.model)
        except Exception as e:  # missing path, no network, unsupported architecture...
            sys.exit(f"vlm_rl.py: error: cannot load model {cfg.model!r}: {str(e).splitlines()[0]}")
    # Published generation configs (top_k, repetition_penalty, ...) would change the sampled
    # distribution away from softmax(logits / T): replace the whole config.
    vlm.generation_config = GenerationConfig()
    if cfg.gradient_checkpointing:
        (getattr(vlm, "activation_checkpointing_enable", None) or vlm.gradient_checkpointing_enable)()
    if cfg.lora_rank:
        add_lora(vlm, cfg.lora_rank, cfg.lora_alpha)
    agent = Agent(vlm, processor)
    head = os.path.join(cfg.model, "value_head.pt")
    if cfg.model and os.path.exists(head):
        agent.value_head.load_state_dict(torch.load(head, map_location="cpu"))
    return agent.to(cfg.device, dtype)


# --- rollout: one batched generate call samples every environment's answer ---
def encode_prompts(agent, images, text):
    """Left-padded prompt batch: one image per environment; one prompt text for all, or one each."""
    texts = [text] * len(images) if isinstance(text, str) else text
    bos = agent.tokenizer.bos_token  # a chat template that already wrote BOS must not get a second
    return agent.processor(images=[[im] for im in images], text=texts, return_tensors="pt", padding=True,
                           padding_side="left", add_special_tokens=not (bos and texts[0].startswith(bos)))


def sampling_kwargs(agent, temperature, max_new_tokens):
    """generate() settings that sample from exactly softmax(logits / T): no top-k (which
    transformers applies by default), no top-p, no repetition penalty."""
    tok = agent.tokenizer
    return dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, repetition_penalty=1.0,
                max_new_tokens=max_new_tokens, suppress_tokens=agent.suppress or None,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


@torch.no_grad()
def generate(agent, inputs, temperature, max_new_tokens):
    """Sample one answer per prompt; returns a list of 1-D token tensors, each cut after its EOS."""
    tok = agent.tokenizer
    out = agent.vlm.generate(**inputs, **sampling_kwargs(agent, temperature, max_new_tokens))
    answers = out[:, inputs["input_ids"].shape[1]:].cpu()  # [B, M]
    # keep each answer up to and including its first EOS
    ids = []
    for row in answers.tolist():
        n = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
        ids.append(torch.tensor(row[:n]))
    return ids


# --- log-probs: lambda-weighted answer log-prob, action split from the decoded text ---
def action_token_mask(tokenizer, answer_ids, split_chars):
    """[B, M] bool: True for tokens of the action part, i.e. the token containing character
    `split_chars[b]` of the decoded answer and every token after it. Found by decoding
    prefixes, so it needs no knowledge of token ids (the original code hard-coded them)."""
    M = max(len(a) for a in answer_ids)
    mask = torch.zeros(len(answer_ids), M, dtype=torch.bool)
    for b, (ids, split) in enumerate(zip(answer_ids, split_chars)):
        ids = list(ids)
        ends = [len(s) for s in tokenizer.batch_decode([ids[:k + 1] for k in range(len(ids))],
                                                        skip_special_tokens=True)]
        for k, end in enumerate(ends):  # token k spans characters [ends[k-1], ends[k])
            if end > split:
                mask[b, k:len(ids)] = True
                break
    return mask


def answer_logprob(token_logp, action_mask, valid, thought_coef):
    """log pi = lambda * sum(thought token log-probs) + sum(action token log-probs).  [B, M] -> [B]
    torch.where (not a product) so that -inf at padded positions cannot turn into NaN."""
    weight = torch.where(action_mask, 1.0, thought_coef)
    return torch.where(valid, token_logp * weight, 0.0).sum(-1)


# Per-token processor outputs (besides input_ids and attention_mask) and the value generate() gives
# them at sampled tokens (_update_model_kwargs_for_generation and model overrides of it). collate
# extends them the same way: else scoring sees another model than sampling did. An output missing
# here is a KeyError in collate: look up what generate() does with it, then add it.
ANSWER_TOKEN_FILL = {
    "mm_token_type_ids": 0,              # Qwen-VL: text (its 3-D RoPE positions are built from it)
    "token_type_ids": 0,                 # Gemma3: 0 = text, the value generate() repeats from the last prompt token
    ("paligemma", "token_type_ids"): 1,  # PaliGemma: causal suffix; 0 would join the bidirectional prefix
}


def prompt_sample(inputs, j):
    """Row j of a processor's prompt batch, on the CPU: what a stored sample keeps. "prompt": the
    per-token tensors without their left padding; "extra": the rest (pixels, image sizes, ...),
    each with a batch dimension of its own, for torch.cat in collate."""
    keep = inputs["attention_mask"][j].bool()
    sample = {"prompt": {}, "extra": {}}
    for k, v in inputs.items():
        if k in ("attention_mask", "labels"):  # all ones once unpadded (collate rebuilds it); PaliGemma's SFT targets
            continue
        if v.shape == inputs["input_ids"].shape:
            sample["prompt"][k] = v[j][keep].cpu()
        elif k == "pixel_values" and "image_grid_thw" in inputs:  # Qwen-VL: [patches of all images, D]
            sample["extra"][k] = v.split(inputs["image_grid_thw"].prod(-1).tolist())[j].cpu()  # 1 image a prompt
        else:
            sample["extra"][k] = v[j:j + 1].cpu()
    return sample


def collate(agent, batch, device):
    """Join left-padded prompts with right-padded answers: input [B, P + M], answers [B, M].
    Other per-token tensors are padded alike, then filled over the answer from ANSWER_TOKEN_FILL."""
    pad, dtype, model = agent.tokenizer.pad_token_id, next(agent.parameters()).dtype, agent.vlm.config.model_type
    P, M = max(len(s["prompt"]["input_ids"]) for s in batch), max(len(s["answer"]) for s in batch)
    inputs = {k: torch.zeros(len(batch), P + M, dtype=v.dtype) for k, v in batch[0]["prompt"].items()}
    inputs["input_ids"].fill_(pad)
    inputs["attention_mask"] = torch.zeros(len(batch), P + M, dtype=torch.long)
    for b, s in enumerate(batch):
        p, a = len(s["prompt"]["input_ids"]), len(s["answer"])
        for k, v in s["prompt"].items():
            inputs[k][b, P - p:P] = v
        inputs["input_ids"][b, P:P + a] = s["answer"]
        inputs["attention_mask"][b, P - p:P + a] = 1
    for k in inputs.keys() - {"input_ids", "attention_mask"}:
        inputs[k][:, P:] = ANSWER_TOKEN_FILL[(model, k) if (model, k) in ANSWER_TOKEN_FILL else k]
    inputs = {k: v.to(device) for k, v in inputs.items()}
    for k in batch[0]["extra"]:
        v = torch.cat([s["extra"][k] for s in batch]).to(device)
        inputs[k] = v.to(dtype) if v.is_floating_point() else v
    return inputs, P


def score(agent, batch, temperature):
    """One forward pass over prompt + answer. Returns token log-probs under softmax(logits / T)
    [B, M], their entropies [B, M], the answer mask [B, M] and values [B]. Only the last M + 1
    positions get logits: no [B, P + M, V] tensor is built for the prompt."""
    device = next(agent.parameters()).device
    inputs, P = collate(agent, batch, device)
    M = inputs["input_ids"].shape[1] - P
    out = agent.vlm(**inputs, logits_to_keep=M + 1, output_hidden_states=True)
    logits = out.logits[:, :-1].float() / temperature  # [B, M, V] predicts answer tokens
    if agent.suppress:
        logits[..., agent.suppress] = float("-inf")
    logp = torch.log_softmax(logits, -1)
    answers = inputs["input_ids"][:, P:]  # [B, M]
    token_logp = logp.gather(-1, answers.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp.masked_fill(logp.isinf(), 0)).sum(-1)  # suppressed ids: 0, not NaN
    valid = inputs["attention_mask"][:, P:].bool()
    value = agent.value_head(out.hidden_states[-1][:, P - 1]).squeeze(-1).float()  # last prompt token
    return token_logp, entropy, valid, value


# --- GAE over env steps (names follow CleanRL's ppo.py) ---
def gae(rewards, values, dones, next_value, gamma, gae_lambda):
    """rewards, values, dones: [S, E]; dones[t] = the episode ended at step t; next_value: [E]."""
    advantages = torch.zeros_like(rewards)
    lastgaelam = 0
    for t in reversed(range(rewards.shape[0])):
        nextvalues = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        nextnonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t]
        lastgaelam = delta + gamma * gae_lambda * nextnonterminal * lastgaelam
        advantages[t] = lastgaelam
    return advantages, advantages + values


def ppo_loss(logp, old_logp, advantages, values, returns, clip, vf_coef):
    """Clipped surrogate (Schulman et al. 2017) + value loss, on whole answers."""
    logratio = logp - old_logp
    ratio = logratio.exp()
    pg_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)).mean()
    v_loss = 0.5 * ((values - returns) ** 2).mean()
    with torch.no_grad():
        stats = {"approx_kl": ((ratio - 1) - logratio).mean().item(),
                 "clip_frac": ((ratio - 1).abs() > clip).float().mean().item()}
    return pg_loss + vf_coef * v_loss, pg_loss, v_loss, stats


# --- acting in a batch of environments ---
class Runner:
    """Steps a list of environments with the agent; auto-resets finished episodes."""

    def __init__(self, agent, env_cls, n, seed, cfg):
        self.agent, self.cfg, self.envs = agent, cfg, [env_cls() for _ in range(n)]
        self.obs = [e.reset(seed=seed + i)[0] for i, e in enumerate(self.envs)]
        self.text = prompt_text(agent.processor, build_prompt(self.envs[0], not cfg.no_cot))
        self.rng = random.Random(seed)

    def step(self, idx=None):
        """Act in envs `idx` (default all). Returns per-env samples and transition info."""
        idx = range(len(self.envs)) if idx is None else idx
        inputs = encode_prompts(self.agent, [self.obs[i] for i in idx], self.text)
        answers = generate(self.agent, inputs.to(self.cfg.device), self.cfg.temperature, self.cfg.max_new_tokens)
        texts = self.agent.tokenizer.batch_decode(answers, skip_special_tokens=True)
        samples, info = [], []
        for j, i in enumerate(idx):
            env, (action, split) = self.envs[i], parse_action(texts[j], self.envs[i].action_names)
            invalid = action is None
            if invalid:
                action = self.rng.randrange(len(env.action_names))
            obs, reward, term, trunc, inf = env.step(action)
            done = term or trunc
            if done:
                obs = env.reset()[0]
            self.obs[i] = obs
            samples.append({**prompt_sample(inputs, j), "answer": answers[j], "split": split})
            info.append((reward - self.cfg.invalid_penalty * invalid, done, inf["success"], invalid))
        return samples, info


@torch.no_grad()
def evaluate(agent, env_cls, cfg, episodes, seed):
    """Success rate over `episodes` whole episodes (each env plays its share; no bias toward
    short episodes) and the invalid-answer rate."""
    agent.eval()
    torch.manual_seed(seed)  # the same sampling noise for every evaluation of the same seed
    n = min(cfg.num_envs * 2, episodes)
    runner = Runner(agent, env_cls, n, seed, cfg)
    quota = [episodes // n + (i < episodes % n) for i in range(n)]
    wins = steps = invalid = 0
    bar = tqdm(total=episodes, desc="eval", leave=False)
    while any(quota):
        idx = [i for i in range(n) if quota[i]]
        for i, (_, done, success, inv) in zip(idx, runner.step(idx)[1]):
            steps, invalid = steps + 1, invalid + inv
            if done:
                quota[i], wins = quota[i] - 1, wins + success
                bar.update(1)
    bar.close()
    return wins / episodes, invalid / max(steps, 1)


# --- SFT warm start: cross-entropy on the demonstrator's answers ---
def sft(agent, env_cls, cfg):
    """The demonstrator plays `sft_batch` envs; each step is one batch of (image, prompt, answer)."""
    env_list = [env_cls() for _ in range(cfg.sft_batch)]
    obs = [e.reset(seed=cfg.seed * 7919 + i)[0] for i, e in enumerate(env_list)]
    text = prompt_text(agent.processor, build_prompt(env_list[0], not cfg.no_cot))
    rng = random.Random(cfg.seed)
    noise = env_cls.default_noise if cfg.demo_noise < 0 else cfg.demo_noise
    opt = torch.optim.AdamW([p for p in agent.vlm.parameters() if p.requires_grad], lr=cfg.sft_lr)
    eos = agent.tokenizer.eos_token
    agent.train()
    for step in (bar := tqdm(range(cfg.sft_steps), desc="sft")):
        demos = [e.demo(noise, rng, cot=not cfg.no_cot) for e in env_list]
        inputs = encode_prompts(agent, obs, text)
        answers = agent.tokenizer([d + eos for d in demos], add_special_tokens=False)["input_ids"]
        batch = [{**prompt_sample(inputs, j), "answer": torch.tensor(a)} for j, a in enumerate(answers)]
        token_logp, _, valid, _ = score(agent, batch, 1.0)
        loss = -token_logp[valid].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        for j, e in enumerate(env_list):  # the demonstrator acts on its own answer
            o, _, term, trunc, _ = e.step(parse_action(demos[j], e.action_names)[0])
            obs[j] = e.reset()[0] if term or trunc else o


# --- PPO: rollout -> GAE -> minibatch epochs ---
def train(agent, opt, runner, cfg, state, log, save):
    """PPO updates from state["update"] + 1 on; `save` checkpoints after every `save_every`."""
    S, E = cfg.num_steps, cfg.num_envs
    updates = cfg.total_steps // (S * E)
    bar = tqdm(range(state["update"] + 1, updates + 1), desc="ppo", initial=state["update"], total=updates)
    for update in bar:
        t0 = time.time()
        agent.eval()
        rewards, dones, values, old_logp = (torch.zeros(S, E) for _ in range(4))
        samples, successes, invalid = [], [], 0
        for t in range(S):
            step_samples, info = runner.step()
            with torch.no_grad():  # old log-probs and values from our own scoring pass
                token_logp, _, valid, value = score(agent, step_samples, cfg.temperature)
            amask = action_token_mask(agent.tokenizer, [s["answer"] for s in step_samples],
                                      [s["split"] for s in step_samples])
            for s, m in zip(step_samples, amask):
                s["action_mask"] = m[:len(s["answer"])]
            old_logp[t] = answer_logprob(token_logp, amask.to(valid.device), valid, cfg.thought_coef).cpu()
            values[t] = value.cpu()
            rewards[t] = torch.tensor([r for r, _, _, _ in info])
            dones[t] = torch.tensor([float(d) for _, d, _, _ in info])
            successes += [s for _, d, s, _ in info if d]
            invalid += sum(v for _, _, _, v in info)
            samples += step_samples
        with torch.no_grad():  # value of the state each env is in now, for bootstrapping
            inputs = encode_prompts(agent, runner.obs, runner.text)
            eos = torch.tensor([agent.tokenizer.eos_token_id])  # a stand-in answer: only the value is used
            next_batch = [{**prompt_sample(inputs, j), "answer": eos} for j in range(E)]
            next_value = score(agent, next_batch, cfg.temperature)[3].cpu()
        advantages, returns = gae(rewards, values, dones, next_value, cfg.gamma, cfg.gae_lambda)
        advantages, returns, old_logp = advantages.flatten(), returns.flatten(), old_logp.flatten()  # [S * E]
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

        agent.train()
        stats = []
        for epoch in range(cfg.epochs):
            for mb in torch.randperm(S * E).split(cfg.minibatch_size):
                batch = [samples[i] for i in mb.tolist()]
                token_logp, entropy, valid, value = score(agent, batch, cfg.temperature)
                amask = torch.zeros_like(valid)
                for b, s in enumerate(batch):
                    amask[b, :len(s["answer"])] = s["action_mask"]
                logp = answer_logprob(token_logp, amask, valid, cfg.thought_coef)
                dev = logp.device
                loss, pg, vl, st = ppo_loss(logp, old_logp[mb].to(dev), advantages[mb].to(dev), value,
                                            returns[mb].to(dev), cfg.clip, cfg.vf_coef)
                loss = loss - cfg.ent_coef * torch.where(amask & valid, entropy, 0.0).sum(-1).mean()
                if not torch.isfinite(loss):  # NaN/inf in log-probs or values: stop before the step
                    sys.exit(f"vlm_rl.py: error: non-finite loss in PPO update {update}; the last good "
                             f"checkpoint (update {state['update']}) is kept in {cfg.out_dir}")
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], cfg.max_grad_norm)
                opt.step()
                stats.append([pg.item(), vl.item(), st["approx_kl"], st["clip_frac"]])
        pg, vl, kl, cf = np.mean(stats, 0)
        row = {"update": update, "env_steps": update * S * E,
               "train_success": np.mean(successes) if successes else float("nan"),
               "invalid_rate": invalid / (S * E), "policy_loss": pg, "value_loss": vl,
               "approx_kl": kl, "clip_frac": cf, "seconds": time.time() - t0}
        log(row)
        state["update"] = update
        if update % cfg.save_every == 0 or update == updates:
            save()
        bar.set_postfix(success=f"{row['train_success']:.2f}", invalid=f"{row['invalid_rate']:.1%}",
                        pg=f"{pg:.3f}", v=f"{vl:.3f}", kl=f"{kl:.3f}")


# --- outputs: metrics.csv, curve.png, summary.json, the model ---
def draw_curve(rows, sft_success, rl_success, path, window=10):
    """Training success (moving average over `window` updates) vs env steps, drawn with PIL."""
    W, H, L, B = 640, 400, 50, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([L, 10, W - 10, H - B], outline="black")
    xmax = max([r["env_steps"] for r in rows] + [1])
    X = lambda s: L + (W - 10 - L) * s / xmax
    Y = lambda v: H - B - (H - B - 10) * v
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        d.line([L - 4, Y(v), L, Y(v)], fill="black")
        d.text((8, Y(v) - 6), f"{v:.2f}", fill="black")
    d.text((L, H - B + 8), "0", fill="black")
    d.text((W - 110, H - B + 8), f"{int(xmax)} env steps", fill="black")
    for value, color, name, dy in ((sft_success, "gray", "SFT eval", 3), (rl_success, "green", "RL eval", -14)):
        if value is not None:  # labels: SFT below its line, RL above, so they never overlap
            d.line([L, Y(value), W - 10, Y(value)], fill=color)
            d.text((W - 140, max(12, Y(value) + dy)), f"{name} {value:.3f}", fill=color)
    s = [r["train_success"] for r in rows]
    pts = [(X(r["env_steps"]), Y(np.nanmean(s[max(0, i - window + 1):i + 1]))) for i, r in enumerate(rows)
           if not np.all(np.isnan(s[max(0, i - window + 1):i + 1]))]
    if len(pts) > 1:
        d.line(pts, fill="blue", width=2)
    d.text((L + 6, 14), "train success (blue, moving average)", fill="blue")
    img.save(path)


def save_checkpoint(path, agent, opt, runner, state):
    """Everything needed to go on: weights, optimizer, RNG states, environments, metrics so far.
    Written to a temporary file, then renamed: a crash never leaves half a checkpoint."""
    torch.save({**state, "agent": agent.state_dict(), "opt": opt.state_dict(),
                "runner": (runner.envs, runner.obs, runner.rng),
                "rng": (random.getstate(), np.random.get_state(), torch.get_rng_state())}, path + ".tmp")
    os.replace(path + ".tmp", path)


def main(argv=None):
    cfg, ckpt = parse_config(argv)
    t_start = time.time()
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "metrics.csv"), "a"):
            pass
    except OSError as e:
        sys.exit(f"vlm_rl.py: error: cannot write to --out-dir {cfg.out_dir!r}: {e.strerror}")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    env_cls = ENVS[cfg.env]
    agent = load_agent(cfg, env_cls)
    print(f"model: {cfg.model or 'built-in tiny Llava'} ({sum(p.numel() for p in agent.parameters()) / 1e6:.2f}M "
          f"parameters), env: {cfg.env}, device: {cfg.device}")
    eval_seed = 10 ** 6 + cfg.seed  # the same evaluation episodes before and after RL
    if ckpt is None:
        if cfg.sft_steps:
            sft(agent, env_cls, cfg)
        sft_success, sft_invalid = evaluate(agent, env_cls, cfg, cfg.eval_episodes, eval_seed)
        state = {"config": dataclasses.asdict(cfg), "update": 0, "rows": [], "sft": (sft_success, sft_invalid)}
    else:
        agent.load_state_dict(ckpt["agent"])
        state = {k: ckpt[k] for k in ("config", "update", "rows", "sft")}
        sft_success, sft_invalid = state["sft"]
        print(f"resuming {cfg.out_dir} after PPO update {state['update']}")
    print(f"after SFT: success {sft_success:.3f}, invalid {sft_invalid:.1%} ({cfg.eval_episodes} episodes)")
    opt = torch.optim.AdamW([p for p in agent.parameters() if p.requires_grad], lr=cfg.lr, eps=1e-5)
    runner = Runner(agent, env_cls, cfg.num_envs, cfg.seed * 1009, cfg)
    if ckpt is not None:
        opt.load_state_dict(ckpt["opt"])
        runner.envs, runner.obs, runner.rng = ckpt["runner"]
        random.setstate(ckpt["rng"][0])
        np.random.set_state(ckpt["rng"][1])
        torch.set_rng_state(ckpt["rng"][2])
        del ckpt
    rows = state["rows"]
    path = os.path.join(cfg.out_dir, "checkpoint.pt")
    save = lambda: save_checkpoint(path, agent, opt, runner, state)
    if state["update"] == 0 and cfg.total_steps:
        save()  # the SFT'd agent: a crash during RL never repeats SFT
    columns = ["update", "env_steps", "train_success", "invalid_rate", "policy_loss", "value_loss", "approx_kl",
               "clip_frac", "seconds"]
    with open(os.path.join(cfg.out_dir, "metrics.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)  # on resume: exactly the rows of the checkpoint, none twice

        def log(row):
            rows.append(row)
            writer.writerow(row)
            f.flush()
        train(agent, opt, runner, cfg, state, log, save)
    rl_success, rl_invalid = (evaluate(agent, env_cls, cfg, cfg.eval_episodes, eval_seed) if rows
                              else (sft_success, sft_invalid))
    print(f"after RL: success {rl_success:.3f}, invalid {rl_invalid:.1%} ({cfg.eval_episodes} episodes)")
    model_dir = os.path.join(cfg.out_dir, "model")
    merge_lora(agent.vlm)  # the saved checkpoint is a plain model: --model loads it with transformers alone
    agent.vlm.save_pretrained(model_dir)
    agent.processor.save_pretrained(model_dir)
    torch.save(agent.value_head.state_dict(), os.path.join(model_dir, "value_head.pt"))
    draw_curve(rows, sft_success, rl_success if rows else None, os.path.join(cfg.out_dir, "curve.png"))
    summary = {"sft_success": sft_success, "rl_success": rl_success, "sft_invalid_rate": sft_invalid,
               "invalid_rate": rl_invalid, "eval_episodes": cfg.eval_episodes,
               "wall_seconds": round(time.time() - t_start, 1), "config": dataclasses.asdict(cfg)}
    with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))
    return summary


if __name__ == "__main__":
    main()
