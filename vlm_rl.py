"""
vlm_rl: fine-tune a vision-language model (VLM) as a decision-making agent with PPO, after "Fine-Tuning Large
Vision-Language Models as Decision-Making Agents via Reinforcement Learning" (Zhai et al., NeurIPS 2024, "RL4VLM").

The method, in the order the data flows through this file:
  1. The agent sees an image of the game and a prompt: the task, the legal actions, and the answer format,
     JSON with chain-of-thought (CoT) fields first and "action" last.
  2. The VLM samples an answer at temperature T; `parse_action` maps it to a legal action
     (unparseable, illegal or cut off -> a random legal action, flagged invalid, penalised).
  3. The answer's log-probability under the policy weighs the thoughts by lambda (paper: 0.5):
         log pi(answer) = lambda * sum log p(thought tokens) + sum log p(action tokens)
     where the action part starts at the token that holds the start of `"action"`, found from the decoded
     text, so it works with any tokenizer.
  4. A value head (MLP) reads the final hidden state of the last prompt token.
  5. PPO at environment-step granularity: one whole answer is one action; GAE over env steps; clipped
     surrogate + clipped value loss with normalised advantages.
  Before RL, a supervised warm start (SFT) on CoT demonstrations teaches the format.
  Evaluation plays held-out episodes (seeds training never uses); an invalid answer loses.

Simplifications and differences from the paper's code (all deliberate):
  1. The default model is a tiny random-init Llava (CLIP + Llama) with a BPE tokenizer trained offline on the
     game's own text, so everything runs on a CPU in minutes.
  2. The SFT demonstrator reads the state right but picks a wrong action with probability `--demo-noise`,
     so SFT gives format and perception, and RL must learn the decisions.
  3. Old log-probs and values come from a scoring pass right after sampling (no reference model, no KL
     penalty), as in the paper's code.
  4. PPO differs from the paper's in: a constant or linearly annealed lr (paper: cosine decay), AdamW
     minibatches of --minibatch-size (paper: 1 sample x 128 accumulation steps), grad-norm clip 1.0 (paper:
     0.01), and time-limit truncation bootstraps from V(last state) (paper: a terminal zero).
     Hyperparameters are tuned for the tiny model per game (PRESETS).
  5. With --dtype bfloat16 the frozen weights are bf16; everything trained (and its AdamW state) stays
     float32 and matmuls run under autocast. LoRA is merged in float32.

Commands (README.md has more):
  python vlm_rl.py --env numberline          # tiny model, CPU, about 10 minutes
  python vlm_rl.py --env numberline --model llava-hf/llava-v1.6-mistral-7b-hf --device cuda \
      --dtype bfloat16 --gradient-checkpointing --lora-rank 64 --num-envs 8 --micro-batch 4 --lr 1e-5
  python vlm_rl.py --resume runs/numberline-s1   # continue a run from its last checkpoint
  torchrun --nproc_per_node 8 vlm_rl.py --env numberline --model ...   # data parallel: one process per GPU
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

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import envs

ENVS = {cls.name: cls for cls in (envs.NumberLine, envs.Blackjack, envs.EZPoints, envs.Points24)}
EVAL_SEED = 10 ** 9  # held-out evaluation episode k is dealt from seed EVAL_SEED + k; training seeds stay below

# --- config: one dataclass, turned into argparse flags ---
@dataclasses.dataclass
class Config:
    env: str = "numberline"        # numberline | blackjack | ezpoints | points24
    model: str = ""                # "" = the built-in tiny model; else a hub id or local path
    num_envs: int = 64             # environments stepped together (one generate call per step)
    num_steps: int = 4             # env steps per environment per PPO update
    total_steps: int = 0           # RL env steps in all (per-env preset when not given)
    sft_steps: int = 0             # SFT warm-start steps (per-env preset when not given)
    sft_batch: int = 32
    sft_lr: float = 0.0            # 0 = 3e-4 (full fine-tuning) or 1e-3 (LoRA)
    micro_batch: int = 0           # rows per forward/backward in SFT and PPO; gradients accumulate (0 = all)
    demo_noise: float = -1.0       # P(demonstrator picks a wrong action); <0 = the env's default
    thought_coef: float = 0.5      # lambda: weight of the thought tokens' log-prob (paper: 0.5)
    no_cot: bool = False           # action-only prompt (the paper's "no CoT" ablation)
    temperature: float = 0.5       # sampling temperature (paper: 0.2 for a 7B model)
    max_new_tokens: int = 0        # 0 = 48 for the tiny model, 256 with --model (a 7B model's CoT)
    lr: float = 0.0                # PPO learning rate; 0 = 2e-5 (full) or 1e-4 (LoRA) (paper: 1e-5, 7B LoRA)
    lr_anneal: float = 0.0         # the lr falls linearly by this fraction over the run (1 = to zero; 0 = constant)
    gamma: float = 0.9             # paper values for gamma, GAE lambda, clip, epochs
    gae_lambda: float = 0.95
    clip: float = 0.1
    epochs: int = 4
    minibatch_size: int = 64
    vf_coef: float = 0.5
    value_clip: float = 0.1        # new values stay within +-value_clip of the old ones (paper's code); 0 = off
    ent_coef: float = 0.0          # bonus on the entropy of the action tokens (keeps exploring)
    max_grad_norm: float = 1.0
    invalid_penalty: float = 1.0   # subtracted from the reward of an invalid answer
    eval_episodes: int = 0         # held-out episodes per evaluation (per-env preset when not given)
    render: int = 0                # K > 0: the evaluations also write episodes-{sft,rl}.gif/.png of K episodes
    seed: int = 1
    save_every: int = 1            # checkpoint every N PPO updates
    resume: str = ""               # an --out-dir to continue from its checkpoint.safetensors
    out_dir: str = ""              # default runs/<env>-s<seed>
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "float32"         # float32 | bfloat16 (of frozen weights and matmuls; float16 would need loss scaling)
    lora_rank: int = 0             # > 0: LoRA on every linear layer but lm_head (trained in full on the tiny model)
    lora_alpha: float = 16.0
    gradient_checkpointing: bool = False

PRESETS = {  # tuned for the tiny model on a 2-core CPU
    "numberline": dict(total_steps=5120, sft_steps=400, eval_episodes=1000),
    # Blackjack's reward is noisy: bigger batches, fewer epochs, a smaller step; gamma 1: the objective is the
    # outcome of a hand (0.9 would make every hit look worse); the lr anneals to zero to settle close calls (16 vs 10)
    "blackjack": dict(total_steps=40960, sft_steps=1000, eval_episodes=5000, num_envs=128, minibatch_size=128,
                      epochs=2, lr=5e-5, lr_anneal=1.0, gamma=1.0, temperature=0.3),
    "ezpoints": dict(total_steps=10240, sft_steps=600, eval_episodes=1000),
    # Points24 samples ~9 tokens an answer at T 0.2, so log-probs move 5x a logit: a smaller lr and 2 epochs (4: KL 2)
    "points24": dict(total_steps=20480, sft_steps=1000, eval_episodes=500, temperature=0.2, epochs=2, lr=1e-5),
}
RESUME_MUST_MATCH = ("env", "model", "num_envs", "num_steps", "lora_rank")

def parse_config(argv=None):
    p = argparse.ArgumentParser(description="PPO fine-tuning of a VLM agent (RL4VLM).")
    p.error = lambda msg: sys.exit(f"vlm_rl.py: error: {msg}")  # one line, no usage dump
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kind = dict(action="store_true") if f.type is bool else dict(type=f.type, help=f"default: {f.default}")
        p.add_argument(flag, default=None, **kind)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    ckpt = None
    if given.get("resume"):  # continue a run: its own config, unless a flag overrides it
        path = os.path.join(run := given["resume"], "checkpoint.safetensors")
        if not os.path.isfile(path):
            p.error(f"--resume {run!r}: no checkpoint.safetensors in that directory" + (
                " (a checkpoint.pt is never loaded: unpickling a file can run code)"
                if os.path.exists(os.path.join(run, "checkpoint.pt")) else ""))
        try:  # tensors and JSON only: reading it runs no code
            with safe_open(path, "pt") as f:
                ckpt = json.loads(f.metadata()["state"])
            saved = {k: ckpt["config"][k] for k in RESUME_MUST_MATCH}
        except Exception as e:
            p.error(f"--resume {run!r}: not a vlm_rl checkpoint ({type(e).__name__})")
        for k, v in saved.items():
            if given.setdefault(k, v) != v:
                p.error(f"--resume {run!r}: that run has --{k.replace('_', '-')} {v!r}, not {given[k]!r}")
        given = {**ckpt["config"], "out_dir": run, **given}
    if given.get("env", Config.env) not in ENVS:
        p.error(f"unknown env {given['env']!r}; choose from {sorted(ENVS)}")
    cfg = Config(**{**PRESETS[given.get("env", Config.env)], **given})
    batch, c, W = cfg.num_envs * cfg.num_steps, cfg, int(os.environ.get("WORLD_SIZE", 1))  # W: torchrun's processes
    for bad, msg in [
            (not (0 <= c.thought_coef <= 1 and 0 <= c.lr_anneal <= 1), "--thought-coef, --lr-anneal must be in [0, 1]"),
            (not 0 < c.temperature <= 10, "--temperature must be in (0, 10]"),
            (not (0 <= c.lr < 1 and 0 <= c.sft_lr < 1), "learning rates must be in (0, 1)"),
            (min(c.num_envs, c.num_steps, c.minibatch_size, c.sft_batch, c.save_every, c.epochs) < 1,
             "--num-envs, --num-steps, --minibatch-size, --sft-batch, --save-every and --epochs must be >= 1"),
            (min(c.total_steps, c.sft_steps, c.eval_episodes, c.micro_batch, c.max_new_tokens) < 0, "negative count"),
            (0 < c.total_steps < batch * W, f"--total-steps {c.total_steps} is below one PPO update ({batch * W})"),
            (given.get("minibatch_size", 0) > batch, f"--minibatch-size {c.minibatch_size} is larger than {batch}"),
            (not 0 <= c.seed < 10 ** 5, "--seed must be in [0, 100000)"),  # training seeds stay below EVAL_SEED
            (c.demo_noise > 1, "--demo-noise must be <= 1"),
            (c.dtype not in ("float32", "bfloat16"), f"--dtype {c.dtype!r}: use float32 or bfloat16"),
            (c.device.startswith("cuda") and not torch.cuda.is_available(), "--device cuda: CUDA is not available")]:
        if bad:
            p.error(msg)
    cfg.minibatch_size = min(cfg.minibatch_size, batch)  # a preset's minibatch never exceeds a small batch
    cfg.lr, cfg.sft_lr = cfg.lr or (1e-4 if cfg.lora_rank else 2e-5), cfg.sft_lr or (1e-3 if cfg.lora_rank else 3e-4)
    cfg.max_new_tokens = cfg.max_new_tokens or (256 if cfg.model else 48)
    cfg.out_dir = cfg.out_dir or f"runs/{cfg.env}-s{cfg.seed}"
    return cfg, ckpt

# --- data parallelism (as nanoGPT): inactive unless torchrun launched this process ---
def init_distributed(cfg):
    """(rank, world size) from torchrun's environment; NCCL with one GPU per local rank, gloo on the CPU."""
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
    dist.is_initialized() and dist.all_gather_object(out, x)
    return out

def average_gradients(params):
    """Each gradient -> its mean over the ranks (with LoRA only the adapters travel)."""
    for grad in [p.grad for p in params if p.grad is not None] if dist.is_initialized() else []:
        dist.all_reduce(grad)
        grad /= dist.get_world_size()

# --- prompt: task, legal actions, answer format (CoT fields first, then the action) ---
def build_prompt(env, cot=True):
    actions = " or ".join(f'"{a}"' for a in env.action_names)
    return (f"{env.task} Legal actions: {actions}. Reply with JSON only: "
            f'{{{env.cot_fields + ", " if cot else ""}"action": {actions}}}')

def prompt_text(processor, prompt):
    """Wrap the prompt in the model's chat template (one image, one user turn) if it has one."""
    if getattr(processor, "chat_template", None):
        msg = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(msg, add_generation_prompt=True)
    return f"{processor.image_token}\n{prompt}\n"

# --- parser: answer text -> legal action ---
ACTION_RE = re.compile(r'"action"\s*:\s*"([^"\n]{0,40})"')

def parse_action(text, action_names):
    """Return (action index or None if invalid, character offset where `"action"` starts). The first
    `"action": "<value>"` in the text wins; the value must equal a legal action name (case and surrounding spaces
    ignored). No match -> (None, len(text)): every token is a thought token. The text is only matched, never run."""
    m = ACTION_RE.search(text[:4096])  # answers are short; bound the work on hostile text
    if m is None:
        return None, len(text)
    value, names = m.group(1).strip().lower(), [a.lower() for a in action_names]
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
    """The VLM policy plus a value head: an MLP on the last prompt token's final hidden state.
    `dtype` is the compute dtype (autocast); trained tensors are float32 whatever it is."""

    def __init__(self, vlm, processor, dtype=None):
        super().__init__()
        self.vlm, self.processor, self.tokenizer = vlm, processor, processor.tokenizer
        self.dtype = dtype or next(vlm.parameters()).dtype
        self.value_head = nn.Sequential(nn.Linear(vlm.config.get_text_config().hidden_size, 256), nn.Tanh(),
                                        nn.Linear(256, 1))
        # Placeholder tokens (<image>) are never sampled (the next forward pass would find more image tokens than
        # images) nor scored. The processor's name for one can differ from the model's (Gemma3): take both.
        ids = {getattr(vlm.config, f"{m}_token_{s}", None) for m in ("image", "video") for s in ("id", "index")}
        ids |= {self.tokenizer.convert_tokens_to_ids(getattr(processor, t)) for t in ("image_token", "video_token")
                if getattr(processor, t, None)}
        self.suppress = sorted(ids - {None})
        self.stop_ids = end_of_turn_ids(vlm, processor)

    device = property(lambda self: next(self.parameters()).device)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

def end_of_turn_ids(vlm, processor):
    """Every id that ends a reply, the one SFT teaches first: chat models have their own (Qwen <|im_end|>,
    Gemma <end_of_turn>, Llama-3 <|eot_id|>), named by the chat template and the generation config."""
    tok, ids = processor.tokenizer, []
    try:  # the token the chat template writes right after an assistant reply, if it is a special one
        turn = [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "XQZ"}]}]
        end = tok(processor.apply_chat_template(turn).split("XQZ", 1)[1], add_special_tokens=False).input_ids
        ids += [i for i in end[:1] if i in tok.all_special_ids or tok.convert_ids_to_tokens(i) in tok.get_added_vocab()]
    except Exception:  # no chat template (the tiny model), or one that cannot render an assistant turn
        pass
    eos = vlm.generation_config.eos_token_id  # None, an id or a list of ids
    ids += (eos if isinstance(eos, list) else [eos]) + [tok.eos_token_id]
    return list(dict.fromkeys(i for i in ids if i is not None))

class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A x, with W frozen and B = 0 at the start (Hu et al. 2021).
    A and B are float32 whatever W's dtype is: an update below bf16's resolution must not round away."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.A = nn.Parameter(torch.randn(rank, base.in_features, device=base.weight.device) / base.in_features ** 0.5)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))

    def forward(self, x):
        return self.base(x) + (x @ self.A.t() @ self.B.t()) * self.scale

    def merged(self):
        """The plain nn.Linear with the adapter folded in (in float32, then cast once)."""
        w = self.base.weight
        w.data = (w.data.float() + self.scale * (self.B @ self.A).detach().float()).to(w.dtype)
        return self.base

def add_lora(vlm, rank, alpha):
    """Adapters on every linear layer but lm_head (vision tower and projector included, as in the
    paper's code); all original weights frozen."""
    vlm.requires_grad_(False)
    head = vlm.get_output_embeddings()
    for module in list(vlm.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child is not head:
                setattr(module, child_name, LoRALinear(child, rank, alpha))

def merge_lora(vlm):
    for module in list(vlm.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())

UNSUPPORTED = {"mllama": "its 4-D cross-attention mask is not extended over answer tokens when scoring",
               "florence2": "encoder-decoder models are not scored (the answer log-prob assumes a decoder-only VLM)"}

def load_agent(cfg, env_cls):
    """The VLM (frozen weights in --dtype), optional LoRA adapters, the value head; every trained
    tensor in float32. Generation is reset to plain sampling from softmax(logits / T)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, GenerationConfig
    dtype = getattr(torch, cfg.dtype)
    if not cfg.model:
        vlm, processor = build_tiny_model(env_cls, cfg.seed)
    else:
        from huggingface_hub.utils import logging as hub_logging
        hub_logging.set_verbosity_error()  # one error line below instead of a retry log
        try:
            model_type = AutoConfig.from_pretrained(cfg.model).model_type
            if model_type in UNSUPPORTED:
                sys.exit(f"vlm_rl.py: error: {model_type} models are not supported: {UNSUPPORTED[model_type]}")
            vlm = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=dtype)
            processor = AutoProcessor.from_pretrained(cfg.model)
        except Exception as e:  # missing path, no network, unsupported architecture...
            sys.exit(f"vlm_rl.py: error: cannot load model {cfg.model!r}: {str(e).splitlines()[0]}")
    if cfg.gradient_checkpointing:
        (getattr(vlm, "activation_checkpointing_enable", None) or vlm.gradient_checkpointing_enable)()
    cast(vlm.parameters(), dtype)
    if cfg.lora_rank:
        add_lora(vlm, cfg.lora_rank, cfg.lora_alpha)
        # the tiny model is random, its output layer too: frozen, it caps the logits' scale (loss stays > 3)
        vlm.get_output_embeddings().requires_grad_(not cfg.model)
    agent = Agent(vlm, processor, dtype)
    # Published generation configs (top_k, repetition_penalty, ...) would change the sampled
    # distribution away from softmax(logits / T): replace the whole config (end ids read above).
    vlm.generation_config = GenerationConfig()
    if cfg.model and os.path.exists(head := os.path.join(cfg.model, "value_head.safetensors")):
        agent.value_head.load_state_dict(load_file(head))
    cast([p for p in agent.parameters() if p.requires_grad], torch.float32)  # float32 masters of what trains
    return agent.to(cfg.device)

def cast(params, dtype):
    """Parameters only: buffers such as RoPE frequencies keep the dtype the model gave them."""
    for p in params:
        p.data = p.data.to(dtype)

# --- rollout: one batched generate call samples every environment's answer ---
def encode_prompts(agent, images, text):
    """Left-padded prompt batch: one image per environment; one prompt text for all, or one each."""
    texts = [text] * len(images) if isinstance(text, str) else text
    bos = agent.tokenizer.bos_token  # a chat template that already wrote BOS must not get a second
    return agent.processor(images=[[im] for im in images], text=texts, return_tensors="pt", padding=True,
                           padding_side="left", add_special_tokens=not (bos and texts[0].startswith(bos)))

def sampling_kwargs(agent, temperature, max_new_tokens):
    """generate() settings that sample from exactly softmax(logits / T): no top-k (transformers' default
    is 50), no top-p, no repetition penalty. T = 0: greedy."""
    sample = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else dict(do_sample=False)
    return dict(**sample, repetition_penalty=1.0, max_new_tokens=max_new_tokens, suppress_tokens=agent.suppress or None,
                eos_token_id=agent.stop_ids, pad_token_id=agent.tokenizer.pad_token_id)  # batches need a pad token

@torch.no_grad()
def generate(agent, inputs, temperature, max_new_tokens):
    """Sample one answer per prompt; returns a list of 1-D token tensors, each cut after its
    first end-of-turn token (an answer without one was cut by the length limit)."""
    with agent.autocast():
        out = agent.vlm.generate(**inputs, **sampling_kwargs(agent, temperature, max_new_tokens))
    answers = out[:, inputs["input_ids"].shape[1]:].cpu()  # [B, M]
    ends = torch.isin(answers, torch.tensor(agent.stop_ids)).int()
    lengths = torch.where(ends.any(1), ends.argmax(1) + 1, answers.shape[1])
    return [a[:n] for a, n in zip(answers, lengths.tolist())]

# what one batched step of the environments returns, one entry per environment stepped
Step = collections.namedtuple("Step", "samples rewards dones truncated successes invalid final_obs")

class Runner:
    """Steps a list of environments with the agent; auto-resets finished episodes. Env i is first dealt
    from seed + i * stride, later deals from its own RNG; with fresh_seeds every deal takes the next seed."""

    def __init__(self, agent, env_cls, n, seed, cfg, fresh_seeds=False, stride=1):
        self.agent, self.cfg, self.temperature = agent, cfg, cfg.temperature
        self.seeds, self.fresh, self.rng = itertools.count(seed, stride), fresh_seeds, random.Random(seed)
        self.envs = [env_cls() for _ in range(n)]
        self.obs = [e.reset(seed=next(self.seeds))[0] for e in self.envs]
        self.text = prompt_text(agent.processor, build_prompt(env_cls(), not cfg.no_cot))

    def step(self, idx=None):
        """Act in envs `idx` (default all): sample answers, parse them, step the games."""
        idx = range(len(self.envs)) if idx is None else idx
        inputs = encode_prompts(self.agent, [self.obs[i] for i in idx], self.text).to(self.agent.device)
        answers = generate(self.agent, inputs, self.temperature, self.cfg.max_new_tokens)
        texts = self.agent.tokenizer.batch_decode(answers, skip_special_tokens=True)
        out = []
        for j, i in enumerate(idx):
            env, (action, split) = self.envs[i], parse_action(texts[j], self.envs[i].action_names)
            invalid = action is None or answers[j][-1].item() not in self.agent.stop_ids  # cut off: invalid too
            action = self.rng.randrange(len(env.action_names)) if invalid else action
            final_obs, reward, term, trunc, info = env.step(action)
            self.obs[i] = env.reset(seed=next(self.seeds) if self.fresh else None)[0] if term or trunc else final_obs
            out.append(({**prompt_sample(inputs, j), "answer": answers[j], "split": split},
                        reward - self.cfg.invalid_penalty * invalid, term or trunc, trunc and not term,
                        info["success"], invalid, final_obs))
        return Step(*map(list, zip(*out)))  # per env -> per field

# --- log-probs: lambda-weighted answer log-prob, action split from the decoded text ---
def action_token_mask(tokenizer, answer_ids, split_chars):
    """[B, M] bool: True for the action part, the token holding character `split_chars[b]` of the decoded answer
    and all after it. Found by decoding prefixes (binary search: a longer prefix never decodes shorter), so it
    needs no knowledge of token ids (the original code hard-coded them)."""
    M = max(len(a) for a in answer_ids)
    mask = torch.zeros(len(answer_ids), M, dtype=torch.bool)
    for b, (ids, split) in enumerate(zip(answer_ids, split_chars)):
        ids = list(ids)  # the first k whose prefix ids[:k + 1] decodes past character `split`:
        first = bisect.bisect_left(range(len(ids)), True,
                                   key=lambda k: len(tokenizer.decode(ids[:k + 1], skip_special_tokens=True)) > split)
        mask[b, first:len(ids)] = True
    return mask

def answer_logprob(token_logp, action_mask, valid, thought_coef):
    """log pi = lambda * sum(thought token log-probs) + sum(action token log-probs).  [B, M] -> [B]
    torch.where (not a product) so that -inf at padded positions cannot turn into NaN."""
    weight = torch.where(action_mask, 1.0, thought_coef)
    return torch.where(valid, token_logp * weight, 0.0).sum(-1)

# Per-token processor outputs (besides input_ids, attention_mask) and the value generate() gives them at sampled
# tokens (_update_model_kwargs_for_generation), so that scoring sees what sampling saw; a missing one: collate fails.
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
    pad, model = agent.tokenizer.pad_token_id or 0, agent.vlm.config.model_type
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
        inputs[k] = v.to(agent.dtype) if v.is_floating_point() else v
    return inputs, P

Scored = collections.namedtuple("Scored", "token_logp entropy valid value")  # [B, M] x 3, [B]

def score(agent, batch, temperature):
    """One forward pass over prompt + answer: token log-probs under softmax(logits / T), their entropies, the
    answer mask and the values. Only the last M + 1 positions get logits: no [B, P + M, V] tensor for the prompt."""
    inputs, P = collate(agent, batch, agent.device)
    M = inputs["input_ids"].shape[1] - P
    with agent.autocast():
        out = agent.vlm(**inputs, logits_to_keep=M + 1, output_hidden_states=True)
        value = agent.value_head(out.hidden_states[-1][:, P - 1]).squeeze(-1).float()  # last prompt token
    logits = out.logits[:, :-1].float() / temperature  # [B, M, V] predicts answer tokens
    logits[..., agent.suppress] = float("-inf")  # never sampled either (an empty list: no-op)
    logp = torch.log_softmax(logits, -1)
    answers = inputs["input_ids"][:, P:]  # [B, M]
    token_logp = logp.gather(-1, answers.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp.masked_fill(logp.isinf(), 0)).sum(-1)  # suppressed ids: 0, not NaN
    return Scored(token_logp, entropy, inputs["attention_mask"][:, P:].bool(), value)

@torch.no_grad()
def value_of(agent, images, text):
    """V(s) of observations [B]: a stand-in one-token answer; only the value is read."""
    inputs, end = encode_prompts(agent, images, text), torch.tensor(agent.stop_ids[:1])
    return score(agent, [{**prompt_sample(inputs, j), "answer": end} for j in range(len(images))], 1.0).value.cpu()

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

PPOLoss = collections.namedtuple("PPOLoss", "loss pg_loss v_loss stats")

def ppo_loss(logp, old_logp, advantages, values, returns, clip, vf_coef, old_values=None, value_clip=0.0):
    """Clipped surrogate (Schulman et al. 2017) + value loss, on whole answers. With value_clip,
    the value loss is the larger of the plain and the clipped squared error (the paper's code)."""
    logratio = logp - old_logp
    ratio = logratio.exp()
    pg_loss = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)).mean()
    v_loss = (values - returns) ** 2
    if value_clip:
        clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
        v_loss = torch.max(v_loss, (clipped - returns) ** 2)
    v_loss = 0.5 * v_loss.mean()
    with torch.no_grad():
        stats = {"approx_kl": ((ratio - 1) - logratio).mean().item(),
                 "clip_frac": ((ratio - 1).abs() > clip).float().mean().item()}
    return PPOLoss(pg_loss + vf_coef * v_loss, pg_loss, v_loss, stats)

# --- PPO: rollout -> GAE -> minibatch epochs ---
def train(agent, opt, runner, cfg, state, log, save):
    """PPO updates from state["update"] + 1 on; `save` checkpoints after every `save_every`."""
    (S, E), (r, W) = (cfg.num_steps, cfg.num_envs), world()  # W ranks, each with its own E envs
    updates = cfg.total_steps // (S * E * W)
    bar = tqdm(range(state["update"] + 1, updates + 1), desc="ppo", initial=state["update"], total=updates, disable=r)
    for update in bar:
        t0, seconds = time.time(), collections.Counter()
        for g in opt.param_groups:  # linear annealing (CleanRL's anneal_lr), a function of the update: resumes alike
            g["lr"] = cfg.lr * (1 - cfg.lr_anneal * (update - 1) / updates)
        agent.eval()
        rewards, dones, values, old_logp = (torch.zeros(S, E) for _ in range(4))
        samples, successes, invalid = [], [], 0
        for t in range(S):
            t1, step, t2 = time.time(), runner.step(), time.time()
            with torch.no_grad():  # old log-probs and values from our own scoring pass
                token_logp, _, valid, value = score(agent, step.samples, cfg.temperature)
            amask = action_token_mask(agent.tokenizer, [s["answer"] for s in step.samples],
                                      [s["split"] for s in step.samples])
            for s, m in zip(step.samples, amask):
                s["action_mask"] = m[:len(s["answer"])]  # [M_b]: stored with the sample for the epochs
            old_logp[t] = answer_logprob(token_logp, amask.to(valid.device), valid, cfg.thought_coef).cpu()
            values[t] = value.cpu()
            rewards[t], dones[t] = torch.tensor(step.rewards), torch.tensor(step.dones, dtype=torch.float)
            if cut := [j for j in range(E) if step.truncated[j]]:  # a time limit: bootstrap, it is no terminal
                rewards[t, cut] += cfg.gamma * value_of(agent, [step.final_obs[j] for j in cut], runner.text)
            successes += [s for s, d in zip(step.successes, step.dones) if d]
            invalid, samples = invalid + sum(step.invalid), samples + step.samples
            seconds.update(gen_seconds=t2 - t1, score_seconds=time.time() - t2)
        next_value = value_of(agent, runner.obs, runner.text)  # the state each env is in now
        advantages, returns = gae(rewards, values, dones, next_value, cfg.gamma, cfg.gae_lambda)
        flat = lambda x: x.flatten().to(agent.device)  # [S * E] from here on
        advantages, returns, old_logp, old_values = flat(advantages), flat(returns), flat(old_logp), flat(values)
        explained_var = (1 - (returns - old_values).var() / returns.var()).item() if returns.var() > 0 else np.nan
        if S * E > 1:  # one advantage has no spread to normalise by
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        t3 = time.time()
        agent.train()
        stats, grad_norms = [], []
        for epoch in range(cfg.epochs):
            for mb in torch.randperm(S * E).split(cfg.minibatch_size):
                opt.zero_grad()
                for part in mb.split(cfg.micro_batch or len(mb)):  # gradient accumulation over micro-batches
                    batch = [samples[i] for i in part.tolist()]
                    token_logp, entropy, valid, value = score(agent, batch, cfg.temperature)
                    amask = nn.utils.rnn.pad_sequence([s["action_mask"] for s in batch], True).to(valid.device)
                    logp = answer_logprob(token_logp, amask, valid, cfg.thought_coef)
                    loss, pg, vl, st = ppo_loss(logp, old_logp[part], advantages[part], value, returns[part], cfg.clip,
                                                cfg.vf_coef, old_values[part], cfg.value_clip)
                    ent = torch.where(amask & valid, entropy, 0.0).sum(-1).mean()  # of the action tokens
                    loss = loss - cfg.ent_coef * ent
                    if not torch.isfinite(loss):  # NaN/inf in log-probs or values: stop before the step
                        sys.exit(f"vlm_rl.py: error: non-finite loss in PPO update {update}; the last good "
                                 f"checkpoint (update {state['update']}) is kept in {cfg.out_dir}")
                    (loss * len(part) / len(mb)).backward()
                    stats.append([pg.item(), vl.item(), ent.item(), st["approx_kl"], st["clip_frac"]])
                average_gradients(opt.param_groups[0]["params"])
                grad_norms.append(nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], cfg.max_grad_norm).item())
                opt.step()
        succ, inv, st, ev = zip(*gather((successes, invalid, stats, explained_var)))  # one row for all ranks
        pg, vl, ent, kl, cf = np.mean(sum(st, []), 0)
        row = {"update": update, "env_steps": update * S * E * W, "train_success": np.mean(sum(succ, []) or [np.nan]),
               "invalid_rate": sum(inv) / (S * E * W), "policy_loss": pg, "value_loss": vl, "entropy": ent,
               "approx_kl": kl, "clip_frac": cf, "explained_var": np.mean(ev), "grad_norm": np.mean(grad_norms),
               **seconds, "ppo_seconds": time.time() - t3, "seconds": time.time() - t0}
        log(row)
        state["update"] = update
        if update % cfg.save_every == 0 or update == updates:
            save()
        bar.set_postfix(success=f"{row['train_success']:.2f}", invalid=f"{row['invalid_rate']:.1%}",
                        pg=f"{pg:.3f}", v=f"{vl:.3f}", kl=f"{kl:.3f}")

# --- evaluation: held-out episodes, an invalid answer loses ---
@torch.no_grad()
def evaluate(agent, env_cls, cfg, episodes, greedy=False, gif=""):
    """Episode k is dealt from seed EVAL_SEED + k: every evaluation of a run (after SFT or RL, sampled or greedy) plays
    the same deals, which training never sees. An episode with an invalid answer fails. Sampling uses a forked RNG:
    training's streams are untouched. "paper_success": total reward > 0 (the paper's measure). Under torchrun rank r
    plays episodes r, r + W, ... (counts summed). `gif`: rank 0's first cfg.render episodes, a frame per step."""
    agent.eval()
    r, W = world()
    total, episodes = episodes, len(range(r, episodes, W))  # this rank's share
    n = min(2 * cfg.num_envs, episodes)  # no gradients to hold: a bigger batch fits
    with torch.random.fork_rng(devices=[agent.device] if agent.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + 100003 * r)
        runner = Runner(agent, env_cls, n, EVAL_SEED + r, cfg, fresh_seeds=True, stride=W)
        runner.temperature = 0.0 if greedy else cfg.temperature
        episode, ret, bad, dealt = list(range(n)), [0.0] * n, [False] * n, n  # per env: episode, return, invalid
        wins, paper, invalid, steps, frames = 0, 0, 0, 0, collections.defaultdict(list)  # frames: per episode
        with tqdm(total=episodes, desc="eval greedy" if greedy else "eval", leave=False, disable=r > 0) as bar:
            while active := [i for i in range(n) if episode[i] < episodes]:
                shown, step = [runner.obs[i] for i in active], runner.step(active)
                steps, invalid = steps + len(active), invalid + sum(step.invalid)
                for j, i in enumerate(active):
                    ret[i] += step.rewards[j]
                    bad[i] = bad[i] or step.invalid[j]
                    if gif and r == 0 and (k := episode[i]) < cfg.render:
                        text = agent.tokenizer.decode(step.samples[j]["answer"], skip_special_tokens=True)
                        frames[k].append(draw_frame(shown[j], text, f"episode {k + 1}, step {len(frames[k]) + 1}: "
                                                    f"{'INVALID answer, a random action played; ' * step.invalid[j]}"
                                                    f"reward {step.rewards[j]:+g}, return {ret[i]:+g}"))
                    if step.dones[j]:
                        wins += step.successes[j] and not bad[i]
                        paper += ret[i] > 0
                        # the runner has dealt env i the next seed, in this same order: that episode's number
                        episode[i], dealt, ret[i], bad[i] = dealt, dealt + 1, 0.0, False
                        bar.update(1)
    if frames := [f for k in sorted(frames) for f in frames[k]]:
        frames[0].save(gif, save_all=True, append_images=frames[1:], duration=1500, loop=0)
        frames[0].save(gif[:-4] + ".png")
    wins, paper, invalid, steps = map(sum, zip(*gather((wins, paper, invalid, steps))))
    p = wins / total
    return {"success": p, "se": (p * (1 - p) / total) ** 0.5, "paper_success": paper / total,
            "invalid_rate": invalid / max(steps, 1), "episodes": total}

def draw_frame(obs, answer, caption, width=480):
    """A frame of the episode viewer: the game picture enlarged, the agent's answer wrapped, what happened."""
    img = Image.new("RGB", (width, 400), "white")
    img.paste(obs.resize((200, 200), Image.NEAREST), ((width - 200) // 2, 6))
    lines = textwrap.wrap(answer, 62, max_lines=8, placeholder=" ...") or ["(an empty answer)"]
    ImageDraw.Draw(img).multiline_text((8, 214), "\n".join(lines + [""] + textwrap.wrap(caption, 62)), fill="black",
                                       font=ImageFont.load_default(size=13))
    return img

def evaluations(agent, env_cls, cfg, when, tag):
    """Held-out success, sampled at the training temperature and greedy, printed; None without episodes."""
    if not cfg.eval_episodes:
        return None
    gif = cfg.render and os.path.join(cfg.out_dir, f"episodes-{tag}.gif")  # the sampled evaluation's episodes
    e = {mode: evaluate(agent, env_cls, cfg, cfg.eval_episodes, mode == "greedy", gif=mode == "sampled" and gif)
         for mode in ("sampled", "greedy")}
    world()[0] or print(f"{when}: success {e['sampled']['success']:.3f} (greedy {e['greedy']['success']:.3f}), "
          f"invalid {e['sampled']['invalid_rate']:.1%} ({cfg.eval_episodes} held-out episodes)")
    return e

# --- SFT warm start: cross-entropy on the demonstrator's answers ---
def sft(agent, env_cls, cfg):
    """The demonstrator plays `sft_batch` envs; each step is one batch of (image, prompt, answer)."""
    env_list, r = [env_cls() for _ in range(cfg.sft_batch)], world()[0]  # under torchrun: rank r's own deals
    obs = [e.reset(seed=cfg.seed * 7919 + r * cfg.sft_batch + i)[0] for i, e in enumerate(env_list)]
    text = prompt_text(agent.processor, build_prompt(env_list[0], not cfg.no_cot))
    rng, noise = random.Random(cfg.seed + 100003 * r), env_cls.default_noise if cfg.demo_noise < 0 else cfg.demo_noise
    opt = torch.optim.AdamW(params := [p for p in agent.vlm.parameters() if p.requires_grad], lr=cfg.sft_lr)
    agent.train()
    for step in (bar := tqdm(range(cfg.sft_steps), desc="sft", disable=r > 0)):
        demos = [e.demo(noise, rng, cot=not cfg.no_cot) for e in env_list]
        inputs = encode_prompts(agent, obs, text)
        answers = [a + agent.stop_ids[:1] for a in agent.tokenizer(demos, add_special_tokens=False)["input_ids"]]
        batch = [{**prompt_sample(inputs, j), "answer": torch.tensor(a)} for j, a in enumerate(answers)]
        opt.zero_grad()
        loss, tokens, micro = 0.0, sum(map(len, answers)), cfg.micro_batch or len(batch)
        for k in range(0, len(batch), micro):  # gradient accumulation over micro-batches
            token_logp, _, valid, _ = score(agent, batch[k:k + micro], 1.0)
            part = -token_logp[valid].sum() / tokens  # the mean is over every answer token of the batch
            part.backward()
            loss += part.item()
        average_gradients(params)
        opt.step()
        bar.set_postfix(loss=f"{loss:.3f}")
        for j, e in enumerate(env_list):  # the demonstrator acts on its own answer
            o, _, term, trunc, _ = e.step(parse_action(demos[j], e.action_names)[0])
            obs[j] = e.reset()[0] if term or trunc else o

# --- outputs: metrics.csv, checkpoints, summary.json, the model (scripts/curve.py draws metrics.csv) ---
def save_checkpoint(path, agent, opt, runner, state):
    """What training changes (trained tensors: with LoRA adapters and value head, never the frozen base; AdamW state,
    RNG states, games, metrics) as safetensors + JSON metadata: loading it runs no code. Written to a temporary file,
    then renamed: never half a checkpoint. Under torchrun rank 0 writes it, with every rank's games and RNG states."""
    cuda = agent.device.type == "cuda" and torch.cuda.get_rng_state().tolist()
    ranks = gather({"envs": [{**vars(e), "rng": e.rng.getstate()} for e in runner.envs], "cuda_rng": cuda,
                    "runner_rng": runner.rng.getstate(), "python_rng": random.getstate(),
                    "numpy_rng": np.random.get_state(legacy=False), "torch_rng": torch.get_rng_state().tolist()})
    if world()[0]:
        return
    opt_state = opt.state_dict()
    tensors = {f"param.{k}": p for k, p in agent.named_parameters() if p.requires_grad}
    tensors.update({f"opt.{i}.{k}": v for i, s in opt_state["state"].items() for k, v in s.items()})
    meta = {**state, "opt_groups": opt_state["param_groups"], "ranks": ranks}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path + ".tmp",
              metadata={"state": json.dumps(meta, default=np.ndarray.tolist)})
    os.replace(path + ".tmp", path)

def load_checkpoint(path, agent, opt, runner):
    """The inverse of save_checkpoint; returns the run's state (config, update, rows, evaluations)."""
    as_state = lambda s: (s[0], tuple(s[1]), s[2])  # random.Random state, back from JSON lists
    with safe_open(path, "pt") as f:
        meta, t = json.loads(f.metadata()["state"]), {k: f.get_tensor(k) for k in f.keys()}
    ranks, (r, W) = meta.pop("ranks"), world()
    if len(ranks) != W:
        sys.exit(f"vlm_rl.py: error: --resume: that run had {len(ranks)} process(es), not {W}")
    mine = ranks[r]
    agent.load_state_dict({k: t[f"param.{k}"] for k, p in agent.named_parameters() if p.requires_grad}, strict=False)
    opt_state = collections.defaultdict(dict)
    for _, i, name in (k.split(".", 2) for k in t if k.startswith("opt.")):
        opt_state[int(i)][name] = t[f"opt.{i}.{name}"]
    opt.load_state_dict({"state": dict(opt_state), "param_groups": meta.pop("opt_groups")})
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

def main(argv=None):
    cfg, ckpt = parse_config(argv)
    t_start, (r, W) = time.time(), init_distributed(cfg)
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        open(os.path.join(cfg.out_dir, "metrics.csv"), "a").close()
    except OSError as e:
        sys.exit(f"vlm_rl.py: error: cannot write to --out-dir {cfg.out_dir!r}: {e.strerror}")
    for seed in (random.seed, np.random.seed, torch.manual_seed):
        seed(cfg.seed + 100003 * r)  # under torchrun each rank samples its own episodes
    agent = load_agent(cfg, env_cls := ENVS[cfg.env])
    for p in agent.parameters() if W > 1 else []:  # ... from rank 0's weights (as DDP starts)
        dist.broadcast(p.data, 0)
    r or print(f"model: {cfg.model or 'built-in tiny Llava'} ({sum(p.numel() for p in agent.parameters()) / 1e6:.2f}"
               f"M parameters), env: {cfg.env}, device: {cfg.device}, dtype: {cfg.dtype}")
    opt = torch.optim.AdamW([p for p in agent.parameters() if p.requires_grad], lr=cfg.lr, eps=1e-5)
    runner = Runner(agent, env_cls, cfg.num_envs, cfg.seed * 1009 + r * cfg.num_envs, cfg)
    path = os.path.join(cfg.out_dir, "checkpoint.safetensors")
    if ckpt is None:
        if cfg.sft_steps:
            sft(agent, env_cls, cfg)
        state = {"config": dataclasses.asdict(cfg), "update": 0, "rows": [],
                 "sft_eval": evaluations(agent, env_cls, cfg, "after SFT", "sft") if cfg.total_steps else None}
    else:
        state = load_checkpoint(path, agent, opt, runner)
        state["config"] = dataclasses.asdict(cfg)
        r or print(f"resuming {cfg.out_dir} after PPO update {state['update']}")
    rows, save = state["rows"], lambda: save_checkpoint(path, agent, opt, runner, state)
    if state["update"] == 0 and cfg.total_steps:
        save()  # the SFT'd agent: a crash during RL never repeats SFT
    with open(os.path.join(cfg.out_dir, "metrics.csv") if r == 0 else os.devnull, "w", newline="") as f:
        def write(row):
            if f.tell() == 0:
                csv.writer(f).writerow(row)  # the header: the first row's keys
            csv.DictWriter(f, fieldnames=list(row)).writerow(row)
            f.flush()
        for row in rows:  # on resume: exactly the rows of the checkpoint, none twice
            write(row)
        train(agent, opt, runner, cfg, state, lambda row: (rows.append(row), write(row)), save)
    # The model that is saved is the one evaluated: LoRA merged, trained weights cast to --dtype.
    merge_lora(agent.vlm)
    cast(agent.vlm.parameters(), agent.dtype)
    final = evaluations(agent, env_cls, cfg, "after RL" if rows else "evaluation", "rl" if rows else "eval")
    before = state["sft_eval"] or final  # no RL: the saved model is the SFT model
    pick = lambda e, k: e and e["sampled"][k]
    summary = {"sft_success": pick(before, "success"), "rl_success": pick(final, "success"),
               "sft_invalid_rate": pick(before, "invalid_rate"), "invalid_rate": pick(final, "invalid_rate"),
               "eval_episodes": cfg.eval_episodes, "eval": {"sft": before, "rl": final},
               "wall_seconds": round(time.time() - t_start, 1), "config": dataclasses.asdict(cfg)}
    if r == 0:  # under torchrun every rank holds the same weights and figures: one writes them
        model_dir = os.path.join(cfg.out_dir, "model")  # save_pretrained: loads with transformers alone
        agent.vlm.save_pretrained(model_dir)
        agent.processor.save_pretrained(model_dir)
        save_file({k: v.contiguous() for k, v in agent.value_head.state_dict().items()},
                  os.path.join(model_dir, "value_head.safetensors"))
        with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(json.dumps({k: v for k, v in summary.items() if k not in ("config", "eval")}))
    dist.is_initialized() and dist.destroy_process_group()
    return summary

if __name__ == "__main__":
    main()
