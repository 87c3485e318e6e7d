"""The update alone, profiled and in variants: where its time goes and what each switch buys.

    PYTHONPATH=src python benchmarks/update.py                                   # lora-1k + uneven-8k, CUDA
    PYTHONPATH=src python benchmarks/update.py --workloads uneven-8k --variants gc=layer pack=1:gc=none --profile
    PYTHONPATH=src python benchmarks/update.py --tiny                            # CPU smoke test, seconds

One subprocess per workload loads step.py's random model of DeepSeek-R1-Distill-Qwen-1.5B's shape once (bf16,
sdpa, LoRA r=32 on all seven projections, beta 0.04, loss "grpo") and runs the trainer's `policy_update` on
canned completions of the workload's lengths (`step.canned_completions`: random tokens; lora-1k forced to
1,024, uneven-8k log-normal) under each variant in turn, `--steps` updates each, the first a warm-up.
Variant keys (':'-separated): pack=0|1 (trainer.pack_sequences), attn=auto|rows (packed attention: varlen
kernel or one SDPA call per row), gc=layer|none (activation checkpointing), lora=addmm|peft
(model.lora_fused_add), budget=<tokens per micro-batch>, chunk=<log-prob chunk>, fused=1
(liger-kernel RMSNorm/SwiGLU/RoPE), compile=1 (torch.compile of every decoder layer). fused and compile
cannot be undone, so variants with them run after the others. Printed per variant: update seconds, the
reference pass alone, peak memory, useful TFLOP/s (step.update_flops: real tokens only, no recompute) and
its share of the bf16 matmul peak measured in the same process (8192^3). --profile runs one more update of
the first variant (and of those marked prof=1) under torch.profiler: GPU time in matmuls, attention, other
kernels and GPU idle.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step import (WORKLOADS, _mathgrpo_cfg, _peak, _peak_reset, _sync, canned_completions, make_model_dir,  # noqa: E402
                  matmul_peak_tflops, parse_method, random_rewards, update_flops)

DEFAULT_VARIANTS = ["lora=peft", "gc=layer", "pack=1", "pack=1:attn=rows", "gc=none", "pack=1:gc=none",
                    "pack=1:gc=none:fused=1", "gc=layer:fused=1"]
IRREVERSIBLE = ("fused", "compile")


def parse_variant(spec: str) -> dict:
    return parse_method("mathgrpo:" + spec if spec != "base" else "mathgrpo")[1]


def apply_variant(model, cfg, opts: dict, state: dict) -> None:
    """Set the trainer keys and the model's checkpointing / kernels for one variant (state: what was done)."""
    from mathgrpo.models import backbone_and_head, enable_checkpointing, fuse_kernels, fuse_lora_add
    from mathgrpo.packing import set_packed_attention

    t = cfg.trainer
    t.pack_sequences = opts.get("pack", "0") == "1"
    t.max_tokens_per_microbatch = int(opts.get("budget", 16384))
    t.logprob_chunk_size = int(opts.get("chunk", 1024))
    gc = opts.get("gc", "layer")
    base = model.get_base_model()
    if gc == "none":
        (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()
    else:
        enable_checkpointing(model)
    fuse_lora_add(model, on=opts.get("lora", "addmm") == "addmm")
    set_packed_attention(opts.get("attn", "auto"))
    if opts.get("fused") == "1" and not state.get("fused"):
        fuse_kernels(model)
        state["fused"] = True
    if opts.get("compile") == "1" and not state.get("compiled"):
        if t.pack_sequences:
            from mathgrpo.packing import _varlen

            _varlen()  # the one-time kernel check, outside the compiled region
        body, _ = backbone_and_head(model)
        for layer in body.layers:
            layer.compile(dynamic=True)
        state["compiled"] = True


def profile_update(run, steps_out: dict) -> None:
    """GPU time of one update by kernel kind (name patterns), and the GPU's idle share of the wall time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        run()
        _sync()
        wall = time.perf_counter() - t0
    kinds = {"matmul": 0.0, "attention": 0.0, "triton": 0.0, "other": 0.0}
    kernels = []
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        n = e.key.lower()
        kind = ("attention" if any(k in n for k in ("flash", "fmha", "attention")) else
                "matmul" if any(k in n for k in ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "sm90_")) else
                "triton" if "triton" in n else "other")
        kinds[kind] += us / 1e6
        kernels.append((us / 1e6, e.count, e.key[:90]))
    busy = sum(kinds.values())
    steps_out["profile"] = dict(wall_s=wall, gpu_busy_s=busy, idle_s=wall - busy,
                                **{f"{k}_s": v for k, v in kinds.items()},
                                top=[dict(s=round(s, 4), n=c, kernel=k) for s, c, k in sorted(kernels, reverse=True)[:15]])


def run_workload(args) -> None:
    import torch

    from mathgrpo.advantages import group_advantages
    from mathgrpo.models import Reference, completion_logprobs, load_model
    from mathgrpo.update import make_optimizer, microbatches, policy_update
    from mathgrpo.packing import packed_microbatches

    w = WORKLOADS[args.workload]
    if args.new_tokens:
        from step import Workload

        median = None if w.median is None else max(1, w.median * args.new_tokens // w.new_tokens)
        w = Workload(w.quant, w.prompts, w.group, args.new_tokens, w.trl_micro, median)
    peak = matmul_peak_tflops() if torch.cuda.is_available() else None
    cfg = _mathgrpo_cfg(args, w, {})
    cfg.model.lora_fused_add = False  # set per variant
    model, _ = load_model(cfg.model, trainable=True)
    ref = Reference(model, cfg.grpo.beta, lora=True)
    optimizer, scheduler = make_optimizer(model, cfg)
    comp = canned_completions(args, w)
    lengths = comp.completion_mask.sum(1).tolist()
    adv = group_advantages(random_rewards(len(lengths), 0), w.group)
    rows = [(len(p) + n, n) for p, n in zip(comp.prompt_ids, lengths)]
    flops = update_flops(args, rows)
    totals = [a for a, _ in rows]
    print(f"[{args.workload}] rows {len(rows)}, tokens {sum(totals)}, truncated {int(comp.truncated.sum())}, "
          f"matmul peak {peak} TFLOP/s, useful update {flops / 1e12:.1f} TFLOP", flush=True)
    variants = sorted(args.variants, key=lambda v: any(k in parse_variant(v) for k in IRREVERSIBLE))  # stable
    state: dict = {}
    for k, spec in enumerate(variants):
        opts = parse_variant(spec)
        rec = dict(workload=args.workload, variant=spec, matmul_peak_tflops=peak, useful_tflop=flops / 1e12)
        try:
            apply_variant(model, cfg, opts, state)
            t = cfg.trainer
            split = packed_microbatches if t.pack_sequences else microbatches
            groups = split(totals, t.max_tokens_per_microbatch)
            padded = sum(len(g) * max(totals[i] for i in g) for g in groups)
            rec.update(microbatches=len(groups), padded_tokens=padded if not t.pack_sequences else sum(totals))

            def update():
                policy_update(model, optimizer, scheduler, ref, comp, adv, cfg)
                optimizer.zero_grad(set_to_none=True)  # as the trainer's update stage

            def ref_pass():
                with torch.no_grad():
                    for g in groups:
                        with ref.context(model) as rm:
                            completion_logprobs(rm, [comp.prompt_ids[i] for i in g],
                                                comp.completion_ids[g, :max(lengths[i] for i in g)],
                                                lengths=[lengths[i] for i in g] if t.pack_sequences else None)

            _peak_reset()
            times = []
            for _ in range(args.steps):
                _sync()
                t0 = time.perf_counter()
                update()
                _sync()
                times.append(time.perf_counter() - t0)
            rec.update(first_s=times[0], update_s=sum(times[1:]) / max(1, len(times) - 1), peak_gib=_peak())
            _sync()
            t0 = time.perf_counter()
            ref_pass()
            _sync()
            rec["ref_pass_s"] = time.perf_counter() - t0
            rec["tflops"] = flops / 1e12 / rec["update_s"]
            if peak:
                rec["pct_of_peak"] = 100 * rec["tflops"] / peak
            if args.profile and (k == 0 or opts.get("prof") == "1") and torch.cuda.is_available():
                profile_update(update, rec)
        except Exception as e:  # noqa: BLE001  (one failing variant must not lose the others' numbers)
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print("RESULT " + json.dumps(rec), flush=True)


def table(rows: list[dict]) -> str:
    cols = ["workload", "variant", "microbatches", "padded_tokens", "update_s", "ref_pass_s", "peak_gib", "tflops",
            "pct_of_peak", "error"]
    cols = [c for c in cols if any(c in r for r in rows)]
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join([" | ".join(cols), " | ".join("---" for _ in cols)]
                     + [" | ".join(fmt(r.get(c, "")) for c in cols) for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=["lora-1k", "uneven-8k"], choices=list(WORKLOADS))
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    ap.add_argument("--steps", type=int, default=2, help="updates per variant (the first one warms up)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler breakdown of the first variant")
    ap.add_argument("--shape", default="1.5b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shape on CPU, 16 new tokens: a smoke test")
    ap.add_argument("--new-tokens", type=int, default=0)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per workload")
    ap.add_argument("--out", default=None, help="append JSON lines of raw results here")
    ap.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.backend, args.steps_total = "auto", args.steps
    if args.tiny:
        args.shape, args.device, args.new_tokens, args.prompt_len = "tiny", "cpu", args.new_tokens or 16, 8
        args.variants = [v for v in args.variants if "fused" not in v and "compile" not in v]
    for v in args.variants:
        parse_variant(v)
    if args.workload:
        return run_workload(args)
    import tempfile

    if args.model_dir is None:
        args.model_dir = tempfile.mkdtemp(prefix="mathgrpo-update-")
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        make_model_dir(args)
    rows = []
    for wl in args.workloads:
        cmd = [sys.executable, os.path.abspath(__file__), "--workload", wl, "--model-dir", args.model_dir, "--shape",
               args.shape, "--device", args.device, "--steps", str(args.steps), "--new-tokens", str(args.new_tokens),
               "--prompt-len", str(args.prompt_len), "--variants", *args.variants] + (["--profile"] if args.profile else [])
        print(f"== {wl}", flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        t0 = time.time()
        for line in proc.stdout:
            if line.startswith("RESULT "):
                rec = json.loads(line[7:])
                rows.append(rec)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                print(json.dumps({k: v for k, v in rec.items() if k != "profile"}), flush=True)
                if "profile" in rec:
                    print(json.dumps(rec["profile"], indent=1), flush=True)
            else:
                print("   " + line.rstrip()[:300], flush=True)
            if time.time() - t0 > args.timeout:
                proc.kill()
                print(f"   !! {wl}: stopped after {args.timeout} s", flush=True)
                break
        proc.wait()
        print(table(rows), flush=True)


if __name__ == "__main__":
    main()
