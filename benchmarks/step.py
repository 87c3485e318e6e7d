"""One GRPO training step, end to end: mathgrpo vs TRL's GRPOTrainer on the same workload.

    PYTHONPATH=src python -m benchmarks.step                                  # all workloads, mathgrpo + TRL, CUDA
    PYTHONPATH=src python -m benchmarks.step --workloads lora-1k --methods mathgrpo trl
    PYTHONPATH=src python -m benchmarks.step --tiny                           # seconds-long CPU smoke test
    PYTHONPATH=src python -m benchmarks.step --methods mathgrpo:budget=8192:release=1   # method options

The model is a random-initialised Qwen2 of DeepSeek-R1-Distill-Qwen-1.5B's shape (bf16, sdpa; NF4 for
the QLoRA workload; benchmarks.common) with a word-level tokenizer over its whole vocabulary, saved once to a folder that
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
lmhead=triton|torch (lmhead.py's fused log-prob kernels or the plain chunked path), dtype=fp16|bf16 (the model's
dtype: fp16 is what a card without bf16 gets, with loss scaling in the update), kernels=auto|conservative|torch
(generation.kernels: the fast engine's kernel set; conservative is what untuned cards get), gen=canned; mathgrpo-liger (same, loss from liger-kernel's LigerFusedLinearGRPOLoss); trl (option gen=canned).
prof=1 (mathgrpo and trl, CUDA): one more update (TRL: one more step) after the timed ones, under torch.profiler,
not counted in the times: its kernel time by kind and the passes it ran (profiling.py), printed and in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time

from benchmarks.common import (LORA, SHAPES, WORKLOADS, Workload, allocated_gib, canned_completions, child_env,
                               drawn_lengths, load_tokenizer, make_model_dir, markdown_table, mathgrpo_config,
                               matmul_peak_tflops, module_command, parse_options, peak_gib, prompt_ids, random_rewards,
                               reset_peak, sync, update_flops)
from benchmarks.trl_step import run_trl


def force_fast_lengths(rollout, lengths: list[int], eos: int, cap: int) -> None:
    """The fast engine's draws get EOS forbidden before each row's drawn length and forced at it (rows in
    prompt-major order, one batch), as force_trl_lengths does for TRL: rows really finish, and leave the batch."""
    import torch

    want = torch.tensor(lengths, device=rollout.device)  # [N]
    stops = want < cap  # a row drawn at the cap runs out of tokens instead: truncated

    def hook(logits, rows, step):  # logits [n, V]: the decode slots in use, slot j holding row rows[j]
        end = (want[rows] - 1 == step) & stops[rows]  # [n]: EOS is next
        logits[:, eos] = float("-inf")
        logits[end] = float("-inf")
        logits[end, eos] = 0.0

    rollout.logits_hook = hook


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


# ----------------------------------------------------------------------------- mathgrpo


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

    cfg = mathgrpo_config(args, w, opts)
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
    forced = w.median is not None and hasattr(rollout, "logits_hook")  # uneven, fast engine: EOS at the lengths
    if forced:
        force_fast_lengths(rollout, drawn_lengths(w), tok.eos_token_id, w.new_tokens)
    steps, rows = [], None
    for step in range(args.steps):
        reset_peak()
        sync()
        resident = allocated_gib()  # what stays allocated between steps: must not grow
        t0 = time.perf_counter()
        lengths = drawn_lengths(w)
        if canned:
            comp = canned_completions(args, w)
        else:
            comp = rollout.generate(prompts, w.group, SamplingConfig(max_new_tokens=max(lengths), temperature=1.0,
                                                                     ignore_eos=not forced, seed=step))
            if w.median is not None and not forced:
                comp = impose_lengths(comp, lengths, w.new_tokens)
        sync()
        t1, peak_gen = time.perf_counter(), peak_gib()
        if opts.get("release") == "1" and hasattr(rollout, "release"):
            rollout.release(weights=True)
        # what the rollout engine keeps through the update: its owned (merged / dequantised) weights, its KV cache
        held = {k: getattr(rollout, a, 0) / 2**30 for k, a in (("owned_weights_gib", "owned_weight_bytes"),
                                                                ("kv_cache_gib", "kv_cache_bytes"))}
        reset_peak()
        t2 = time.perf_counter()
        adv = group_advantages(random_rewards(comp.completion_ids.shape[0], step), w.group)  # [N]
        if opts.get("liger"):
            upd = liger_update(model, optimizer, scheduler, ref, comp, adv, cfg, opts)
            if rollout is not None:
                rollout.sync_weights(model)
        else:  # the trainer's update stage (gradients freed, weights synced)
            upd = update_stage(model, optimizer, scheduler, ref, comp, adv, cfg, rollout=rollout)
        sync()
        t3 = time.perf_counter()
        rows = [(len(p) + int(n), int(n)) for p, n in zip(comp.prompt_ids, comp.lengths)]
        steps.append(dict(gen_s=t1 - t0, update_s=t3 - t2, step_s=(t1 - t0) + (t3 - t2), resident_gib=resident,
                          peak_gen_gib=peak_gen,
                          peak_update_gib=peak_gib(), completion_tokens=int(comp.lengths.sum()),
                          graphs_captured=getattr(rollout, "captures", None), truncated=int(comp.truncated.sum()),
                          compactions=getattr(rollout, "compactions", None),
                          **{k: round(v, 3) for k, v in held.items()},
                          **{k: round(upd[k], 6) for k in ("loss", "grad_norm", "kl", "skipped_steps", "loss_scale")
                             if k in upd}))
        print(f"[{args.worker}] step {step}: {json.dumps(steps[-1])}", flush=True)
    backend = "canned" if canned else type(rollout).__name__
    extra = {}
    if opts.get("prof") == "1" and torch.cuda.is_available():  # one more update (the last rows) under the profiler
        from benchmarks.profiling import PassCounter, profile_call

        adv = group_advantages(random_rewards(comp.completion_ids.shape[0], args.steps), w.group)
        with PassCounter(model) as passes:
            extra["profile"] = profile_call(lambda: update_stage(model, optimizer, scheduler, ref, comp, adv, cfg,
                                                                 rollout=rollout), lora_rank=LORA["r"])
        extra["profile"].update(passes.summary())
    if hasattr(rollout, "plan"):
        extra["kernel_plan"] = rollout.plan.line()
    return dict(steps=steps, rows=rows, backend=backend, **extra, budget=cfg.trainer.max_tokens_per_microbatch,
                chunk=cfg.trainer.logprob_chunk_size)


METHODS = {
    "mathgrpo": run_mathgrpo,
    "mathgrpo-liger": lambda args, w, opts: run_mathgrpo(args, w, {**opts, "liger": True}),
    "trl": run_trl,  # benchmarks.trl_step
}


# ----------------------------------------------------------------------------- driver


def parse_method(spec: str) -> tuple[str, dict]:
    """'name:key=value:...' -> (name, options); the name must be one of METHODS."""
    name, _, rest = spec.partition(":")
    if name not in METHODS:
        raise SystemExit(f"--methods: unknown method '{name}'; known: {', '.join(METHODS)}")
    return name, parse_options(rest, "--methods")


def worker(args) -> None:
    if args.worker == "make":
        make_model_dir(args)
        return
    name, opts = parse_method(args.worker)
    w = WORKLOADS[args.workload]
    if args.new_tokens:
        w = w.with_new_tokens(args.new_tokens)
    rec = dict(workload=args.workload, method=args.worker, **METHODS[name](args, w, opts))
    rec["update_tflop"] = update_flops(args, rec.pop("rows")) / 1e12
    if "profile" in rec:
        print(f"profile {args.worker} {args.workload}: {json.dumps(rec['profile'])}", flush=True)
    print("RESULT " + json.dumps(rec), flush=True)


def spawn(args, worker_name: str, workload: str | None) -> dict | None:
    cmd = module_command("benchmarks.step", "--worker", worker_name, "--model-dir", args.model_dir, "--shape",
                         args.shape, "--device", args.device, "--steps", str(args.steps), "--trl-steps",
                         str(args.trl_steps), "--prompt-len", str(args.prompt_len), "--backend", args.backend,
                         "--new-tokens", str(args.new_tokens or 0), *(["--workload", workload] if workload else []))
    print(f"== {worker_name} {workload or ''}", flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
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
    return markdown_table(rows, cols)


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
