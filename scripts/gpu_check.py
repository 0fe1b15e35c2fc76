"""GPU check of vlm_rl on one CUDA machine: what real-size VLMs cost per PPO update.

  (a) the default NumberLine run end to end (tiny model, --device cuda): wall time and success;
  (b) a LLaVA-1.6-Mistral-7B-shaped LlavaNext and (c) a Qwen2-VL-2B-shaped model, built from
      their configs with random weights (nothing is downloaded) and saved with a processor built
      offline; then one PPO update per --sizes through vlm_rl.main (bf16, LoRA r64, gradient
      checkpointing, 256 new tokens): peak GPU memory and the seconds split from metrics.csv;
  (d) a 2-rank torchrun smoke run, if the machine has two GPUs.

    python scripts/gpu_check.py                          # all parts: estimated 6-8 min on an H200
    python scripts/gpu_check.py --out $OUT/gpu_check.md  # the report elsewhere
    python scripts/gpu_check.py --parts b --sizes 4,8    # one model, two sizes

Without CUDA it stops with one line. Random weights practically never emit an end token, so
every answer has the full 256 tokens: the timings are the worst case. Each part runs in
try/except, so a failure still leaves the other rows; the table goes to stdout and to --out
(default: docs/gpu_check.md in the repository) after every part.
"""
import argparse
import csv
import datetime
import gc
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import vlm_rl  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "docs", "gpu_check.md")
MICRO_BATCH = 4  # --micro-batch: rows per forward/backward in the PPO epochs
# llava-v1.6-mistral-7b-hf
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
MISTRAL_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}{% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} [/INST]"
    "{% else %} {{ m['content'][0]['text'] }}</s>{% endif %}{% endfor %}")
QWEN_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN_SPECIALS = [  # ids 151643, 151644, ...
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def log(*a):
    print(*a, flush=True)


def one_line(e):
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:220]


def game_corpus():
    """The tokenizer's training text: chat-template words, every game's prompts, and 200
    demonstrations per game."""
    corpus = ["[INST] [/INST] system user assistant You are a helpful assistant."]
    rng = random.Random(0)
    for env_cls in vlm_rl.ENVS.values():
        env = env_cls()
        corpus += [vlm_rl.build_prompt(env, cot) for cot in (True, False)] * 4
        for i in range(200):
            env.reset(seed=i)
            corpus.append(env.demo(0.5, rng, cot=i % 4 > 0))
    return corpus


def make_tokenizer(specials, **kw):
    """Byte-level BPE trained offline on the games' text (vlm_rl.train_bpe). `specials`
    {id: token} get the real checkpoint's ids; the ids below them that BPE does not use are
    filler tokens."""
    from tokenizers import AddedToken, Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast
    bpe = vlm_rl.train_bpe(game_corpus(), 600, [])
    trained = json.loads(bpe.to_str())["model"]

    # the trained tokens, in their order, on the ids the specials leave free
    free_ids = (i for i in itertools.count() if i not in specials)
    by_id = sorted(trained["vocab"].items(), key=lambda kv: kv[1])
    vocab = {token: next(free_ids) for token, _ in by_id}
    vocab.update({token: i for i, token in specials.items()})
    used = set(vocab.values())
    vocab.update({f"<unused{i}>": i for i in range(max(specials)) if i not in used})
    merges = []
    for m in trained["merges"]:  # "a b" in older tokenizers' JSON, ["a", "b"] in newer
        merges.append(tuple(m.split(" ")) if isinstance(m, str) else tuple(m))

    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = bpe.pre_tokenizer
    tk.decoder = bpe.decoder
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t in specials.values()])
    if kw.get("bos_token"):  # as Llama/Mistral tokenizers do: BOS before every text
        bos = kw["bos_token"]
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                          special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, **kw)


def llava_next(smoke):
    """LLaVA-1.6-Mistral-7B: CLIP ViT-L/14-336 + Mistral-7B, anyres tiles. Smoke: 1/12 of the
    image size."""
    from transformers import (CLIPVisionConfig, GenerationConfig, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, LlavaNextProcessor,
                              MistralConfig)
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil)
    specials = {0: "<unk>", 1: "<s>", 2: "</s>", 32000: "<image>", 32001: "<pad>"}
    tok = make_tokenizer(specials, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                         pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    s = 12 if smoke else 1
    img = 336 // s
    grid = [[a // s, b // s] for a, b in PINPOINTS]
    if smoke:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2)
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4)
    else:
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                      num_attention_heads=16)
        text = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32)
    vision_config = CLIPVisionConfig(**vision, image_size=img, patch_size=14, projection_dim=768,
                                     hidden_act="quick_gelu")
    text_config = MistralConfig(**text, num_key_value_heads=2 if smoke else 8, vocab_size=32064,
                                sliding_window=None, max_position_embeddings=32768,
                                rms_norm_eps=1e-5,
                                rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                bos_token_id=1, eos_token_id=2, pad_token_id=32001)
    config = LlavaNextConfig(vision_config=vision_config, text_config=text_config,
                             image_grid_pinpoints=grid, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_token_index=32000,
                             tie_word_embeddings=False)
    image_proc = LlavaNextImageProcessorPil(size={"shortest_edge": img},
                                            crop_size={"height": img, "width": img},
                                            image_grid_pinpoints=grid)
    processor = LlavaNextProcessor(image_processor=image_proc, tokenizer=tok, patch_size=14,
                                   vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1, chat_template=MISTRAL_TEMPLATE)
    gen = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=32001)
    return LlavaNextForConditionalGeneration, config, processor, gen


def qwen2_vl(smoke):
    """Qwen2-VL-2B-Instruct: 32-block ViT (1280 wide, 2x2 merge) + 28-layer Qwen2 (1536 wide),
    tied embeddings."""
    import transformers
    from transformers import (GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLProcessor)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil)
    specials = {151643 + i: t for i, t in enumerate(QWEN_SPECIALS)}
    tok = make_tokenizer(specials, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         extra_special_tokens={"image_token": "<|image_pad|>",
                                               "video_token": "<|video_pad|>"})
    if smoke:
        vision = dict(depth=1, embed_dim=32, num_heads=2, hidden_size=64)
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4)
    else:
        vision = dict(depth=32, embed_dim=1280, num_heads=16, hidden_size=1536)
        text = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                    num_attention_heads=12)
    rope = {"rope_type": "default", "rope_theta": 1e6,
            "mrope_section": [2, 3, 3] if smoke else [16, 24, 24]}
    vision_config = dict(vision, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                         temporal_patch_size=2)
    text_config = dict(text, num_key_value_heads=2, vocab_size=151936,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, rope_parameters=rope,
                       bos_token_id=151643, eos_token_id=151645)
    config = Qwen2VLConfig(vision_config=vision_config, text_config=text_config,
                           image_token_id=151655, video_token_id=151656,
                           vision_start_token_id=151652, vision_end_token_id=151653,
                           tie_word_embeddings=True)
    image_proc = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56,
                                                "longest_edge": 28 * 28 * 16384})
    try:  # its video processor needs torchvision, which the GPU machine has
        processor = Qwen2VLProcessor(image_proc, tok, transformers.Qwen2VLVideoProcessor(),
                                     chat_template=QWEN_TEMPLATE)
    except Exception:
        # CPU smoke without torchvision: image-only, as test_vlm_rl.py builds it; cannot be
        # reloaded
        class ImageOnly(Qwen2VLProcessor):
            def __init__(self, image_processor=None, tokenizer=None, chat_template=None,
                         **kwargs):
                super().__init__(image_processor, tokenizer, None, chat_template=chat_template,
                                 **kwargs)
        processor = ImageOnly(image_proc, tok, chat_template=QWEN_TEMPLATE)
        processor.needs_shim = True
    gen = GenerationConfig(bos_token_id=151643, pad_token_id=151643,
                           eos_token_id=[151645, 151643], do_sample=True, temperature=0.01,
                           top_k=1, top_p=0.001, repetition_penalty=1.05)  # as published
    return Qwen2VLForConditionalGeneration, config, processor, gen


MODELS = {"b": ("LLaVA-1.6-Mistral-7B", llava_next), "c": ("Qwen2-VL-2B", qwen2_vl)}


def patch(obj, name, value):
    """obj.name = value; returns the function that undoes it."""
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)

    def undo():
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)
    return undo


def metrics_cell(row, key):
    """A metrics.csv value with one decimal, or "n/a"."""
    if row.get(key) in (None, ""):
        return "n/a"
    return f"{float(row[key]):.1f}"


def ppo_update(args, path, n, cls, processor, save):
    """One PPO update of n envs through vlm_rl.main; returns the table cells after the model
    name. save=False: cls.save_pretrained does nothing, so the merged model is not written at
    the end of main() (15 GB for 7B; nothing that is measured happens there)."""
    from transformers import AutoProcessor
    out = tempfile.mkdtemp(prefix=f"run{n}-", dir=args.tmp_dir)
    argv = ["--env", "numberline", "--model", path, "--device", args.device,
            "--dtype", "bfloat16", "--lora-rank", "8" if args.cpu_smoke else "64",
            "--gradient-checkpointing", "--num-envs", str(n), "--num-steps", "1",
            "--total-steps", str(n), "--sft-steps", "0", "--eval-episodes", "0",
            "--max-new-tokens", str(args.max_new_tokens), "--minibatch-size", str(n),
            "--micro-batch", str(MICRO_BATCH), "--out-dir", out]
    if args.epochs:
        argv += ["--epochs", str(args.epochs)]
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2 ** 30  # should be ~0
    else:
        before = 0.0
    undo = []
    try:
        if getattr(processor, "needs_shim", False):
            # smoke only: hand vlm_rl the processor built here
            undo.append(patch(AutoProcessor, "from_pretrained",
                              staticmethod(lambda *a, **k: processor)))
        if not save:
            undo.append(patch(cls, "save_pretrained",
                              lambda *a, **k: log("    (merged model not saved)")))
        t0 = time.time()
        summary = vlm_rl.main(argv)
        wall = time.time() - t0
        with open(os.path.join(out, "metrics.csv")) as f:
            rows = list(csv.DictReader(f))
    finally:
        for u in undo:
            u()
        shutil.rmtree(out, ignore_errors=True)
    if args.device == "cuda":
        peak = f"{torch.cuda.max_memory_allocated() / 2 ** 30:.1f}"
    else:
        peak = "n/a (cpu)"
    row = rows[-1] if rows else {}
    note = f"{summary.get('config', {}).get('epochs', '?')} epochs"
    if before > 0.5:
        note += f"; {before:.1f} GiB held before the run"
    return [n, args.max_new_tokens, peak, metrics_cell(row, "gen_seconds"),
            metrics_cell(row, "score_seconds"), metrics_cell(row, "ppo_seconds"),
            metrics_cell(row, "seconds"), f"{wall:.0f}", note]


def model_part(args, key, rows, deadline):
    name, builder = MODELS[key]
    path = tempfile.mkdtemp(prefix=f"gpu_check_{key}_", dir=args.tmp_dir)
    blank = ["", "", "", "", "", "", "", ""]
    try:
        t0 = time.time()
        cls, config, processor, gen = builder(args.cpu_smoke)
        with torch.device(args.device):
            model = cls._from_config(config, dtype=torch.bfloat16)
        model.generation_config = gen
        params = sum(p.numel() for p in model.parameters()) / 1e9
        model.save_pretrained(path)
        processor.save_pretrained(path)
        del model
        log(f"({key}) {name}: {params:.2f}B parameters, built and saved to {path} "
            f"in {time.time() - t0:.0f} s")
        if args.cpu_smoke:  # the full-size shapes, counted on the meta device
            full_cls, full_config = builder(False)[:2]
            with torch.device("meta"):
                full = full_cls._from_config(full_config)
            full_params = sum(p.numel() for p in full.parameters()) / 1e9
            log(f"({key}) full size (meta device): {full_params:.2f}B parameters")
        last = 0.0
        for n in args.sizes:
            if time.time() + 1.3 * last > deadline:
                skipped = f"skipped: past --budget-s {args.budget_s:.0f}"
                rows.append([name, n] + blank[:-1] + [skipped])
                continue
            t1 = time.time()
            log(f"({key}) {name}: one PPO update with {n} envs ...")
            save = args.save_all or n == args.sizes[0]
            try:
                rows.append([name] + ppo_update(args, path, n, cls, processor, save))
            except (Exception, SystemExit) as e:  # vlm_rl reports bad input with sys.exit
                rows.append([name, n] + blank[:-1] + [one_line(e)])
            last = time.time() - t1
            log("   ", " | ".join(map(str, rows[-1])), f"({last:.0f} s)")
    except (Exception, SystemExit) as e:
        rows.append([name, ""] + blank[:-1] + [one_line(e)])
        log(f"({key}) {name} failed: {one_line(e)}")
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fmt_success(v):
    return "n/a" if v is None else f"{v:.3f}"


def default_run(args):
    d = tempfile.mkdtemp(prefix="gpu_check_a_", dir=args.tmp_dir)
    argv = ["--env", "numberline", "--device", args.device, "--out-dir", d]
    if args.cpu_smoke:
        argv += ["--sft-steps", "4", "--total-steps", "32", "--num-envs", "8",
                 "--eval-episodes", "4", "--max-new-tokens", "8"]
    try:
        t0 = time.time()
        s = vlm_rl.main(argv)
        shown = " ".join(argv[:4] + argv[6:])  # without --out-dir
        return (f"(a) default run `{shown}`: success after SFT {fmt_success(s['sft_success'])}, "
                f"after RL {fmt_success(s['rl_success'])} ({s['eval_episodes']} eval episodes); "
                f"wall {time.time() - t0:.0f} s (summary wall_seconds {s['wall_seconds']})")
    except (Exception, SystemExit) as e:
        return f"(a) default run failed: {one_line(e)}"
    finally:
        shutil.rmtree(d, ignore_errors=True)


def torchrun_part(args):
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    if gpus < 2 and not args.cpu_smoke:
        return f"(d) 2-rank torchrun: skipped ({gpus} GPU)"
    d = tempfile.mkdtemp(prefix="gpu_check_d_", dir=args.tmp_dir)
    if args.cpu_smoke:
        extra = ["--sft-steps", "2", "--total-steps", "32", "--max-new-tokens", "8",
                 "--eval-episodes", "2", "--device", "cpu"]
    else:
        extra = ["--sft-steps", "30", "--total-steps", "256", "--eval-episodes", "8"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "vlm_rl.py", "--env", "numberline", "--num-envs", "4"] + extra
    try:
        t0 = time.time()
        p = subprocess.run(cmd + ["--out-dir", d], cwd=ROOT, capture_output=True, text=True,
                           timeout=240)
        output = (p.stdout + p.stderr).splitlines()
        tail = [ln for ln in output if ln.strip() and "%|" not in ln][-3:]  # no progress bars
        return (f"(d) `torchrun {' '.join(cmd[3:])}`: exit code {p.returncode} in "
                f"{time.time() - t0:.0f} s; last lines: {' / '.join(tail)[-600:]}")
    except Exception as e:
        return f"(d) torchrun failed: {one_line(e)}"
    finally:
        shutil.rmtree(d, ignore_errors=True)


def report(args, rows, lines, t_start):
    import transformers
    if args.device == "cuda":
        gpu = torch.cuda.get_device_name(0)
    else:
        gpu = "CPU smoke test (--cpu-smoke: shrunk models)"
    if args.epochs:
        epochs = f"--epochs {args.epochs} (reduced for time)"
    else:
        epochs = "of the numberline preset"
    versions = (f"torch {torch.__version__}, transformers {transformers.__version__}, "
                f"Python {sys.version.split()[0]}, "
                f"{datetime.datetime.now().isoformat(timespec='seconds')}, "
                f"{time.time() - t_start:.0f} s")
    setup = (f"One PPO update per row: `--num-steps 1 --lora-rank {8 if args.cpu_smoke else 64} "
             f"--gradient-checkpointing --dtype bfloat16 --micro-batch {MICRO_BATCH} "
             f"--eval-episodes 0`, minibatch = num_envs, PPO epochs {epochs}. "
             f"Random weights never end an answer: each has {args.max_new_tokens} new tokens "
             "(worst case). Seconds from the run's metrics.csv (total = the whole update); "
             "main() wall = the whole vlm_rl.main call, which adds loading the model, merging "
             "LoRA and saving the merged model "
             f"({'every size' if args.save_all else 'first size only'}).")
    header = ("| model | num_envs | new tokens/answer | peak GPU memory (GiB) | generate s "
              "| scoring s | PPO epochs s | total s | main() wall s | note |")
    rule = "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    table = ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    text = "\n".join([f"# gpu_check: {gpu}", "", versions, "", setup, "", header, rule,
                      *table, "", *lines]) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="a,b,c,d",
                   help="which of a,b,c,d to run, in this order (default all)")
    p.add_argument("--sizes", default=None, help="num_envs for (b) and (c) (default 4,8,16)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="the Markdown report (default docs/gpu_check.md in the repository)")
    p.add_argument("--skip-default-run", action="store_true", help="skip part (a)")
    p.add_argument("--epochs", type=int, default=None,
                   help="PPO epochs in (b)/(c) (default: vlm_rl's preset)")
    p.add_argument("--budget-s", type=float, default=450,
                   help="start nothing past this many seconds (default 450)")
    p.add_argument("--tmp-dir", default=None,
                   help="for the saved models (default /dev/shm with 40 GB free, else /tmp)")
    p.add_argument("--save-all", action="store_true",
                   help="save the merged model after every size, not the first only")
    p.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("gpu_check.py: error: CUDA is not available; this check needs an NVIDIA GPU")
    parts = []
    for x in args.parts.replace(" ", "").split(","):
        if x and not (x == "a" and args.skip_default_run):
            parts.append(x)
    if set(parts) - set("abcd"):
        sys.exit(f"gpu_check.py: error: --parts takes letters from a,b,c,d, not {args.parts!r}")
    if args.cpu_smoke:
        args.device, args.max_new_tokens = "cpu", 8
    else:
        args.device, args.max_new_tokens = "cuda", 256
    sizes = args.sizes or ("4,8" if args.cpu_smoke else "4,8,16")
    args.sizes = [int(s) for s in sizes.split(",")]
    if args.tmp_dir is None:
        shm = os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 40e9
        args.tmp_dir = "/dev/shm" if shm else tempfile.gettempdir()
    t_start = time.time()
    rows, lines = [], []
    log(f"gpu_check: parts {parts}, sizes {args.sizes}, device {args.device}, "
        f"temp dir {args.tmp_dir}")
    for part in parts:
        if time.time() > t_start + args.budget_s - 30:
            lines.append(f"({part}) skipped: past --budget-s {args.budget_s:.0f}")
        elif part in MODELS:
            model_part(args, part, rows, t_start + args.budget_s)
        else:
            run_part = default_run if part == "a" else torchrun_part
            lines.append(run_part(args))
            log(lines[-1])
        log(f"--- part {part} done at {time.time() - t_start:.0f} s")
        report(args, rows, lines, t_start)
    log("\n" + report(args, rows, lines, t_start))


if __name__ == "__main__":
    main()
