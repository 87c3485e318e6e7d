"""Sweep of the decode step's skinny matmuls: rollout/fast_matmul.py's kernel against cuBLAS, the way the engine
runs them (what fills fast_matmul.TABLE).

    PYTHONPATH=src python -m benchmarks.skinny --json skinny.json      # H200: every shape x rows {1,8,16,32,64}
    PYTHONPATH=src python -m benchmarks.skinny --ptx                   # CPU: compile for sm_90, count PTX ops
    TRITON_INTERPRET=1 PYTHONPATH=src python -m benchmarks.skinny --tiny   # CPU smoke run, small shapes

Each candidate (and cuBLAS, `F.linear`) is captured in one CUDA graph that runs it over `--copies` distinct
weight copies of the shape (28: one per layer, so the 60 MB L2 never holds the weights: they stream from HBM as
in a decode step), replayed and timed with CUDA events; us per matmul = replay time / copies. Each is checked
against cuBLAS first (relative error < 2e-2, bf16). share = (weight + x + y bytes) / the copy bandwidth
measured at the start of the run. Shapes: DeepSeek-R1-Distill-Qwen-1.5B's projections, fused (q/k/v, gate/up,
as the owned copy of the LoRA copy mode holds them) and separate (the plain model's q, k/v, gate/up), down,
lm_head, and "glu" (gate/up with SwiGLU in the kernel's epilogue, against cuBLAS + eager SiLU * up).
The printed TABLE lines are the winners (>= 3% faster than cuBLAS) in fast_matmul.TABLE's format.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from benchmarks.common import copy_bandwidth
from mathgrpo.rollout import fast_matmul as FM

# name -> (kind, N, K); kind "glu": N = rows of gate (and of up), K = hidden (a sweep cut short by --budget-s
# drops the last ones). Kinds (fast_matmul.TABLE's): mm; glu = matmul + SwiGLU (N = gate's rows, read from the
# fused [gate; up]).
SHAPES = {"gate_up": ("mm", 17920, 1536), "down": ("mm", 1536, 8960), "glu": ("glu", 8960, 1536),
          "qkv": ("mm", 2048, 1536), "q|o": ("mm", 1536, 1536), "gate|up": ("mm", 8960, 1536),
          "k|v": ("mm", 256, 1536), "lm_head": ("mm", 151936, 1536)}
# pointwise kernels a fused kind saves in the engine's decode step (SwiGLU is one compiled kernel)
SAVES = {"mm": 0.0, "glu": 1.0}
ROWS = (1, 8, 16, 32, 64)


def _splits(tiles: int, K: int, bk: int) -> list[int]:
    """Split-K counts around one program per multiprocessor (132 on the H200: the most that fit in one wave,
    the fewest that fill it) and about two."""
    valid = [s for s in range(1, K // bk + 1) if K % (bk * s) == 0]
    picks = [max([s for s in valid if tiles * s <= 132] or [1])]
    picks.append(min([s for s in valid if tiles * s >= 132] or [valid[-1]]))
    picks.append(min(valid, key=lambda s: (abs(tiles * s - 264), s)))
    return sorted(set(picks))


def candidates(N: int, K: int, M: int) -> list[FM.Config]:
    out = []
    if M <= 16:
        for bk, st in ((128, 4), (128, 6), (256, 3)):  # W as the left operand (wgmma from 16 rows)
            out += [FM.Config(True, 64, bk, s, 4, st) for s in _splits(-(-N // 64), K, bk)]
        for bn in (32, 64):  # x as the left operand (mma.sync, x padded to 16 rows)
            out += [FM.Config(False, bn, 128, s, 4, 4) for s in _splits(-(-N // bn), K, 128)]
    else:  # 32-64 rows: fewer stages (the x tiles take shared memory too), both operand orders
        for swap, bn, st in ((True, 64, 3), (True, 64, 4), (False, 32, 3), (False, 64, 3)):
            out += [FM.Config(swap, bn, 128, s, 4, st) for s in _splits(-(-N // bn), K, 128)]
    return out


def graph_us(calls, reps: int = 5) -> float:
    """us per call: one CUDA graph over every call (one per weight copy), replayed `reps` times."""
    if not torch.cuda.is_available():  # CPU smoke run (Triton's interpreter): plain calls
        t0 = time.perf_counter()
        for c in calls:
            c()
        return (time.perf_counter() - t0) * 1e6 / len(calls)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    g.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / reps / len(calls)


def sweep(args, bw: float) -> list[dict]:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float16  # the interpreter's bf16 dot is wrong
    t_start = time.time()
    results = []
    pw = {}  # one pointwise kernel (SwiGLU's size) per row count: what a fusion saves, per kernel
    for M in args.rows:
        a = [torch.randn(M, 8960, device=dev, dtype=dt) for _ in range(args.copies)]
        pw[M] = graph_us([lambda t=t: torch.mul(t, t) for t in a])
    print("pointwise kernel us by rows: " + ", ".join(f"{m}: {t:.2f}" for m, t in pw.items()), flush=True)
    for name in args.shapes:
        kind, N, K = SHAPES[name]
        copies = args.copies if N * K < 50_000_000 else max(4, args.copies // 4)
        two = kind == "glu"
        rows_w = 2 * N if two else N  # glu kinds: the fused [gate; up] copy, read through its two halves
        ws = [torch.randn(rows_w, K, device=dev, dtype=dt) * 0.02 for _ in range(copies)]
        for M in args.rows:
            if time.time() - t_start > args.budget_s:
                print(f"# budget {args.budget_s} s spent: stopping before {name} M={M}", flush=True)
                return results
            x = torch.randn(M, K, device=dev, dtype=dt)
            nbytes = 2 * (rows_w * K + M * K + M * N)

            def ref_call(w):  # eager reference (the engine's pointwise ops are compiled: see SAVES)
                y = F.linear(x, w)
                if two:
                    g, u = y.chunk(2, -1)
                    y = F.silu(g) * u
                return y

            def call(w, cfg):
                if two:
                    return FM.launch(x, w[:N], None, cfg, w2=w[N:])
                return FM.launch(x, w, None, cfg)

            want = ref_call(ws[0]).float()
            t_ref = graph_us([lambda w=w: ref_call(w) for w in ws])
            t_mm = graph_us([lambda w=w: F.linear(x, w) for w in ws]) if kind != "mm" else t_ref
            budget = t_mm + SAVES[kind] * pw[M]
            rec = dict(shape=name, kind=kind, N=N, K=K, M=M, cublas_us=t_mm, cublas_share=nbytes / bw / (t_mm / 1e6),
                       eager_ref_us=t_ref, budget_us=budget)
            tried = []
            for cfg in candidates(N, K, M):
                try:
                    got = call(ws[0], cfg).float()
                    err = float((got - want).norm() / want.norm())
                    if not err < 2e-2:
                        tried.append(dict(cfg=list(cfg), error=f"rel err {err:.2e}"))
                        continue
                    t = graph_us([lambda w=w, cfg=cfg: call(w, cfg) for w in ws])
                except Exception as e:  # noqa: BLE001 (out of shared memory, etc.: a result too)
                    tried.append(dict(cfg=list(cfg), error=f"{type(e).__name__}: {str(e)[:120]}"))
                    continue
                tried.append(dict(cfg=list(cfg), us=t, share=nbytes / bw / (t / 1e6)))
            ok = [r for r in tried if "us" in r]
            rec["variants"] = tried
            if ok:
                best = min(ok, key=lambda r: r["us"])
                rec.update(best_us=best["us"], best_share=best["share"], best_cfg=best["cfg"],
                           wins=best["us"] < 0.97 * budget)
            results.append(rec)
            print("RESULT " + json.dumps({k: v for k, v in rec.items() if k != "variants"}), flush=True)
        del ws
        torch.cuda.empty_cache()
    return results


def table_from(results: list[dict]) -> dict:
    """fast_matmul.TABLE entries from a sweep's results: the winners, per (kind, N, K, row bucket)."""
    return {(r["kind"], r["N"], r["K"], FM.bucket(r["M"])): FM.Config(*r["best_cfg"])
            for r in results if r.get("wins")}


def summary(results: list[dict], bw: float) -> None:
    print(f"\ncopy bandwidth {bw / 1e12:.2f} TB/s; us per matmul inside a CUDA graph over distinct weight copies")
    print("cuBLAS = the matmul alone; budget = cuBLAS + the pointwise kernels the fused kind saves (SAVES)")
    print(f"{'shape':<10}{'N':>7}{'K':>6}{'M':>4}{'cuBLAS':>8}{'share':>6}{'budget':>8}{'triton':>8}{'share':>6}"
          "  winner / config")
    for r in results:
        tb = f"{r['best_us']:>8.2f}{100 * r['best_share']:>5.0f}%" if "best_us" in r else f"{'-':>8}{'':>6}"
        win = str(FM.Config(*r["best_cfg"])) if r.get("wins") else "cuBLAS"
        print(f"{r['shape']:<10}{r['N']:>7}{r['K']:>6}{r['M']:>4}{r['cublas_us']:>8.2f}{100 * r['cublas_share']:>5.0f}%"
              f"{r['budget_us']:>8.2f}{tb}  {win}")
    print("\nTABLE")
    for r in results:
        if r.get("wins"):
            print(f"    ({r['kind']!r}, {r['N']}, {r['K']}, {FM.bucket(r['M'])}): C{tuple(r['best_cfg'])},"
                  f"  # {r['best_us']:.1f} vs {r['budget_us']:.1f} us")


def ptx_report() -> None:
    """Compile a few configurations for sm_90 on this machine (no GPU needed) and count the loads and matrix
    instructions in their PTX, with the 16-byte divisibility hints the JIT gives aligned pointers and strides."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = FM._skinny_kernel
    sig = {"x_ptr": "*bf16", "sx": "i32", "w_ptr": "*bf16", "w2_ptr": "*bf16", "sw": "i32", "b_ptr": "*bf16",
           "y_ptr": "*bf16", "sy": "i32", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32"}
    for hints in (False, True):
        div = [n for n, t in sig.items() if t.startswith("*") or n in ("sx", "sw", "sy", "N")] if hints else []
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div}
        for cfg, bm in ((FM.Config(True, 64, 128, 4, 4, 4), 8), (FM.Config(True, 64, 128, 1, 4, 4), 64),
                        (FM.Config(False, 32, 128, 2, 4, 4), 16)):
            consts = dict(KPER=1536 // cfg.split, BM=bm, BN=cfg.bn, BK=cfg.bk, SPLIT=cfg.split, SWAP=cfg.swap,
                          STAGES=cfg.stages, EVEN_N=True, EVEN_K=True, HAS_BIAS=False, GLU=False, PREC="tf32")
            src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts,
                            attrs=attrs)
            c = triton.compile(src, target=GPUTarget("cuda", 90, 64),
                               options={"num_warps": cfg.warps, "num_stages": cfg.stages})
            ptx = c.asm["ptx"]
            n = {p: len(re.findall(re.escape(p), ptx)) for p in
                 ("cp.async.cg", "ld.global.v4", "ld.global", "mma.sync", "wgmma.mma_async")}
            print(f"hints={hints!s:<5} BM{bm} {cfg}: shared {c.metadata.shared} B, " +
                  ", ".join(f"{k} {v}" for k, v in n.items() if v))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    ap.add_argument("--copies", type=int, default=28)
    ap.add_argument("--budget-s", type=float, default=300, help="stop sweeping after this many seconds")
    ap.add_argument("--ptx", action="store_true", help="CPU: compile for sm_90 and count PTX instructions")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run (with TRITON_INTERPRET=1)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.ptx:
        return ptx_report()
    if args.tiny:  # CPU smoke run under TRITON_INTERPRET=1: small shapes, two copies
        SHAPES.update(tiny=("mm", 128, 256), tiny_glu=("glu", 64, 256))
        args.shapes, args.rows, args.copies = ["tiny", "tiny_glu"], [1, 32], 2
    bw = copy_bandwidth(torch.device("cuda")) if torch.cuda.is_available() else 50e9
    results = sweep(args, bw)
    summary(results, bw)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(bandwidth=bw, device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", torch=torch.__version__,
                           results=results), f, indent=1)


if __name__ == "__main__":
    main()
