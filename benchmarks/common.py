"""What the benchmark scripts share: the random models they time, the workloads, timing and the GPU's measured
peaks. Nothing here runs on import; torch and transformers are imported inside the functions that need them.

- Models: `random_qwen2` (a random-initialised Qwen2 of DeepSeek-R1-Distill-Qwen-1.5B's shape, or a tiny one,
  seeded: the same weights in every script), `make_model_dir` (the same, saved with `synthetic_tokenizer` as a
  folder both mathgrpo and TRL load), `tiny_nf4_lora_model` (a tiny Qwen2 with bitsandbytes NF4 projections and
  peft LoRA, for CPU host-cost timings).
- Workloads: `WORKLOADS` (prompts x group x completion length, optionally uneven lengths drawn from a seeded
  log-normal), `drawn_lengths`, `prompt_ids`, `canned_completions` (random tokens of the drawn lengths: the
  update's work without sampling), `random_rewards`, `mathgrpo_config` (the trainer config every script uses).
- Measuring: `sync`, `reset_peak` / `peak_gib` / `allocated_gib` (CUDA memory), `timed`, `matmul_peak_tflops`
  (the bf16 matmul rate), `copy_bandwidth` (device-to-device bytes per second), `update_flops` (useful FLOPs of
  one update).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: subprocesses run from here

SHAPES = {
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=False),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=1000, max_position_embeddings=4096, tie_word_embeddings=False),
}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = dict(r=32, alpha=32, dropout=0.0)
BETA = 0.04
UNEVEN_SIGMA = 1.615  # log-normal sigma: P(length > 8192) = 15% at a median of 1536
LENGTH_SEED = 17


# ----------------------------------------------------------------------------- subprocesses


def module_command(module: str, *args: str) -> list[str]:
    """The command running `python -m <module> args` with this interpreter (scripts run each measurement in a
    child process: clean peak memory, and a stuck run can be stopped)."""
    return [sys.executable, "-m", module, *args]


def child_env(**extra: str) -> dict:
    """This process's environment for a child benchmark process: the repository first on PYTHONPATH (so
    `benchmarks` imports from any working directory), unbuffered output, plus `extra`."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **extra}


# ----------------------------------------------------------------------------- models


def synthetic_tokenizer(vocab: int):
    """A word-level tokenizer over the whole vocabulary ("w0" .. "w{vocab-1}"; id 0 is EOS and padding): no real
    tokenizer needs fetching on a GPU machine without network."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="w0", eos_token="w0")


def random_qwen2(shape: str, device, dtype, *, lora: bool = False, max_positions: int | None = None):
    """A random-initialised Qwen2 of SHAPES[shape] (seed 0, sdpa attention, EOS = padding = id 0), in eval mode.
    lora=True wraps it in peft LoRA (LORA's rank on all seven projections) with B drawn from N(0, 0.01) instead
    of peft's zeros, so the deltas cost what real ones do."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    extra = {"max_position_embeddings": max_positions} if max_positions else {}
    cfg = Qwen2Config(**{**SHAPES[shape], **extra}, eos_token_id=0, pad_token_id=0, bos_token_id=None,
                      attn_implementation="sdpa")
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = 0
    model.generation_config.pad_token_id = 0
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                                 target_modules=list(PROJECTIONS))).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.01)
    return model


def make_model_dir(args) -> None:
    """random_qwen2(args.shape) saved with its synthetic tokenizer to args.model_dir (bf16 on a GPU, fp32 on
    CPU; 131,072 positions), the folder every method of a comparison loads."""
    import torch

    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    model = random_qwen2(args.shape, args.device, dtype, max_positions=131072)
    model.save_pretrained(args.model_dir)
    synthetic_tokenizer(SHAPES[args.shape]["vocab_size"]).save_pretrained(args.model_dir)


def load_tokenizer(model_dir: str):
    """The synthetic tokenizer of a make_model_dir folder, prepared as the trainer prepares one."""
    # AutoTokenizer would pick Qwen2Tokenizer from config.json's model_type and mangle the word-level vocab.
    from transformers import PreTrainedTokenizerFast

    from mathgrpo.loading import prepare_tokenizer

    return prepare_tokenizer(PreTrainedTokenizerFast.from_pretrained(model_dir))


def tiny_nf4_lora_model(layers: int = 2, vocab: int = 97, seed: int = 0):
    """A tiny fp32 Qwen2 (hidden 64) on CPU whose seven projections are bitsandbytes NF4 layers, with peft LoRA
    r=4 as the trainer adds it and random B matrices: the Python and autograd cost of a 4-bit LoRA update with
    negligible arithmetic."""
    import bitsandbytes as bnb
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mathgrpo.config import ModelConfig
    from mathgrpo.models import add_lora

    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=False,
                      attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                          compute_dtype=torch.float32, quant_type="nf4", device="cpu")
                    q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True)._quantize("cpu")
                    if lin.bias is not None:
                        q.bias = lin.bias
                    setattr(parent, name, q)
    model.is_loaded_in_4bit = True  # what transformers sets on a 4-bit model; peft picks its 4-bit LoRA layers by it
    model = add_lora(model, ModelConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return model


# ----------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    quant: str | None
    prompts: int
    group: int
    new_tokens: int
    trl_micro: int  # completions per TRL micro-batch (per_device_train_batch_size)
    median: int | None = None  # uneven lengths: log-normal median (new_tokens is the cap); None = full length

    def with_new_tokens(self, new_tokens: int) -> Workload:
        """The same workload at another completion cap; an uneven one keeps its shape (the median scales)."""
        median = None if self.median is None else max(1, self.median * new_tokens // self.new_tokens)
        return replace(self, new_tokens=new_tokens, median=median)


WORKLOADS = {
    "lora-1k": Workload(None, 8, 8, 1024, 8),  # 8 prompts x 8 completions x 1,024 tokens, 8 per TRL micro-batch
    "qlora-2k": Workload("nf4", 1, 4, 2048, 4),  # one prompt, G=4, 2,048 tokens, NF4 (a Colab notebook's shape)
    "lora-4k": Workload(None, 1, 8, 4096, 8),
    "uneven-8k": Workload(None, 8, 8, 8192, 8, median=1536),  # real, uneven lengths (see drawn_lengths)
}


def drawn_lengths(w: Workload) -> list[int]:
    """Completion lengths [N] of a workload: all new_tokens, or one seeded log-normal draw cut at the cap."""
    import numpy as np

    n = w.prompts * w.group
    if w.median is None:
        return [w.new_tokens] * n
    x = np.exp(np.random.default_rng(LENGTH_SEED).normal(np.log(w.median), UNEVEN_SIGMA, n))
    return np.clip(x, 1, w.new_tokens).astype(int).tolist()


def prompt_ids(args, w: Workload) -> list[list[int]]:
    """w.prompts seeded random prompts of args.prompt_len tokens (never id 0: EOS / padding)."""
    import torch

    g = torch.Generator().manual_seed(1)
    vocab = SHAPES[args.shape]["vocab_size"]
    return torch.randint(1, vocab, (w.prompts, args.prompt_len), generator=g).tolist()


def canned_completions(args, w: Workload, eos: int = 0):
    """Completions of the drawn lengths made of random tokens (gen=canned): the update's work, no sampling.
    A row shorter than the cap ends with EOS; a row at the cap is truncated."""
    import torch

    from mathgrpo.rollout import Completions

    lengths = drawn_lengths(w)
    n, width = len(lengths), max(lengths)
    g = torch.Generator().manual_seed(LENGTH_SEED)
    ids = torch.randint(1, SHAPES[args.shape]["vocab_size"], (n, width), generator=g)
    mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]  # [N, T]
    truncated = torch.tensor([k >= w.new_tokens for k in lengths])
    for i, k in enumerate(lengths):
        if not truncated[i]:
            ids[i, k - 1] = eos
    prompts = [p for p in prompt_ids(args, w) for _ in range(w.group)]
    return Completions(prompt_ids=prompts, completion_ids=ids.masked_fill(~mask, eos), completion_mask=mask,
                       texts=[""] * n, truncated=truncated)


def random_rewards(n: int, step: int):
    import torch

    return torch.rand(n, generator=torch.Generator().manual_seed(1000 + step))  # [N]


def parse_options(spec: str, where: str) -> dict:
    """'key=value:key=value' -> {key: value}; where names the argument in the error."""
    opts = {}
    for pair in (p for p in spec.split(":") if p):
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"{where} {spec}: options are key=value, got '{pair}'")
        opts[key] = value
    return opts


def mathgrpo_config(args, w: Workload, opts: dict):
    """The trainer config of a benchmark run: args.model_dir on args.device (bf16 on a GPU), LoRA r=32 on the
    seven projections, sdpa, gradient checkpointing, beta 0.04, loss "grpo", lr 1e-6 constant; method options
    (benchmarks.step's docstring) override backend, merge, budget, chunk, pack, gc, lora, release, dtype and
    kernels."""
    from mathgrpo.config import Config

    cfg = Config()
    m = cfg.model
    m.name_or_path, m.device, m.quantization = args.model_dir, args.device, w.quant
    m.dtype = {"fp16": "float16", "bf16": "bfloat16"}.get(opts.get("dtype"), "bfloat16" if args.device != "cpu"
                                                                               else "float32")
    cfg.generation.kernels = opts.get("kernels", "auto")
    m.lora_r, m.lora_alpha, m.lora_dropout = LORA["r"], LORA["alpha"], LORA["dropout"]
    m.lora_target_modules, m.attn_implementation = list(PROJECTIONS), "sdpa"
    cfg.generation.backend = opts.get("backend", getattr(args, "backend", "auto"))
    cfg.generation.lora_merge = opts.get("merge", "copy")
    cfg.generation.max_new_tokens, cfg.generation.temperature = w.new_tokens, 1.0
    cfg.grpo.num_generations, cfg.grpo.beta, cfg.grpo.loss_type = w.group, BETA, "grpo"
    t = cfg.trainer
    t.max_tokens_per_microbatch = int(opts["budget"]) if "budget" in opts else t.max_tokens_per_microbatch  # or auto
    t.logprob_chunk_size = int(opts["chunk"]) if "chunk" in opts else t.logprob_chunk_size
    t.pack_sequences = opts.get("pack", "0") == "1"
    m.gradient_checkpointing = opts.get("gc", "layer") != "none"
    m.lora_fused_add = opts.get("lora", "nf4") != "peft"
    t.learning_rate, t.max_steps, t.lr_scheduler = 1e-6, args.steps, "constant"
    if opts.get("release") == "0":  # release=1 frees before the update in benchmarks.step; 0 turns the default off
        cfg.generation.release_memory = False
    return cfg


# ----------------------------------------------------------------------------- measuring


def sync() -> None:
    """Wait for the GPU (a no-op without CUDA): put one on each side of a wall-clock timing."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def allocated_gib() -> float:
    """CUDA memory allocated now, GiB (nan without CUDA)."""
    import torch

    return round(torch.cuda.memory_allocated() / 2**30, 3) if torch.cuda.is_available() else float("nan")


def peak_gib() -> float:
    """Peak CUDA memory allocated since the last reset_peak, GiB (nan without CUDA)."""
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else float("nan")


def timed(fn, reps: int = 1) -> float:
    """Seconds per call of fn over reps calls, synchronised on both sides."""
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def matmul_peak_tflops(n: int = 8192, reps: int = 10) -> float:
    """The GPU's measured bf16 matmul rate (n^3 on random data, mean of `reps` after 3 warm-ups)."""
    import torch

    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    tflops = 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return tflops


def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth of a 2 GiB buffer, bytes read + written per second (nan off CUDA)."""
    import torch

    if device.type != "cuda":
        return float("nan")
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(10):
        y.copy_(x)
    b.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (a.elapsed_time(b) / 1e3)


def markdown_table(rows: list[dict], cols: list[str]) -> str:
    """rows as a markdown table over the columns of `cols` any row has (floats to 2 decimals, blanks for gaps)."""
    cols = [c for c in cols if any(c in r for r in rows)]
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join([" | ".join(cols), " | ".join("---" for _ in cols)]
                     + [" | ".join(fmt(r.get(c, "")) for c in cols) for r in rows])


def update_flops(args, rows: list[tuple[int, int]]) -> float:
    """Model FLOPs of one LoRA update over rows of (total length L, completion tokens T_c):
        3 * F_fwd + F_attn + 6 * P_lora * L    (reference forward, policy forward, backward to activations,
                                                LoRA weight gradients)
        F_fwd = 2 * P_body * L + 2 * V * H * T_c + F_attn,   F_attn = 2 * layers * L^2 * heads * head_dim
    (lm_head runs on completions only); checkpoint recomputation and padding are not counted."""
    s = SHAPES[args.shape]
    h, n_l, inter, v = s["hidden_size"], s["num_hidden_layers"], s["intermediate_size"], s["vocab_size"]
    hd = h // s["num_attention_heads"]
    q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
    dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    p_body = n_l * sum(a * b for a, b in dims.values())
    p_lora = n_l * sum(LORA["r"] * (a + b) for a, b in dims.values())
    total = 0.0
    for L, tc in rows:
        attn = 2.0 * n_l * L * L * q
        fwd = 2.0 * p_body * L + 2.0 * v * h * tc + attn
        total += 3 * fwd + attn + 6.0 * p_lora * L
    return total
