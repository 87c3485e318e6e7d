"""One GRPO training step, end to end: mathgrpo vs TRL's GRPOTrainer on the same workload.

    PYTHONPATH=src python benchmarks/step.py                                  # all workloads, mathgrpo + TRL, CUDA
    PYTHONPATH=src python benchmarks/step.py --workloads lora-1k --methods mathgrpo trl
    PYTHONPATH=src python benchmarks/step.py --tiny                           # seconds-long CPU smoke test
    PYTHONPATH=src python benchmarks/step.py --methods mathgrpo:budget=8192:release=1   # method options

The model is a random-initialised Qwen2 of DeepSeek-R1-Distill-Qwen-1.5B's shape (bf16, sdpa; NF4 for
the QLoRA workload) with a word-level tokenizer over its whole vocabulary, saved once to a folder that
both frameworks load. LoRA r=32, alpha=32, dropout 0 on all seven projections, beta 0.04, loss "grpo",
gradient checkpointing, random rewards. Completions are forced to full length (mathgrpo: ignore_eos;
TRL: generation_kwargs min_new_tokens), except on the uneven workload (`uneven-8k`): there every
completion's length is drawn once from a seeded log-normal (median 1,536 tokens, sigma 1.615, cut at the
8,192 cap: ~15% truncated) and imposed on both (TRL: a logits processor forcing EOS at the drawn length;
mathgrpo's fast engine: its sampler forbids EOS before the drawn length and forces it there, so rows
really finish and leave the decode batch; the HF backend: sampled with ignore_eos to the longest drawn
length, then each row cut there). Method option gen=canned skips sampling altogether (random tokens of the
drawn lengths) to time the update alone; mathgrpo option compact=0 keeps finished rows in the batch (the
engine before compaction); trl option gen_steps=<n> stops TRL's generation after n steps (the drawn lengths
cut at n): HF generate runs every row to the batch's longest, and a step costs no less as the cache grows,
so (cap / n) x that generation time is a lower bound on TRL's whole generation at the cap.
Every (workload, method) runs in its own subprocess, so peak memory (torch.cuda.max_memory_allocated) is
clean, and a stuck run is stopped at --timeout. The GPU's bf16 matmul peak (8192^3, mean of 10) is
measured at the start of the run and every update's TFLOP/s is reported as a share of it.

Printed per run: first step and steady step (mean of the later ones) split into generation and update
(update = everything after the completions exist: reference and policy log-probs, loss, backward,
optimizer step, weight sync), peak memory of each phase, and the update's achieved TFLOP/s:
    model FLOPs = ref forward + policy forward + policy backward to activations + LoRA weight grads
                = 3 * F_fwd + F_attn + 6 * P_lora * L
    F_fwd  = 2 * P_body * L + 2 * V * H * T_c + F_attn,   F_attn = 2 * layers * L^2 * heads * head_dim
per row of L = prompt + completion tokens and T_c completion tokens (lm_head runs on completions only);
gradient-checkpoint recomputation and padding are not counted (work the GPU does, not useful FLOPs).
Methods: mathgrpo (the trainer's own `policy_update` and rollout backend), options budget=<tokens per
micro-batch>, chunk=<log-prob chunk>, release=1 (free the fast engine's KV cache and owned weight copy before the update;
the trainer's default does it for the NF4 workload anyway; release=0 turns that default off),
backend=fast|hf, merge=copy|in_place|none (generation.lora_merge: how LoRA reaches sampling; copy = a
merged weight copy), fused=1 (models.fuse_kernels: liger's RMSNorm/SwiGLU/RoPE kernels), pack=1
(trainer.pack_sequences), gc=layer|none (activation checkpointing), lora=nf4|addmm|peft (model.lora_fused_add; nf4, the default:
qlora.NF4LoRA on 4-bit layers; addmm: the one-GEMM add there too; peft: off),
lmhead=triton|torch (lmhead.py's fused log-prob kernels or the plain chunked path), gen=canned; mathgrpo-liger (same, loss from liger-kernel's LigerFusedLinearGRPOLoss); trl (option gen=canned).
prof=1 (mathgrpo and trl, CUDA): one more update (TRL: one more step) after the timed ones, under torch.profiler,
not counted in the times: its kernel time by kind and the passes it ran (profiling.py), printed and in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rollout import SHAPES, synthetic_tokenizer  # noqa: E402  (benchmarks/rollout.py)

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = dict(r=32, alpha=32, dropout=0.0)
BETA = 0.04
UNEVEN_SIGMA = 1.615  # log-normal sigma: P(length > 8192) = 15% at a median of 1536
LENGTH_SEED = 17


@dataclass
class Workload:
    quant: str | None
    prompts: int
    group: int
    new_tokens: int
    trl_micro: int  # completions per TRL micro-batch (per_device_train_batch_size)
    median: int | None = None  # uneven lengths: log-normal median (new_tokens is the cap); None = full length


WORKLOADS = {
    "lora-1k": Workload(None, 8, 8, 1024, 8),  # the TRL reference: 8 x 8 x 1024, 8 per micro-batch
    "qlora-2k": Workload("nf4", 1, 4, 2048, 4),  # the notebook: one prompt, G=4, 2048 tokens, NF4
    "lora-4k": Workload(None, 1, 8, 4096, 8),
    "uneven-8k": Workload(None, 8, 8, 8192, 8, median=1536),  # real, uneven lengths (see the docstring)
}


def drawn_lengths(w: Workload) -> list[int]:
    """Completion lengths [N] of a workload: all new_tokens, or one seeded log-normal draw cut at the cap."""
    import numpy as np

    n = w.prompts * w.group
    if w.median is None:
        return [w.new_tokens] * n
    x = np.exp(np.random.default_rng(LENGTH_SEED).normal(np.log(w.median), UNEVEN_SIGMA, n))
    return np.clip(x, 1, w.new_tokens).astype(int).tolist()


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


def force_fast_lengths(rollout, lengths: list[int], eos: int, cap: int) -> None:
    """The fast engine's sampler gets EOS forbidden before each row's drawn length and forced at it (rows in
    prompt-major order, one batch), as force_trl_lengths does for TRL: rows really finish, and leave the batch."""
    import torch

    from mathgrpo.rollout import fast

    want = torch.tensor(lengths, device=rollout.device)  # [N]
    stops = want < cap  # a row drawn at the cap runs out of tokens instead: truncated
    orig_run, orig_sample, step = rollout._run_batch, fast.sample, [0]

    def sample(logits, *a, **k):  # logits [n, V]: the decode slots in use, slot j holding row slot_rows[j]
        rows = rollout.slot_rows  # a slice (all rows) or the row index of each slot
        end = (want[rows] - 1 == step[0]) & stops[rows]  # [n]: EOS is next
        logits[:, eos] = float("-inf")
        logits[end] = float("-inf")
        logits[end, eos] = 0.0
        step[0] += 1
        return orig_sample(logits, *a, **k)

    def run_batch(*a, **k):
        step[0] = 0
        return orig_run(*a, **k)

    fast.sample, rollout._run_batch = sample, run_batch


def impose_lengths(comp, lengths: list[int], cap: int, eos: int = 0):
    """Cut sampled completions (ignore_eos, at least max(lengths) long) at the drawn lengths, EOS last."""
    from dataclasses import replace

    ids, mask = comp.completion_ids[:, :max(lengths)].clone(), comp.completion_mask[:, :max(lengths)].clone()
    for i, k in enumerate(lengths):
        mask[i, k:] = False
        ids[i, k:] = eos
        if k < cap:
            ids[i, k - 1] = eos
    import torch

    return replace(comp, completion_ids=ids, completion_mask=mask,
                   truncated=torch.tensor([k >= cap for k in lengths]),
                   logprobs=None if comp.logprobs is None else comp.logprobs[:, :max(lengths)] * mask)


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


# ----------------------------------------------------------------------------- shared pieces


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_reset():
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _allocated() -> float:
    import torch

    return round(torch.cuda.memory_allocated() / 2**30, 3) if torch.cuda.is_available() else float("nan")


def _peak() -> float:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else float("nan")


def make_model_dir(args) -> None:
    """Random-init model + synthetic tokenizer saved as a HF folder (the same weights for every method)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = {**SHAPES[args.shape], "max_position_embeddings": 131072}
    cfg = Qwen2Config(**shape, eos_token_id=0, pad_token_id=0, bos_token_id=None)
    with torch.device(args.device):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16 if args.device != "cpu" else torch.float32)
    model.generation_config.eos_token_id = 0
    model.generation_config.pad_token_id = 0
    model.save_pretrained(args.model_dir)
    synthetic_tokenizer(shape["vocab_size"]).save_pretrained(args.model_dir)


def load_tokenizer(model_dir: str):
    # AutoTokenizer would pick Qwen2Tokenizer from config.json's model_type and mangle the word-level vocab.
    from transformers import PreTrainedTokenizerFast

    from mathgrpo.loading import prepare_tokenizer

    return prepare_tokenizer(PreTrainedTokenizerFast.from_pretrained(model_dir))


def prompt_ids(args, w: Workload) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(1)
    vocab = SHAPES[args.shape]["vocab_size"]
    return torch.randint(1, vocab, (w.prompts, args.prompt_len), generator=g).tolist()  # id 0 is eos/pad


def update_flops(args, rows: list[tuple[int, int]]) -> float:
    """Model FLOPs of one update over rows of (total length L, completion tokens T_c); see the docstring."""
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


def random_rewards(n: int, step: int):
    import torch

    return torch.rand(n, generator=torch.Generator().manual_seed(1000 + step))  # [N]


# ----------------------------------------------------------------------------- mathgrpo


def _mathgrpo_cfg(args, w: Workload, opts: dict):
    from mathgrpo.config import Config

    cfg = Config()
    m = cfg.model
    m.name_or_path, m.device, m.quantization = args.model_dir, args.device, w.quant
    m.dtype = "bfloat16" if args.device != "cpu" else "float32"
    m.lora_r, m.lora_alpha, m.lora_dropout = LORA["r"], LORA["alpha"], LORA["dropout"]
    m.lora_target_modules, m.gradient_checkpointing, m.attn_implementation = list(PROJECTIONS), True, "sdpa"
    cfg.generation.backend = opts.get("backend", args.backend)
    cfg.generation.lora_merge = opts.get("merge", "copy")
    cfg.generation.max_new_tokens, cfg.generation.temperature = w.new_tokens, 1.0
    cfg.grpo.num_generations, cfg.grpo.beta, cfg.grpo.loss_type = w.group, BETA, "grpo"
    t = cfg.trainer
    t.max_tokens_per_microbatch = int(opts["budget"]) if "budget" in opts else t.max_tokens_per_microbatch
    t.logprob_chunk_size = int(opts["chunk"]) if "chunk" in opts else t.logprob_chunk_size
    t.pack_sequences = opts.get("pack", "0") == "1"
    m.gradient_checkpointing = opts.get("gc", "layer") != "none"
    m.lora_fused_add = opts.get("lora", "nf4") != "peft"
    t.learning_rate, t.max_steps, t.lr_scheduler = 1e-6, args.steps, "constant"
    if opts.get("release") == "0":  # release=1 frees before the update in run_mathgrpo; 0 turns the default off
        cfg.generation.release_memory = False
    return cfg


def liger_update(model, optimizer, scheduler, ref, comp, adv, cfg, opts: dict) -> dict:
    """policy_update with the loss from liger-kernel's fused linear GRPO loss (same micro-batches, same
    adapter-off reference log-probs); liger's "grpo" mean is per micro-batch, so rescale by its rows."""
    import torch
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    from mathgrpo.models import backbone_and_head, completion_hidden, completion_logprobs
    from mathgrpo.update import microbatches

    t = cfg.trainer
    mask = comp.completion_mask.float()  # [N, T]
    lengths = comp.completion_mask.sum(1).tolist()
    groups = microbatches([len(p) + int(n) for p, n in zip(comp.prompt_ids, lengths)], t.max_tokens_per_microbatch)
    fn = LigerFusedLinearGRPOLoss(beta=cfg.grpo.beta, use_ref_model=True, loss_type="grpo",
                                  compiled=torch.cuda.is_available() and opts.get("compiled", "1") == "1", temperature=cfg.generation.temperature)
    _, head = backbone_and_head(model)
    device = head.weight.device
    optimizer.zero_grad(set_to_none=True)
    for rows in groups:
        width = max(1, max(lengths[i] for i in rows))
        p, c = [comp.prompt_ids[i] for i in rows], comp.completion_ids[rows, :width]
        with torch.no_grad(), ref.context(model) as rm:
            lp_ref = completion_logprobs(rm, p, c, chunk_size=t.logprob_chunk_size)  # [B, T]
        h = completion_hidden(model, p, c)  # [B, T, H]
        out = fn(h, head.weight, c.to(device), mask[rows, :width].to(device), adv[rows].to(device),
                 ref_per_token_logps=lp_ref)
        (out[0] * len(rows) / len(lengths)).backward()
    params = [q for q in model.parameters() if q.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
    optimizer.step()
    scheduler.step()
    return {}


def run_mathgrpo(args, w: Workload, opts: dict) -> dict:
    import torch

    from mathgrpo.advantages import group_advantages
    from mathgrpo.models import Reference, load_model
    from mathgrpo.rollout import SamplingConfig, make_rollout
    from mathgrpo.update import make_optimizer, update_stage

    cfg = _mathgrpo_cfg(args, w, opts)
    model, _ = load_model(cfg.model, trainable=True)
    if opts.get("lora") == "addmm":  # the addmm path on 4-bit layers too, not qlora.NF4LoRA
        from mathgrpo.models import fuse_lora_add

        fuse_lora_add(model, qlora=False)
    if opts.get("fused"):
        from mathgrpo.models import completion_logprobs, fuse_kernels

        probe = (prompt_ids(args, w)[:2], torch.randint(1, SHAPES[args.shape]["vocab_size"], (2, 64)))
        with torch.no_grad():
            before = completion_logprobs(model, *probe)
            fuse_kernels(model)
            diff = (completion_logprobs(model, *probe) - before).abs().max().item()
        print(f"[{args.worker}] fused kernels: max |logp change| on a probe = {diff:.3g}", flush=True)
    from mathgrpo import lmhead

    lmhead.set_fused(opts.get("lmhead", "triton") == "triton")
    tok = load_tokenizer(args.model_dir)
    canned = opts.get("gen") == "canned"
    rollout = None if canned else make_rollout(cfg.generation, model, tok)
    if opts.get("compact") == "0" and rollout is not None:
        rollout.compact = False  # finished rows stay in the batch to the longest row's end (the engine before)
    ref = Reference(model, cfg.grpo.beta, lora=True)
    optimizer, scheduler = make_optimizer(model, cfg)
    prompts = prompt_ids(args, w)
    forced = w.median is not None and hasattr(rollout, "slot_rows")  # uneven, fast engine: EOS at the lengths
    if forced:
        force_fast_lengths(rollout, drawn_lengths(w), tok.eos_token_id, w.new_tokens)
    steps, rows = [], None
    for step in range(args.steps):
        _peak_reset()
        _sync()
        resident = _allocated()  # what stays allocated between steps: must not grow
        t0 = time.perf_counter()
        lengths = drawn_lengths(w)
        if canned:
            comp = canned_completions(args, w)
        else:
            comp = rollout.generate(prompts, w.group, SamplingConfig(max_new_tokens=max(lengths), temperature=1.0,
                                                                     ignore_eos=not forced, seed=step))
            if w.median is not None and not forced:
                comp = impose_lengths(comp, lengths, w.new_tokens)
        _sync()
        t1, peak_gen = time.perf_counter(), _peak()
        if opts.get("release") == "1" and hasattr(rollout, "release"):
            rollout.release(weights=True)
        # what the rollout engine keeps through the update: its owned (merged / dequantised) weights, its KV cache
        held = {k: getattr(rollout, a, 0) / 2**30 for k, a in (("owned_weights_gib", "owned_weight_bytes"),
                                                                ("kv_cache_gib", "kv_cache_bytes"))}
        _peak_reset()
        t2 = time.perf_counter()
        adv = group_advantages(random_rewards(comp.completion_ids.shape[0], step), w.group)  # [N]
        if opts.get("liger"):
            upd = liger_update(model, optimizer, scheduler, ref, comp, adv, cfg, opts)
            if rollout is not None:
                rollout.sync_weights(model)
        else:  # the trainer's update stage (gradients freed, weights synced)
            upd = update_stage(model, optimizer, scheduler, ref, comp, adv, cfg, rollout=rollout)
        _sync()
        t3 = time.perf_counter()
        rows = [(len(p) + int(n), int(n)) for p, n in zip(comp.prompt_ids, comp.lengths)]
        steps.append(dict(gen_s=t1 - t0, update_s=t3 - t2, step_s=(t1 - t0) + (t3 - t2), resident_gib=resident,
                          peak_gen_gib=peak_gen,
                          peak_update_gib=_peak(), completion_tokens=int(comp.lengths.sum()),
                          graphs_captured=getattr(rollout, "captures", None), truncated=int(comp.truncated.sum()),
                          compactions=getattr(rollout, "compactions", None),
                          **{k: round(v, 3) for k, v in held.items()},
                          **{k: round(upd[k], 6) for k in ("loss", "grad_norm", "kl") if k in upd}))
        print(f"[{args.worker}] step {step}: {json.dumps(steps[-1])}", flush=True)
    backend = "canned" if canned else type(rollout).__name__
    extra = {}
    if opts.get("prof") == "1" and torch.cuda.is_available():  # one more update (the last rows) under the profiler
        from profiling import PassCounter, profile_call

        adv = group_advantages(random_rewards(comp.completion_ids.shape[0], args.steps), w.group)
        with PassCounter(model) as passes:
            extra["profile"] = profile_call(lambda: update_stage(model, optimizer, scheduler, ref, comp, adv, cfg,
                                                                 rollout=rollout), lora_rank=LORA["r"])
        extra["profile"].update(passes.summary())
    return dict(steps=steps, rows=rows, backend=backend, **extra, budget=cfg.trainer.max_tokens_per_microbatch,
                chunk=cfg.trainer.logprob_chunk_size)


# ----------------------------------------------------------------------------- TRL


def run_trl(args, w: Workload, opts: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    on_gpu = args.device != "cpu"
    kw = dict(dtype=torch.bfloat16 if on_gpu else torch.float32, attn_implementation="sdpa")
    if w.quant == "nf4":
        kw.update(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                         bnb_4bit_use_double_quant=True,
                                                         bnb_4bit_compute_dtype=torch.bfloat16),
                  device_map={"": args.device})
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, **kw)
    if w.quant is None:
        model.to(args.device)
    tok = load_tokenizer(args.model_dir)
    n = w.prompts * w.group
    texts = [" ".join(f"w{i}" for i in p) for p in prompt_ids(args, w)]
    ds = Dataset.from_dict({"prompt": texts * (args.trl_steps + 1)})

    def reward(completions, **_):
        return random_rewards(len(completions), 0).tolist()

    lengths = drawn_lengths(w)
    cap = int(opts.get("gen_steps", w.new_tokens))  # gen_steps: a prefix of the generation (see the docstring)
    lengths = [min(k, cap) for k in lengths]
    conf = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=w.trl_micro,
        gradient_accumulation_steps=n // w.trl_micro, num_generations=w.group, max_completion_length=cap,
        generation_kwargs={} if w.median else {"min_new_tokens": w.new_tokens}, temperature=1.0, beta=BETA, loss_type="grpo",
        learning_rate=1e-6, max_steps=args.trl_steps + (opts.get("prof") == "1" and on_gpu), bf16=on_gpu, use_cpu=not on_gpu, gradient_checkpointing=True,
        logging_steps=1, report_to="none", save_strategy="no", use_vllm=False, shuffle_dataset=False, seed=0)
    peft_cfg = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                          target_modules=PROJECTIONS, task_type="CAUSAL_LM")
    steps: list[dict] = []
    cur: dict = {}
    extra: dict = {}
    # prof=1: one more step, after the timed ones, under the profiler (profiling.py), not counted in the times
    profiled_step = args.trl_steps if opts.get("prof") == "1" and on_gpu else None

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if len(steps) == profiled_step:
                from profiling import Recording

                cur["rec"] = Recording(trainer.model, lora_rank=LORA["r"])
                cur["rec"].start()
                return
            _sync()
            _peak_reset()
            cur.clear()
            cur.update(t0=time.perf_counter(), gen_s=0.0, peak_gen_gib=_peak())

        def on_step_end(self, *a, **k):
            if len(steps) == profiled_step:
                extra["profile"] = cur.pop("rec").stop()
                steps.append(None)  # the profiled step: dropped below
                return
            _sync()
            total = time.perf_counter() - cur["t0"]
            steps.append(dict(gen_s=cur["gen_s"], update_s=total - cur["gen_s"], step_s=total,
                              peak_gen_gib=cur["peak_gen_gib"], peak_update_gib=_peak(), completion_tokens=sum(lengths)))
            print(f"[trl] step {len(steps) - 1}: {json.dumps(steps[-1])}", flush=True)

    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=conf, train_dataset=ds, processing_class=tok,
                          peft_config=peft_cfg, callbacks=[Timer()])
    generate = trainer._generate_single_turn

    def timed_generate(*a, **k):  # generation only (HF generate); its peak, then a fresh peak for the rest
        _sync()
        t = time.perf_counter()
        out = generate(*a, **k)
        _sync()
        cur["gen_s"] += time.perf_counter() - t
        cur["peak_gen_gib"] = max(cur["peak_gen_gib"], _peak())
        _peak_reset()
        return out

    if opts.get("gen") == "canned":  # the update alone: TRL's generation replaced by the same canned rows as ours
        canned = canned_completions(args, w)
        rows_out = [r[m].tolist() for r, m in zip(canned.completion_ids, canned.completion_mask)]
        taken = [0]

        def generate(prompt_ids, *a, **k):  # TRL's rows in turn (prompt-major, as ours)
            idx = [(taken[0] + i) % len(rows_out) for i in range(len(prompt_ids))]
            taken[0] += len(prompt_ids)
            return [rows_out[i] for i in idx], None
    elif w.median is not None:
        force_trl_lengths(trainer, lengths, eos=tok.eos_token_id, cap=cap)
    trainer._generate_single_turn = timed_generate
    trainer.train()
    rows = [(args.prompt_len + k, k) for k in lengths]
    return dict(steps=[s for s in steps if s is not None], rows=rows, **extra, backend="canned" if opts.get("gen") == "canned" else "transformers generate",
                micro_batch=w.trl_micro)


def force_trl_lengths(trainer, lengths: list[int], eos: int, cap: int) -> None:
    """Every `generate` of TRL's policy gets a logits processor ending row r (in TRL's prompt-major order, the
    rows taken in turn) at lengths[r]: EOS forbidden before, forced at that step."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class ForceLengths(LogitsProcessor):
        def __init__(self, want: torch.Tensor, prompt_len: int):
            self.want, self.prompt_len = want, prompt_len  # [B]
            self.stops = want < cap  # a row drawn at the cap runs out of tokens instead: truncated, as ours

        def __call__(self, input_ids, scores):  # scores [B, V]
            end = (self.want - 1 == input_ids.shape[1] - self.prompt_len) & self.stops  # [B]: EOS is next
            scores[:, eos] = float("-inf")
            scores[end] = float("-inf")
            scores[end, eos] = 0.0
            return scores

    model, orig, offset = trainer.model, trainer.model.generate, [0]

    def generate(*a, **k):
        ids = k["input_ids"]
        idx = [(offset[0] + i) % len(lengths) for i in range(ids.shape[0])]
        offset[0] += ids.shape[0]
        want = torch.tensor([lengths[i] for i in idx], device=ids.device)
        k["logits_processor"] = LogitsProcessorList([ForceLengths(want, ids.shape[1])])
        return orig(*a, **k)

    model.generate = generate


METHODS = {
    "mathgrpo": run_mathgrpo,
    "mathgrpo-liger": lambda args, w, opts: run_mathgrpo(args, w, {**opts, "liger": True}),
    "trl": run_trl,
}


# ----------------------------------------------------------------------------- driver


def parse_method(spec: str) -> tuple[str, dict]:
    name, *pairs = spec.split(":")
    if name not in METHODS:
        raise SystemExit(f"--methods: unknown method '{name}'; known: {', '.join(METHODS)}")
    opts = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--methods {spec}: options are key=value, got '{pair}'")
        opts[key] = value
    return name, opts


def worker(args) -> None:
    if args.worker == "make":
        make_model_dir(args)
        return
    name, opts = parse_method(args.worker)
    w = WORKLOADS[args.workload]
    if args.new_tokens:  # an uneven workload keeps its shape: the median scales with the cap
        median = None if w.median is None else max(1, w.median * args.new_tokens // w.new_tokens)
        w = Workload(w.quant, w.prompts, w.group, args.new_tokens, w.trl_micro, median)
    rec = dict(workload=args.workload, method=args.worker, **METHODS[name](args, w, opts))
    rec["update_tflop"] = update_flops(args, rec.pop("rows")) / 1e12
    if "profile" in rec:
        print(f"profile {args.worker} {args.workload}: {json.dumps(rec['profile'])}", flush=True)
    print("RESULT " + json.dumps(rec), flush=True)


def spawn(args, worker_name: str, workload: str | None) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", worker_name, "--model-dir", args.model_dir,
           "--shape", args.shape, "--device", args.device, "--steps", str(args.steps), "--trl-steps",
           str(args.trl_steps), "--prompt-len", str(args.prompt_len), "--backend", args.backend,
           "--new-tokens", str(args.new_tokens or 0)] + (["--workload", workload] if workload else [])
    print(f"== {worker_name} {workload or ''}", flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    result, t0 = None, time.time()
    try:
        for line in proc.stdout:
            if line.startswith("RESULT "):
                result = json.loads(line[7:])
            else:
                print("   " + line.rstrip()[:400], flush=True)
            if time.time() - t0 > args.timeout:
                raise subprocess.TimeoutExpired(cmd, args.timeout)
        proc.wait(timeout=max(1.0, args.timeout - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        proc.kill()
        print(f"   !! {worker_name} {workload}: stopped after {args.timeout} s", flush=True)
    if result is None and worker_name != "make":
        result = dict(workload=workload, method=worker_name, error=f"exit {proc.returncode}")
    return result


def summarize(rec: dict, peak_tflops: float | None) -> dict:
    steps = rec.get("steps") or []
    if not steps:
        return {**rec, "first_s": None}
    later = steps[1:] or steps
    mean = lambda k: sum(s[k] for s in later) / len(later)  # noqa: E731
    out = dict(workload=rec["workload"], method=rec["method"], backend=rec.get("backend"), steps=len(steps), first_s=steps[0]["step_s"],
               step_s=mean("step_s"), gen_s=mean("gen_s"), update_s=mean("update_s"),
               peak_gen_gib=max(s["peak_gen_gib"] for s in steps), peak_update_gib=max(s["peak_update_gib"] for s in steps))
    out["peak_gib"] = max(out["peak_gen_gib"], out["peak_update_gib"])
    out["update_tflops"] = rec["update_tflop"] / out["update_s"]
    if peak_tflops:
        out["mfu_pct"] = 100 * out["update_tflops"] / peak_tflops
    return out


def table(rows: list[dict]) -> str:
    cols = ["workload", "method", "backend", "steps", "first_s", "step_s", "gen_s", "update_s", "peak_gen_gib",
            "peak_update_gib", "peak_gib", "update_tflops", "mfu_pct", "x_trl_step", "x_trl_update", "trl_mem_ratio"]
    cols = [c for c in cols if any(c in r for r in rows)]
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    lines += [" | ".join(fmt(r.get(c, "")) for c in cols) for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--methods", nargs="+", default=["mathgrpo", "trl"])
    ap.add_argument("--steps", type=int, default=3, help="mathgrpo steps (the first one warms up)")
    ap.add_argument("--trl-steps", type=int, default=2)
    ap.add_argument("--shape", default="1.5b", choices=list(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shape on CPU, 16 new tokens: a smoke test")
    ap.add_argument("--new-tokens", type=int, default=0, help="override every workload's completion length")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--backend", default="auto", help="mathgrpo rollout backend: auto | fast | hf")
    ap.add_argument("--model-dir", default=None, help="reuse a saved random model (default: a temp folder)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per (workload, method) run")
    ap.add_argument("--out", default=None, help="append JSON lines of raw results here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tiny:
        args.shape, args.device, args.new_tokens, args.prompt_len = "tiny", "cpu", args.new_tokens or 16, 8
    if args.worker:
        return worker(args)
    for spec in args.methods:
        parse_method(spec)
    if args.model_dir is None:
        args.model_dir = tempfile.mkdtemp(prefix="mathgrpo-step-")
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        spawn(args, "make", None)
    peak = None
    if args.device.startswith("cuda"):
        import torch

        name, peak = torch.cuda.get_device_name(), matmul_peak_tflops()
        print(f"device: {name}; measured bf16 matmul peak (8192^3) {peak:.1f} TFLOP/s", flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({"device": name, "matmul_peak_tflops": peak}) + "\n")
    rows = []
    for wl in args.workloads:
        group = []
        for spec in args.methods:
            rec = spawn(args, spec, wl)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            group.append(summarize(rec, peak) if "steps" in rec else rec)
        kind = lambda r: "gen=canned" in r.get("method", "")  # noqa: E731  (canned rows compare with canned TRL)
        for r in group:
            trl = next((t for t in group if t.get("method", "").split(":")[0] == "trl" and t.get("step_s")
                        and kind(t) == kind(r)), None)
            if trl and r.get("step_s") and r is not trl and not r["method"].startswith("trl"):
                r["x_trl_step"] = trl["step_s"] / r["step_s"]
                r["x_trl_update"] = trl["update_s"] / r["update_s"]
                r["trl_mem_ratio"] = r["peak_gib"] / trl["peak_gib"] if trl["peak_gib"] else float("nan")
        rows += group
        print(table(rows), flush=True)
    print("\n" + table(rows))


if __name__ == "__main__":
    main()
