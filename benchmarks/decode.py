"""Decode step of the `fast` engine against its memory-bandwidth floor, per (rows, context).

    PYTHONPATH=src python -m benchmarks.decode                 # 1.5B shape on CUDA: rows {1,8,64,256} x {2k,8k,16k}
    PYTHONPATH=src python -m benchmarks.decode --rows 8 64 --contexts 2048 --modes default lora-copy lora-none
    PYTHONPATH=src python -m benchmarks.decode --linear table cublas --rows 8 --contexts 2048   # + cuBLAS path
    PYTHONPATH=src python -m benchmarks.decode --set "" kernels=conservative --rows 8 --contexts 2048  # both sets
    PYTHONPATH=src python -m benchmarks.decode --variants      # attention kernels alone (matmuls: benchmarks.skinny)
    PYTHONPATH=src python -m benchmarks.decode --tiny          # CPU smoke run of every code path, seconds

Model: a random-initialised Qwen2 of DeepSeek-R1-Distill-Qwen-1.5B's shape (`common.random_qwen2`), bf16.
A "step at context c" is one pass of the engine's decode loop (sample from the logits, then one CUDA-graph
replay of the decode step) with c filled cache columns per row (prompt 128 + c - 128 generated tokens:
the cache is filled with random K/V, which costs the same to read as real ones), timed over `--steps`
repeats with CUDA events. floor = bytes the step must read (every weight matrix once + the filled KV of
every row) / the copy bandwidth measured at the start of the run; share = floor / measured time.
`--generate` also times whole `generate` calls (prompt 128, forced length) to check the step numbers.
Modes: default (plain model, weights read in place), fused (`fuse_weights`: owned fused q/k/v and gate/up),
lora-copy / lora-in_place / lora-none (peft LoRA r=32 on all seven projections, `lora_merge`).
--linear: table (what the kernel plan takes: on the tuned card fast_matmul's kernels with the SwiGLU epilogue
where its table says they beat cuBLAS) or cublas (cuBLAS + the reference pointwise ops). --table FILE: a
benchmarks.skinny JSON whose winners are the plan's table for this run. --set: kernel-plan variants
(rollout/fast_plan.py), each ':'-separated keys: kernels=auto|conservative|torch (the set), pdl=0|1 (programmatic
dependent launch; default: where supported), block_n=, stages=, min_chunk= (attend's tiling), pre=N (under PDL, the
skinny matmul prefetches its first N W chunks toward L2 before waiting on the kernel before it),
sampler=triton|torch, e.g. `--set pdl=0 "" min_chunk=128:block_n=32`.
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.common import SHAPES, copy_bandwidth, random_qwen2, synthetic_tokenizer


def build(shape: str, dtype, device, mode: str):
    """The model of a mode: plain, or with LoRA (the lora-* modes)."""
    return random_qwen2(shape, device, dtype, lora=mode.startswith("lora"))


VARIANT_KEYS = ("kernels", "pdl", "block_n", "stages", "min_chunk", "pre", "sampler")


def apply_variant(spec: str) -> dict:
    """The kernel-plan settings of a --set spec (fast_plan.plan_for's set and overrides)."""
    opts = dict(kv.split("=", 1) for kv in spec.split(":") if kv)
    bad = set(opts) - set(VARIANT_KEYS)
    if bad:
        raise SystemExit(f"benchmarks.decode --set {spec!r}: unknown keys {sorted(bad)}; valid: {', '.join(VARIANT_KEYS)}")
    names = {"block_n": "block_n", "stages": "attend_stages", "min_chunk": "min_chunk", "pre": "prefetch"}
    out = {names[k]: int(v) for k, v in opts.items() if k in names}
    if "pdl" in opts:
        out["pdl"] = opts["pdl"] == "1"
    for k in ("kernels", "sampler"):
        if k in opts:
            out[k] = opts[k]
    return out


def engine(model, args, mode: str, attention: str, rows: int, linear: str = "table", extra: dict | None = None):
    from mathgrpo.rollout.fast import FastRollout
    from mathgrpo.rollout.fast_plan import plan_for

    over = dict(extra or {})
    kernels = over.pop("kernels", "auto")
    if attention != "sdpa" and linear == "cublas":
        over["matmul"] = "cublas"
    if getattr(args, "table_entries", None) is not None and attention != "sdpa" and linear == "table":
        over.update(matmul="table", table=args.table_entries)
    opts = dict(fuse_weights=mode == "fused")
    if mode.startswith("lora"):
        opts["lora_merge"] = mode.split("-", 1)[1]
    plan = plan_for(args.device, kernels, attention=attention, **over)
    return FastRollout(model, synthetic_tokenizer(SHAPES[args.shape]["vocab_size"]), max_batch=max(rows, 8),
                       plan=plan, **opts)


def read_bytes(eng, rows: int, context: int) -> tuple[int, int]:
    """(weight bytes read per step: every matrix of the layers + head, LoRA pairs included; filled KV bytes)."""
    w = eng.w
    mats = [w.lm_head, w.norm]
    for L in w.layers:
        mats += [*L.qkv, L.o, *L.gate_up, L.down, L.ln1, L.ln2]
        mats += [t for lr in (L.qkv_lora, L.o_lora, L.gate_up_lora, L.down_lora) if lr for t in (lr.A, lr.B)]
        mats += [b for b in (*L.qkv_bias, L.o_bias, *L.gate_up_bias, L.down_bias) if b is not None]
    size = sum(t.numel() * t.element_size() for t in mats if hasattr(t, "numel"))
    kv = 2 * len(w.layers) * rows * w.n_kv * context * w.head_dim * w.lm_head.element_size()
    return size, kv


def step_time(eng, rows: int, context: int, steps: int) -> float:
    """Seconds per decode-loop step at `context` filled columns (see the module docstring)."""
    import torch

    one = eng.decode_loop_step(rows, context)
    one()  # capture / compile
    one()
    if eng.device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(steps):
            one()
        return (time.perf_counter() - t0) / steps
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(steps):
        one()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / steps


def grid(args, bw: float) -> list[dict]:
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    out = []
    for mode in args.modes:
        model = build(args.shape, dtype, args.device, mode)
        for attention, linear, spec in [(a, lin, v) for a in args.attention for lin in args.linear for v in args.set]:
            eng = engine(model, args, mode, attention, max(args.rows), linear, apply_variant(spec))
            linear = eng.plan.matmul if not spec else f"{eng.plan.matmul}[{spec}]"
            print(f"# {mode} {spec}: {eng.describe()}", flush=True)
            for rows in args.rows:
                for ctx in args.contexts:
                    kv_gib = read_bytes(eng, rows, ctx)[1] / 2**30
                    if kv_gib > args.max_kv_gib:
                        out.append(dict(mode=mode, attention=eng.attention, linear=linear, rows=rows, context=ctx,
                                        skipped=f"KV cache {kv_gib:.0f} GiB > --max-kv-gib"))
                        continue
                    eng.release(graphs=True)  # a cache of exactly this size (and fresh graphs)
                    c0 = eng.captures
                    try:
                        t = step_time(eng, rows, ctx, args.steps)
                    except Exception as e:  # noqa: BLE001 (a failing configuration is a result too)
                        out.append(dict(mode=mode, attention=eng.attention, linear=linear, rows=rows, context=ctx,
                                        error=f"{type(e).__name__}: {str(e)[:200]}"))
                        continue
                    wb, kv = read_bytes(eng, rows, ctx)
                    rec = dict(mode=mode, attention=eng.attention, linear=linear, rows=rows, context=ctx, ms=1e3 * t,
                               tok_s=rows / t, weight_gb=wb / 1e9, kv_gb=kv / 1e9, floor_ms=1e3 * (wb + kv) / bw,
                               captures=eng.captures - c0)
                    rec["share"] = rec["floor_ms"] / rec["ms"]
                    out.append(rec)
                    print("RESULT " + json.dumps(rec), flush=True)
            eng.release(graphs=True)
            del eng
        del model
    return out


def generate_runs(args, bw: float) -> list[dict]:
    """Whole `generate` calls, prompt 128, forced length: first call (captures) and second call."""
    import torch

    from mathgrpo.rollout.base import SamplingConfig

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    out = []
    model = build(args.shape, dtype, args.device, "default")
    vocab = SHAPES[args.shape]["vocab_size"]
    for spec in args.generate:
        rows, new = (int(x) for x in spec.split("x"))
        eng = engine(model, args, "default", args.attention[0], rows)
        g = torch.Generator().manual_seed(1)
        ps = torch.randint(1, vocab, (max(1, rows // 8), args.prompt_len), generator=g).tolist()
        s = SamplingConfig(max_new_tokens=new, temperature=1.0, ignore_eos=True, seed=0)
        first = eng.generate(ps, rows // len(ps), s)
        second = eng.generate(ps, rows // len(ps), s)
        wb, kv = read_bytes(eng, rows, args.prompt_len + new // 2)  # mean filled length
        rec = dict(generate=spec, attention=eng.attention, first_s=first.gen_seconds, s=second.gen_seconds,
                   ms=1e3 * second.gen_seconds / new, tok_s=rows * new / second.gen_seconds,
                   floor_ms=1e3 * (wb + kv) / bw, captures=eng.captures)
        rec["share"] = rec["floor_ms"] / rec["ms"]
        print("RESULT " + json.dumps(rec), flush=True)
        out.append(rec)
        eng.release(graphs=True)
    return out


def profile(args, spec: str) -> None:
    """Kernel time per step by kernel name at one (rows x context) point, first mode (torch profiler)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof_

    rows, ctx = (int(x) for x in spec.split("x"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    model = build(args.shape, dtype, args.device, args.modes[0])
    eng = engine(model, args, args.modes[0], args.attention[0], rows, args.linear[0], apply_variant(args.set[-1]))
    step_time(eng, rows, ctx, 5)
    n = 20
    with prof_(activities=[ProfilerActivity.CUDA]) as p:
        wall = step_time(eng, rows, ctx, n)
    ev = [e for e in p.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in ev) / (n + 2)
    print(f"\nprofile {spec} ({eng.attention}, set {args.set[-1]!r}): wall {1e3 * wall:.3f} ms/step, kernel time {total / 1e3:.3f} ms/step, "
          f"{sum(e.count for e in ev) / (n + 2):.0f} kernels/step")
    for e in sorted(ev, key=lambda e: -e.self_device_time_total)[:25]:
        print(f"{e.self_device_time_total / (n + 2):9.1f} us {e.count / (n + 2):6.1f}x  {e.key[:90]}")


def table(results: list[dict], bw: float, measured: bool = True) -> None:
    how = "measured" if measured else "nominal (CPU: no measured floor)"
    print(f"\ncopy bandwidth {how}: {bw / 1e12:.2f} TB/s; floor = (weights + filled KV) / that")
    print(f"{'mode':<14}{'attn':<7}{'linear':<26}{'rows':>5}{'ctx':>7}{'ms/step':>9}{'tok/s':>9}{'floor ms':>9}"
          f"{'share':>7}{'KV GB':>7}{'graphs':>7}")
    for r in results:
        if "generate" in r:
            print(f"generate {r['generate']:<12}{r['attention']:<7} first {r['first_s']:.1f} s, {r['ms']:.3f} ms/step, "
                  f"{r['tok_s']:.0f} tok/s, floor {r['floor_ms']:.3f} ms, share {100 * r['share']:.0f}%, "
                  f"graphs {r['captures']}")
        elif "ms" in r:
            print(f"{r['mode']:<14}{r['attention']:<7}{r['linear']:<26}{r['rows']:>5}{r['context']:>7}{r['ms']:>9.3f}"
                  f"{r['tok_s']:>9.0f}{r['floor_ms']:>9.3f}{100 * r['share']:>6.0f}%{r['kv_gb']:>7.2f}"
                  f"{r['captures']:>7}")
        else:
            print(f"{r['mode']:<14}{r['attention']:<7}{r['linear']:<26}{r['rows']:>5}{r['context']:>7}  "
                  f"{r.get('skipped') or r.get('error')}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.5b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 16384])
    ap.add_argument("--modes", nargs="+", default=["default"],
                    choices=["default", "fused", "lora-copy", "lora-in_place", "lora-none"])
    ap.add_argument("--attention", nargs="+", default=["auto"], choices=["auto", "triton", "sdpa"])
    ap.add_argument("--linear", nargs="+", default=["table"], choices=["table", "cublas"],
                    help="triton path: the kernel plan's matmuls (the default) or cuBLAS + reference ops")
    ap.add_argument("--table", help="a benchmarks.skinny JSON: its winners are the plan's table")
    ap.add_argument("--set", nargs="+", default=[""], help="engine variants (see the docstring); '' = defaults")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-kv-gib", type=float, default=64, help="skip points whose KV cache is larger")
    ap.add_argument("--generate", nargs="*", default=[], help="also whole generate calls, e.g. 8x2048")
    ap.add_argument("--profile", help="also a kernel profile at ROWSxCONTEXT, e.g. 8x2048")
    ap.add_argument("--variants", action="store_true",
                    help="time the attention kernels alone instead (benchmarks.decode_variants)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shape, few steps")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.tiny:
        args.shape, args.device, args.steps = "tiny", "cpu", 2
        args.rows, args.contexts, args.generate = [1, 8], [64, 160], ["8x16"]
    import torch

    if args.variants:
        from benchmarks.decode_variants import run_variants

        return run_variants()
    args.table_entries = None
    if args.table:
        from benchmarks.skinny import table_from

        with open(args.table) as f:
            args.table_entries = table_from(json.load(f)["results"])
        print(f"# skinny-matmul table from {args.table}: {len(args.table_entries)} entries", flush=True)
    bw = copy_bandwidth(torch.device(args.device))
    measured = bw == bw
    if not measured:  # CPU: no meaningful floor; a nominal 50 GB/s so the columns print
        bw = 50e9
    results = grid(args, bw) + generate_runs(args, bw)
    if args.profile:
        profile(args, args.profile)
    table(results, bw, measured)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(bandwidth=bw, results=results), f, indent=1)


if __name__ == "__main__":
    main()
