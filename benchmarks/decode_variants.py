"""Kernel variants of the decode step, timed alone on the GPU (`python -m benchmarks.decode --variants`).

- attention: the reference (mask + SDPA over the bucketed length, what the `sdpa` path runs) against the
  triton path's rope_write + attend pair at the kernel plans' tilings (block_n / pipeline stages: the tuned
  64 / Triton's default and the conservative 32 / 2, which fits 64 KiB of shared memory) and a few others, per
  (rows, context), one layer of the 1.5B shape (12 heads, 2 KV heads, head_dim 128); checked against the
  reference first.
(The skinny matmuls, plain and fused, are swept inside CUDA graphs by benchmarks.skinny.)
Times are medians of `triton.testing.do_bench` (which clears the L2 between runs), so small shapes include one
launch's latency -- and where the CPU side of a call (Triton's launcher, several eager ops) takes longer than
the GPU side, that instead: at decode sizes, trust the engine's own step times (benchmarks.decode) over these.
Shares are bytes (weights + activations) / measured copy bandwidth."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from benchmarks.common import copy_bandwidth
from mathgrpo.rollout import fast_kernels as K
from mathgrpo.rollout.fast_forward import EAGER_OPS


def bench(fn) -> float:
    return do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3  # µs


def attention_variants(bw: float) -> None:
    """The reference (mask + SDPA over the bucketed length, with the K/V already written) against the pair
    (rope_write + attend) at a few tilings (block_n / pipeline stages)."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    H, KV, D = 12, 2, 128
    print(f"\nattention, one layer ({H} heads, {KV} KV heads, D {D}); us; share = KV bytes / {bw / 1e12:.2f} TB/s")
    print(f"{'rows':>5}{'ctx':>7}{'sdpa':>9}{'share':>6}{'pair':>8}{'share':>6}  "
          "pair by block_n/stages: us (share)")
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

            def pair(bn=64, st=None):  # the triton path: rope_write, then attend (+ its merge kernel)
                qs, ks, vs = qkv.split([H * D, KV * D, KV * D], -1)
                qo = K.rope_write(qs, ks, vs, cos, sin, pos, None, None, 1e-6, kc, vc, col, H, KV)
                return K.attend(qo, kc, vc, pad, col, D ** -0.5, sp, block_n=bn, stages=st)

            pair()  # writes this step's k/v: the reference then reads the same cache
            q = qkv[:, :H * D].reshape(rows, H, D)
            q = EAGER_OPS["rope"](q.float(), cos[pos][:, None].float(), sin[pos][:, None].float()).to(dt)

            def sdpa():
                cols = torch.arange(n_cols, device=dev)
                ok = (cols[None] >= pad[:, None]) & (cols[None] <= col)
                bias = torch.zeros(ok.shape, dtype=dt, device=dev).masked_fill_(~ok, float("-inf"))[:, None, None]
                return F.scaled_dot_product_attention(q.reshape(rows, KV, H // KV, D), kc[:, :, :n_cols],
                                                      vc[:, :, :n_cols], attn_mask=bias, scale=D ** -0.5)

            ref = sdpa().reshape(rows, H * D).float()
            assert float((pair().float() - ref).norm() / ref.norm()) < 2e-2, (rows, ctx)
            t_ref, t_pair = bench(sdpa), bench(pair)
            res = []
            for bn, st in ((32, 2), (64, 2), (32, 3), (128, 2)):
                err = float((pair(bn, st).float() - ref).norm() / ref.norm())
                assert err < 2e-2, (rows, ctx, bn, st, err)
                res.append((bench(lambda bn=bn, st=st: pair(bn, st)), bn, st))
            share = lambda t: 100 * kv_bytes / bw / (t / 1e6)  # noqa: E731
            print(f"{rows:>5}{ctx:>7}{t_ref:>9.1f}{share(t_ref):>5.0f}%{t_pair:>8.1f}{share(t_pair):>5.0f}%  "
                  + " ".join(f"{b}/{m}: {t:.1f} ({share(t):.0f}%)" for t, b, m in res), flush=True)
            del kc, vc


def run_variants() -> None:
    bw = copy_bandwidth(torch.device("cuda"))
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    attention_variants(bw)
