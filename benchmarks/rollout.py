"""Rollout throughput: transformers `generate`, transformers `generate_batch`, and our `fast` engine.

    PYTHONPATH=src python -m benchmarks.rollout                      # 1.5B shape on CUDA, 64 and 256 rows
    PYTHONPATH=src python -m benchmarks.rollout --shape tiny --device cpu --new-tokens 32 --batches 8

A random-initialised Qwen2 of DeepSeek-R1-Distill-Qwen-1.5B's shape (bf16, sdpa; `common.random_qwen2`) samples
completions of forced full length (EOS ignored) for the same random 128-token prompts (`--group` samples each).
Each method runs in its own subprocess (clean peak memory; a time cap that can stop a stuck run):
one line of JSON per batch size, then a table with tokens/s, peak GPU memory, the ratio to HF
`generate` and to the bandwidth limit = rows * HBM bandwidth / weight bytes (one full weight read per
decode step). HF `generate` and `generate_batch` are slow: they are timed on `--hf-new-tokens`
new tokens (fewer than ours), which flatters them (shorter sequences, cheaper attention).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from benchmarks.common import SHAPES, child_env, module_command, random_qwen2, sync, synthetic_tokenizer


def build(args):
    import torch

    return random_qwen2(args.shape, args.device, {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype])


def prompts(args, rows: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(1)
    vocab = SHAPES[args.shape]["vocab_size"]
    return torch.randint(1, vocab, (max(1, rows // args.group), args.prompt_len), generator=g).tolist()


def run_hf(model, args, ps, rows, new):
    import torch

    ids = torch.tensor([p for p in ps for _ in range(rows // len(ps))], device=args.device)
    kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=None, pad_token_id=0)
    model.generate(ids[:, :16], attention_mask=torch.ones_like(ids[:, :16]), max_new_tokens=4, min_new_tokens=4, **kw)
    sync()
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, **kw)
    sync()
    return (out.shape[1] - ids.shape[1]) * rows, time.perf_counter() - t0, {}


def run_hf_batch(model, args, ps, rows, new):
    from transformers import GenerationConfig

    inputs = [p for p in ps for _ in range(rows // len(ps))]
    gc = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=1.0, top_p=1.0,
                          eos_token_id=0, pad_token_id=0)
    t0 = time.perf_counter()
    res = model.generate_batch(inputs=inputs, generation_config=gc, progress_bar=False)
    sync()
    seconds = time.perf_counter() - t0
    return sum(len(r.generated_tokens) for r in res.values()), seconds, {"includes": "warm-up/graph capture"}


def run_fast(model, args, ps, rows, new, **opts):
    from mathgrpo.rollout.base import SamplingConfig
    from mathgrpo.rollout.fast import FastRollout
    from mathgrpo.rollout.fast_plan import plan_for

    plan = plan_for(args.device, compile_pointwise=False) if opts.pop("eager_ops", False) else None
    eng = FastRollout(model, synthetic_tokenizer(SHAPES[args.shape]["vocab_size"]), max_batch=max(rows, 8),
                      plan=plan, **opts)
    s = SamplingConfig(max_new_tokens=new, temperature=1.0, ignore_eos=True, seed=0)
    first = eng.generate(ps, rows // len(ps), s)  # captures the CUDA graphs
    out = eng.generate(ps, rows // len(ps), s)
    extra = {"first_call_s": round(first.gen_seconds, 2), "kv_cache_gib": round(eng.kv_cache_bytes / 2**30, 2),
             "owned_weight_gib": round(eng.owned_weight_bytes / 2**30, 2),
             "ms_per_step": round(1000 * out.gen_seconds / new, 3)}
    if args.profile and rows == args.batches[0] and not opts:
        extra["profile"] = _profile(eng, ps, rows, s, args)
    return int(out.lengths.sum()), out.gen_seconds, extra


def _profile(eng, ps, rows, s, args):
    """GPU time per kernel family over a short run (graph replays show as their kernels)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    s2 = type(s)(**{**s.__dict__, "max_new_tokens": 64})
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        eng.generate(ps, rows // len(ps), s2)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
    print(table, file=sys.stderr)
    return "printed to stderr"


METHODS = {"hf": run_hf, "hf_batch": run_hf_batch, "fast": run_fast,
           "fast_fused": lambda *a: run_fast(*a, fuse_weights=True),  # + a fused copy of q/k/v and gate/up
           "fast_eager_ops": lambda *a: run_fast(*a, eager_ops=True)}


def worker(args) -> None:
    import torch

    model = build(args)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for rows in args.batches:
        ps = prompts(args, rows)
        new = args.new_tokens if args.worker.startswith("fast") else min(args.hf_new_tokens, args.new_tokens)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            tokens, seconds, extra = METHODS[args.worker](model, args, ps, rows, new)
            peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
            rec = dict(method=args.worker, rows=rows, new_tokens=new, tokens=tokens, seconds=round(seconds, 3),
                       tok_s=tokens / seconds, peak_gib=round(peak, 2), weight_bytes=weight_bytes, **extra)
        except Exception as e:  # a baseline that breaks is a result too
            rec = dict(method=args.worker, rows=rows, error=f"{type(e).__name__}: {str(e)[:300]}")
        print("RESULT " + json.dumps(rec), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.5b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256], help="completions per run")
    ap.add_argument("--group", type=int, default=8, help="samples per prompt")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=1024)
    ap.add_argument("--hf-new-tokens", type=int, default=256, help="cap for the slow baselines")
    ap.add_argument("--methods", nargs="+", default=["hf", "hf_batch", "fast"], choices=sorted(METHODS))
    ap.add_argument("--timeout", type=float, default=300, help="seconds per method (all batch sizes)")
    ap.add_argument("--hbm-tbps", type=float, default=3.35, help="HBM bandwidth assumed (H100 SXM nominal)")
    ap.add_argument("--profile", action="store_true", help="print a kernel profile of the fast engine")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    results = []
    for m in args.methods:
        cmd = module_command("benchmarks.rollout", *(argv if argv is not None else sys.argv[1:]), "--worker", m)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=child_env())
            out, err = proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = f"timed out after {args.timeout:.0f} s"
        got = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
        for rows in args.batches:
            if not any(r["rows"] == rows for r in got):
                got.append(dict(method=m, rows=rows, error=(err or "no result").strip().splitlines()[-1][:300]))
        if args.profile and m.startswith("fast"):
            print(err, file=sys.stderr)
        print(f"# {m}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        results += got
    table(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def table(results, args) -> None:
    wb = next((r["weight_bytes"] for r in results if "weight_bytes" in r), None)
    print(f"\nshape {args.shape} ({args.dtype}), prompt {args.prompt_len}, {args.group} samples per prompt, "
          f"sampling T=1 with EOS ignored; bandwidth limit = rows * {args.hbm_tbps} TB/s / "
          f"{(wb or 0) / 1e9:.2f} GB of weights per step")
    print(f"{'method':<15}{'rows':>5}{'new tok':>8}{'tok/s':>10}{'peak GiB':>9}{'x HF':>7}{'% limit':>8}  notes")
    for rows in args.batches:
        base = next((r["tok_s"] for r in results if r["method"] == "hf" and r["rows"] == rows and "tok_s" in r), None)
        for r in (r for r in results if r["rows"] == rows):
            if "tok_s" not in r:
                print(f"{r['method']:<15}{rows:>5}  failed: {r['error']}")
                continue
            limit = rows * args.hbm_tbps * 1e12 / r["weight_bytes"]
            x = f"{r['tok_s'] / base:.1f}" if base else "-"
            notes = ", ".join(f"{k}={v}" for k, v in r.items() if k not in (
                "method", "rows", "new_tokens", "tokens", "seconds", "tok_s", "peak_gib", "weight_bytes"))
            print(f"{r['method']:<15}{rows:>5}{r['new_tokens']:>8}{r['tok_s']:>10.0f}{r['peak_gib']:>9.2f}{x:>7}"
                  f"{100 * r['tok_s'] / limit:>7.1f}%  {notes}")


if __name__ == "__main__":
    main()
