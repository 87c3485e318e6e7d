"""Kernel variants of the decode step, timed alone on the GPU (`python benchmarks/decode.py --variants`).

- attention: the reference (mask + SDPA over the bucketed length, what the `sdpa` path runs) against
  fast_kernels.attend at several block sizes and split counts, per (rows, context), one layer of the
  1.5B shape (12 heads, 2 KV heads, head_dim 128); checked against the reference first.
- matmuls: cuBLAS (F.linear) per projection shape and rows, fused q/k/v and gate/up against separate ones,
  and a Triton small-M kernel (optionally split over K, partial sums left for the consumer to add) over a few
  tile configurations. Times are medians of `triton.testing.do_bench` (which clears the L2 between runs),
  shares are bytes (weights + activations) / measured copy bandwidth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench

from mathgrpo.rollout import fast_kernels as K


@triton.jit
def _mm_kernel(x_ptr, w_ptr, y_ptr, M, N, Kd, sx, sw, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               SPLIT: tl.constexpr):
    pn = tl.program_id(0)
    pk = tl.program_id(1)
    rm = tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    kper = tl.cdiv(Kd, SPLIT * BK) * BK
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(pk * kper, tl.minimum(pk * kper + kper, Kd), BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None] * sx + rk[None, :], mask=(rm < M)[:, None] & (rk < Kd)[None, :], other=0.0)
        w = tl.load(w_ptr + rn[:, None] * sw + rk[None, :], mask=(rn < N)[:, None] & (rk < Kd)[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w))
    tl.store(y_ptr + pk * M * N + rm[:, None] * N + rn[None, :], acc, mask=(rm < M)[:, None] & (rn < N)[None, :])


def triton_mm(x, w, y, BN, BK, SPLIT, stages):
    M, Kd = x.shape
    N = w.shape[0]
    _mm_kernel[(triton.cdiv(N, BN), SPLIT)](x, w, y, M, N, Kd, x.stride(0), w.stride(0), BM=max(16, K._pow2(M)),
                                            BN=BN, BK=BK, SPLIT=SPLIT, num_warps=4, num_stages=stages)


def bench(fn) -> float:
    return do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3  # µs


def attention_variants(bw: float) -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    H, KV, D = 12, 2, 128
    print(f"\nattention, one layer ({H} heads, {KV} KV heads, D {D}); us; share = KV bytes / {bw / 1e12:.2f} TB/s")
    print(f"{'rows':>5}{'ctx':>7}{'sdpa':>9}{'share':>6}  best triton (block, per_sm: us share)   all")
    for rows in (1, 8, 64, 256):
        for ctx in (2048, 8192, 16384):
            kc = torch.randn(rows, KV, ctx + 256, D, device=dev, dtype=dt)
            vc = torch.randn_like(kc)
            q = torch.randn(rows, H, D, device=dev, dtype=dt)
            pad = torch.zeros(rows, dtype=torch.long, device=dev)
            col = torch.tensor([ctx - 1], device=dev)
            kv_bytes = 2 * rows * KV * ctx * D * 2
            n_cols = -(-ctx // 256) * 256

            def sdpa():
                cols = torch.arange(n_cols, device=dev)
                ok = (cols[None] >= pad[:, None]) & (cols[None] <= col)
                bias = torch.zeros(ok.shape, dtype=dt, device=dev).masked_fill_(~ok, float("-inf"))[:, None, None]
                return F.scaled_dot_product_attention(q.reshape(rows, KV, H // KV, D), kc[:, :, :n_cols],
                                                      vc[:, :, :n_cols], attn_mask=bias, scale=D ** -0.5)

            ref = sdpa().reshape(rows, H * D).float()
            t_ref = bench(sdpa)
            res = []
            for block in (32, 64, 128):
                for per_sm in (2, 4, 8):
                    sp = K.splits_for(rows, KV, dev, per_sm=per_sm)
                    out = K.attend(q, kc, vc, pad, col, D ** -0.5, sp, block_n=block)
                    err = float((out.float() - ref).norm() / ref.norm())
                    assert err < 2e-2, (rows, ctx, block, per_sm, err)
                    res.append((bench(lambda: K.attend(q, kc, vc, pad, col, D ** -0.5, sp, block_n=block)),
                                block, per_sm))
            best = min(res)
            allv = " ".join(f"{b}/{p}:{t:.0f}" for t, b, p in res)
            print(f"{rows:>5}{ctx:>7}{t_ref:>9.1f}{100 * kv_bytes / bw / (t_ref / 1e6):>5.0f}%  "
                  f"{best[1]:>4},{best[2]}: {best[0]:.1f} {100 * kv_bytes / bw / (best[0] / 1e6):.0f}%   {allv}",
                  flush=True)
            del kc, vc


SHAPES = {"qkv": (2048, 1536), "o": (1536, 1536), "gate_up": (17920, 1536), "down": (1536, 8960),
          "lm_head": (151936, 1536)}
PARTS = {"qkv": [1536, 256, 256], "gate_up": [8960, 8960]}


def matmul_variants(bw: float) -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    configs = [(bn, bk, sp, 4) for bn in (16, 32, 64) for bk in (128, 256) for sp in (1, 4)]
    print(f"\nmatmuls (bf16), us; share = (weight + x + y bytes) / {bw / 1e12:.2f} TB/s")
    print(f"{'shape':<9}{'rows':>5}{'cuBLAS':>9}{'share':>6}{'separate':>9}{'triton best':>12}{'share':>6}  config")
    for name, (N, Kd) in SHAPES.items():
        w = torch.randn(N, Kd, device=dev, dtype=dt) * 0.02
        parts = [torch.randn(n, Kd, device=dev, dtype=dt) * 0.02 for n in PARTS.get(name, [])]
        for M in (1, 8, 64, 256):
            x = torch.randn(M, Kd, device=dev, dtype=dt)
            nbytes = 2 * (N * Kd + M * Kd + M * N)
            t_cu = bench(lambda: F.linear(x, w))
            t_sep = bench(lambda: [F.linear(x, p) for p in parts]) if parts else float("nan")
            best = (float("inf"), None)
            if M <= 64 and name != "lm_head":
                ref = F.linear(x, w).float()
                for cfg in configs:
                    y = torch.empty(cfg[2], M, N, device=dev, dtype=torch.float32)
                    try:
                        triton_mm(x, w, y, *cfg)
                    except triton.runtime.errors.OutOfResources:
                        continue
                    err = float((y.sum(0) - ref).norm() / ref.norm())
                    assert err < 1e-2, (name, M, cfg, err)
                    best = min(best, (bench(lambda: triton_mm(x, w, y, *cfg)), cfg))
            share = lambda t: 100 * nbytes / bw / (t / 1e6)  # noqa: E731
            tb = f"{best[0]:>12.1f}{share(best[0]):>5.0f}%  {best[1]}" if best[1] else ""
            print(f"{name:<9}{M:>5}{t_cu:>9.1f}{share(t_cu):>5.0f}%{t_sep:>9.1f}{tb}", flush=True)


def run_variants(which=("attention", "matmul")) -> None:
    from decode import bandwidth

    bw = bandwidth(torch.device("cuda"))
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    if "attention" in which:
        attention_variants(bw)
    if "matmul" in which:
        matmul_variants(bw)
