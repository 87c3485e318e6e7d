"""Kernel variants of the decode step, timed alone on the GPU (`python benchmarks/decode.py --variants`).

- attention: the reference (mask + SDPA over the bucketed length, what the `sdpa` path runs) against the
  default triton path's rope_write + attend pair and fast_kernels.rope_attend (RoPE + KV write + attention +
  merge in one launch) at a few block sizes and minimum split lengths, per (rows, context), one layer of the
  1.5B shape (12 heads, 2 KV heads, head_dim 128); checked against the reference first.
- fused: fast_linear's skinny matmuls (RMSNorm + q/k/v, RMSNorm + gate/up + SwiGLU, o/down + residual with
  split-K) over a grid of tiles, against the reference ops (cuBLAS + the pointwise ops, eager here), per shape
  and row count; the best tile per (kind, row tile, N, K) can be written to a JSON file that
  `decode.py --configs` loads into fast_linear.CONFIGS.
Times are medians of `triton.testing.do_bench` (which clears the L2 between runs), so small shapes include one
launch's latency -- and where the CPU side of a call (Triton's launcher, several eager ops) takes longer than
the GPU side, that instead: at decode sizes, trust the engine's own step times (decode.py) over these.
Shares are bytes (weights + activations) / measured copy bandwidth."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from mathgrpo.rollout import fast_kernels as K
from mathgrpo.rollout import fast_linear as FL
from mathgrpo.rollout.fast_forward import _rope


def bench(fn) -> float:
    return do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3  # µs


def attention_variants(bw: float) -> None:
    """The reference (mask + SDPA over the bucketed length, with the K/V already written) against the pair
    (rope_write + attend) and rope_attend (one launch) at a few block sizes / minimum split lengths."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    H, KV, D = 12, 2, 128
    print(f"\nattention, one layer ({H} heads, {KV} KV heads, D {D}); us; share = KV bytes / {bw / 1e12:.2f} TB/s")
    print(f"{'rows':>5}{'ctx':>7}{'sdpa':>9}{'share':>6}{'pair':>8}{'share':>6}  "
          "rope_attend by block_n/min_chunk: us (share)")
    for rows in (1, 8, 64, 256):
        for ctx in (2048, 8192, 16384):
            if rows * ctx > 256 * 8192:
                continue
            kc = torch.randn(rows, KV, ctx + 256, D, device=dev, dtype=dt)
            vc = torch.randn_like(kc)
            qkv = torch.randn(rows, (H + 2 * KV) * D, device=dev, dtype=dt)
            cos, sin = (torch.randn(ctx + 256, D, device=dev, dtype=dt) for _ in range(2))
            pos = torch.full((rows,), ctx - 1, device=dev)
            pad = torch.zeros(rows, dtype=torch.long, device=dev)
            col = torch.tensor([ctx - 1], device=dev)
            kv_bytes = 2 * rows * KV * ctx * D * 2
            n_cols = -(-ctx // 256) * 256
            sp = K.splits_for(rows, KV, dev)

            def fused(bn=64, mc=256):
                return K.rope_attend(qkv, cos, sin, pos, None, None, 1e-6, kc, vc, pad, col, D ** -0.5, H, sp,
                                     block_n=bn, min_chunk=mc)

            fused()  # writes this step's k/v: the reference then reads the same cache
            q = qkv[:, :H * D].reshape(rows, H, D)
            q = _rope(q.float(), cos[pos][:, None].float(), sin[pos][:, None].float()).to(dt)

            def sdpa():
                cols = torch.arange(n_cols, device=dev)
                ok = (cols[None] >= pad[:, None]) & (cols[None] <= col)
                bias = torch.zeros(ok.shape, dtype=dt, device=dev).masked_fill_(~ok, float("-inf"))[:, None, None]
                return F.scaled_dot_product_attention(q.reshape(rows, KV, H // KV, D), kc[:, :, :n_cols],
                                                      vc[:, :, :n_cols], attn_mask=bias, scale=D ** -0.5)

            def pair():  # the default triton path: rope_write, then attend (+ its merge kernel)
                qs, ks, vs = qkv.split([H * D, KV * D, KV * D], -1)
                qo = K.rope_write(qs, ks, vs, cos, sin, pos, None, None, 1e-6, kc, vc, col, H, KV)
                return K.attend(qo, kc, vc, pad, col, D ** -0.5, sp)

            ref = sdpa().reshape(rows, H * D).float()
            assert float((pair().float() - ref).norm() / ref.norm()) < 2e-2, (rows, ctx)
            t_ref, t_pair = bench(sdpa), bench(pair)
            res = []
            for bn, mc in ((64, 256), (32, 128), (64, 128), (128, 256)):
                err = float((fused(bn, mc).float() - ref).norm() / ref.norm())
                assert err < 2e-2, (rows, ctx, bn, mc, err)
                res.append((bench(lambda bn=bn, mc=mc: fused(bn, mc)), bn, mc))
            share = lambda t: 100 * kv_bytes / bw / (t / 1e6)  # noqa: E731
            print(f"{rows:>5}{ctx:>7}{t_ref:>9.1f}{share(t_ref):>5.0f}%{t_pair:>8.1f}{share(t_pair):>5.0f}%  "
                  + " ".join(f"{b}/{m}: {t:.1f} ({share(t):.0f}%)" for t, b, m in res), flush=True)
            del kc, vc


# kind -> (N, K) shapes of the 1.5B model: q/k/v fused and separate, gate/up, o and down
FUSED_SHAPES = {"norm": [(2048, 1536)], "glu": [(8960, 1536)], "residual": [(1536, 1536), (1536, 8960)]}


def _fused_call(kind, x, w, ln, cfg):
    if kind == "norm":
        return lambda: FL.norm_linear(x, ln, [w], [None], 1e-6, cfg)
    if kind == "glu":
        return lambda: FL.norm_glu(x, ln, *w.chunk(2, 0), 1e-6, cfg)
    res = torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    return lambda: FL.linear_residual(x, w, None, res, cfg)


def _reference_call(kind, x, w, ln):
    """What the engine runs without the fused kernels (eager here; the engine compiles the pointwise ops)."""
    if kind == "norm":
        return lambda: F.linear(F.rms_norm(x, (x.shape[1],), ln, 1e-6), w)
    if kind == "glu":
        def glu():
            g, u = F.linear(F.rms_norm(x, (x.shape[1],), ln, 1e-6), w).chunk(2, -1)
            return F.silu(g) * u
        return glu
    res = torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    return lambda: res + F.linear(x, w)


def fused_variants(bw: float, out_json: str | None = None) -> dict:
    """fast_linear's kernels over a grid of tiles against the reference ops, per shape and row tile; the best
    config per (kind, BM, N, K) is returned (and written to `out_json`: decode.py --configs reads it)."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    grid = {"norm": [(bn, bk, 1, 4, 3) for bn in (16, 32, 64) for bk in (128, 256)],
            "residual": [(bn, 128, sp, 4, 3) for bn in (16, 32) for sp in (1, 2, 4, 8)] + [(32, 256, 4, 4, 3)]}
    grid["glu"] = grid["norm"]
    best_cfgs = {}
    print(f"\nfused skinny matmuls (bf16), us; share = (weight + x + y bytes) / {bw / 1e12:.2f} TB/s")
    print(f"{'kind':<9}{'N':>6}{'K':>6}{'rows':>5}{'reference':>10}{'share':>6}{'default':>9}{'best':>8}{'share':>6}"
          "  config (BN, BK, SPLIT, warps, stages)")
    for kind, shapes in FUSED_SHAPES.items():
        for N, Kd in shapes:
            rows_w = 2 * N if kind == "glu" else N
            w = torch.randn(rows_w, Kd, device=dev, dtype=dt) * 0.02
            ln = torch.rand(Kd, device=dev, dtype=dt) + 0.5
            for M in (1, 8, 64):
                x = torch.randn(M, Kd, device=dev, dtype=dt)
                nbytes = 2 * (rows_w * Kd + M * Kd + M * N)
                ref_fn = _reference_call(kind, x, w, ln)
                ref = ref_fn().float()
                t_ref = bench(ref_fn)
                t_def = bench(_fused_call(kind, x, w, ln, None))
                res = []
                for cfg in grid[kind] if M != 1 else []:  # M = 1 shares the 16-row tile with M = 8
                    fn = _fused_call(kind, x, w, ln, cfg)
                    try:
                        got = fn().float()
                    except triton.runtime.errors.OutOfResources:
                        continue
                    err = float((got - ref).norm() / ref.norm())
                    assert err < 2e-2, (kind, N, Kd, M, cfg, err)
                    res.append((bench(fn), cfg))
                key = (kind, max(16, K._pow2(M)), N, Kd)
                if res:
                    best_cfgs[key] = min(res)[1]
                cfg = best_cfgs.get(key)
                t_best = bench(_fused_call(kind, x, w, ln, cfg)) if cfg else t_def
                share = lambda t: 100 * nbytes / bw / (t / 1e6)  # noqa: E731
                print(f"{kind:<9}{N:>6}{Kd:>6}{M:>5}{t_ref:>10.1f}{share(t_ref):>5.0f}%{t_def:>9.1f}{t_best:>8.1f}"
                      f"{share(t_best):>5.0f}%  {cfg}", flush=True)
    if out_json:
        import json

        with open(out_json, "w") as f:
            json.dump([[list(k), list(v)] for k, v in best_cfgs.items()], f)
    return best_cfgs


def run_variants(which=("attention", "fused"), out_json: str | None = None) -> None:
    from decode import bandwidth

    bw = bandwidth(torch.device("cuda"))
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    if "attention" in which:
        attention_variants(bw)
    if "fused" in which:
        fused_variants(bw, out_json)
