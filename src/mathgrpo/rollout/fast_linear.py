"""Skinny-matmul Triton kernels of the `fast` engine's decode step (rows <= MAX_ROWS), fused with their neighbours.

At decode time a layer's matmuls have 1-64 rows: they are bound by reading the weights and, at this size, by
launch latency, so each pointwise kernel between them costs about as much as its bytes are worth. Three
kernels replace the reference's RMSNorm, the projections, SwiGLU, the bias and the residual adds of a layer:

- `norm_linear`: y = RMSNorm(x) @ W.T (+ b) (q/k/v). The norm is a prologue: each program multiplies the
  x chunks it loads by the norm weight and sums their squares on the way, and scales its accumulator by
  the row's 1/rms at the end (the same x chunks serve both: no extra read, no normed copy of x).
- `norm_glu`: act(RMSNorm(x) @ Wg.T) * (RMSNorm(x) @ Wu.T) (gate/up + SwiGLU): each program holds a gate and
  an up accumulator for the same output columns; the fused owned copy ([gate; up]) and the model's own
  separate tensors are read alike (two pointers), so nothing has to be interleaved.
- `linear_residual`: x += a @ W.T (+ b), in place (o and down). Split over K so that a 1,536-column output
  still spreads over every multiprocessor: each split stores its fp32 partial, and the last split of an
  output tile to finish (an atomic counter per tile, reset by that program) sums the partials in a fixed
  order and adds bias and residual: one launch, deterministic, no separate reduction kernel.

The tile shapes come from `config` (measured per shape on the H200 with `benchmarks/decode.py --variants`).
Without Triton, with more rows (cuBLAS wins once the weights are reused across many rows), or for a group
that `plain` rejects (low-rank LoRA pairs, weights dequantised per use, a bias on gate/up, a non-SiLU
activation), the engine keeps the reference ops for that group (`describe` says which).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .fast_kernels import _pow2, counters, triton
from .fast_weights import LayerWeights

MAX_ROWS = 64  # graph batch sizes up to this take the kernels below; more rows: cuBLAS

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _norm_linear_kernel(x_ptr, sx, ln_ptr, w1_ptr, w2_ptr, sw, b_ptr, y_ptr, sy, ws_ptr, ss_ptr, cnt_ptr,
                            M, N, K, eps, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
                            GLU: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr):
        pn = tl.program_id(0)
        pk = tl.program_id(1)
        rm = tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        mm, nm = rm < M, rn < N
        kper = tl.cdiv(tl.cdiv(K, SPLIT), BK) * BK
        acc1 = tl.zeros([BM, BN], tl.float32)
        acc2 = tl.zeros([BM, BN], tl.float32)
        ss = tl.zeros([BM], tl.float32)
        for k0 in range(pk * kper, tl.minimum(pk * kper + kper, K), BK):
            rk = k0 + tl.arange(0, BK)
            km = rk < K
            x = tl.load(x_ptr + rm[:, None] * sx + rk[None, :], mask=mm[:, None] & km[None, :], other=0.0)
            xf = x.to(tl.float32)
            ss += tl.sum(xf * xf, 1)
            xn = (xf * tl.load(ln_ptr + rk, mask=km, other=0.0).to(tl.float32)[None, :]).to(x.dtype)
            w_off = rn[:, None] * sw + rk[None, :]
            w_mask = nm[:, None] & km[None, :]
            acc1 += tl.dot(xn, tl.trans(tl.load(w1_ptr + w_off, mask=w_mask, other=0.0)), input_precision=PREC)
            if GLU:
                acc2 += tl.dot(xn, tl.trans(tl.load(w2_ptr + w_off, mask=w_mask, other=0.0)), input_precision=PREC)
        if SPLIT > 1:  # as linear_residual: partials, and the last split of a tile sums them (and the squares)
            tile = rm[:, None] * N + rn[None, :]
            tm = mm[:, None] & nm[None, :]
            tl.store(ws_ptr + pk * BM * N + tile, acc1, mask=tm)
            if GLU:
                tl.store(ws_ptr + (SPLIT + pk) * BM * N + tile, acc2, mask=tm)
            tl.store(ss_ptr + pk * BM + rm, ss)  # the same values from every tile of this split
            tl.debug_barrier()
            if tl.atomic_add(cnt_ptr + pn, 1, sem="acq_rel") != SPLIT - 1:
                return
            acc1 = tl.zeros([BM, BN], tl.float32)
            acc2 = tl.zeros([BM, BN], tl.float32)
            ss = tl.zeros([BM], tl.float32)
            for s in tl.static_range(SPLIT):
                acc1 += tl.load(ws_ptr + s * BM * N + tile, mask=tm, other=0.0, cache_modifier=".cg")
                if GLU:
                    acc2 += tl.load(ws_ptr + (SPLIT + s) * BM * N + tile, mask=tm, other=0.0, cache_modifier=".cg")
                ss += tl.load(ss_ptr + s * BM + rm, cache_modifier=".cg")
            tl.store(cnt_ptr + pn, 0)
        r = tl.rsqrt(ss / K + eps)[:, None]  # [BM, 1]
        y = acc1 * r
        if GLU:  # SiLU(gate) * up, in fp32
            y = y * tl.sigmoid(y) * (acc2 * r)
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * sy + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mm[:, None] & nm[None, :])

    @triton.jit
    def _linear_residual_kernel(a_ptr, sa, w_ptr, sw, b_ptr, x_ptr, sx, ws_ptr, cnt_ptr, M, N, K,
                                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr,
                                HAS_BIAS: tl.constexpr, PREC: tl.constexpr):
        pn = tl.program_id(0)
        pk = tl.program_id(1)
        rm = tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        mm, nm = rm < M, rn < N
        kper = tl.cdiv(tl.cdiv(K, SPLIT), BK) * BK
        acc = tl.zeros([BM, BN], tl.float32)
        for k0 in range(pk * kper, tl.minimum(pk * kper + kper, K), BK):
            rk = k0 + tl.arange(0, BK)
            km = rk < K
            a = tl.load(a_ptr + rm[:, None] * sa + rk[None, :], mask=mm[:, None] & km[None, :], other=0.0)
            w = tl.load(w_ptr + rn[:, None] * sw + rk[None, :], mask=nm[:, None] & km[None, :], other=0.0)
            acc += tl.dot(a, tl.trans(w), input_precision=PREC)
        tile = rm[:, None] * N + rn[None, :]
        if SPLIT > 1:
            tl.store(ws_ptr + pk * BM * N + tile, acc, mask=mm[:, None] & nm[None, :])
            tl.debug_barrier()  # every thread's partial is stored before the counter moves
            if tl.atomic_add(cnt_ptr + pn, 1, sem="acq_rel") != SPLIT - 1:
                return  # not the last split of this tile: that one finishes it
            acc = tl.zeros([BM, BN], tl.float32)
            for s in tl.static_range(SPLIT):  # fixed order: the same sum on every replay
                acc += tl.load(ws_ptr + s * BM * N + tile, mask=mm[:, None] & nm[None, :], other=0.0,
                               cache_modifier=".cg")
            tl.store(cnt_ptr + pn, 0)  # ready for the next launch (or graph replay)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
        x_off = x_ptr + rm[:, None] * sx + rn[None, :]
        x = tl.load(x_off, mask=mm[:, None] & nm[None, :], other=0.0)
        tl.store(x_off, (x.to(tl.float32) + acc).to(x.dtype), mask=mm[:, None] & nm[None, :])


# (kind, BM, N, K) -> (BN, BK, SPLIT, num_warps, num_stages), BM the row tile (16, 32 or 64); kind: norm
# (norm_linear), glu (norm_glu), residual (linear_residual). Any other shape takes `_default`.
CONFIGS: dict[tuple[str, int, int, int], tuple[int, int, int, int, int]] = {}


def _default(kind: str, M: int, N: int, K: int) -> tuple[int, int, int, int, int]:
    """The tiles: 32 output columns a program, and K split until there are about four programs per
    multiprocessor (the K loop is latency-bound at this size: more programs in flight, more bytes in flight)."""
    bn = 32
    tiles = -(-N // bn)
    split = max(1, min(16, _pow2(-(-528 // tiles)), K // 256))
    return bn, 128, split, 4, 3


def config(kind: str, M: int, N: int, K: int) -> tuple[int, int, int, int, int]:
    return CONFIGS.get((kind, max(16, _pow2(M)), N, K)) or _default(kind, M, N, K)


def _prec(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def norm_linear(x: torch.Tensor, ln: torch.Tensor, ws: list[torch.Tensor], bs: list, eps: float,
                cfg: tuple | None = None) -> torch.Tensor:
    """RMSNorm(x; ln) @ [W_1; W_2; ...].T (+ biases) for x [M, K] -> [M, sum N_i] (one launch per tensor)."""
    M, K = x.shape
    sizes = [w.shape[0] for w in ws]
    y = torch.empty(M, sum(sizes), dtype=x.dtype, device=x.device)
    for w, b, part in zip(ws, bs, y.split(sizes, -1)):
        _launch_norm(x, ln, w, w, b, part, eps, False, cfg or config("norm", M, w.shape[0], K))
    return y


def _launch_norm(x, ln, w1, w2, b, y, eps: float, glu: bool, cfg: tuple) -> None:
    M, K = x.shape
    N = w1.shape[0]
    bn, bk, split, warps, stages = cfg
    BM = max(16, _pow2(M))
    tiles = triton.cdiv(N, bn)
    f32 = torch.float32
    ws = torch.empty((2 if glu else 1) * split, BM, N, dtype=f32, device=x.device) if split > 1 else y
    ss = torch.empty(split, BM, dtype=f32, device=x.device) if split > 1 else y
    _norm_linear_kernel[(tiles, split)](
        x, x.stride(0), ln, w1, w2, w1.stride(0), b if b is not None else w1, y, y.stride(0), ws, ss,
        counters(x.device, tiles), M, N, K, eps, BM=BM, BN=bn, BK=bk, SPLIT=split, GLU=glu, HAS_BIAS=b is not None,
        PREC=_prec(x), num_warps=warps, num_stages=stages)


def norm_glu(x: torch.Tensor, ln: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, eps: float,
             cfg: tuple | None = None) -> torch.Tensor:
    """SiLU(RMSNorm(x) @ gate.T) * (RMSNorm(x) @ up.T) for x [M, K], gate/up [I, K] (same row stride) -> [M, I]."""
    M, K = x.shape
    N = gate.shape[0]
    assert up.shape == gate.shape and up.stride() == gate.stride()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    _launch_norm(x, ln, gate, up, None, y, eps, True, cfg or config("glu", M, N, K))
    return y


def linear_residual(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, x: torch.Tensor,
                    cfg: tuple | None = None) -> torch.Tensor:
    """x += a @ w.T (+ b), in place, for a [M, K], w [N, K], x [M, N]; returns x."""
    M, K = a.shape
    N = w.shape[0]
    assert x.shape == (M, N) and x.stride(-1) == 1
    bn, bk, split, warps, stages = cfg or config("residual", M, N, K)
    BM = max(16, _pow2(M))
    tiles = triton.cdiv(N, bn)
    ws = torch.empty(split, BM, N, dtype=torch.float32, device=a.device) if split > 1 else x
    _linear_residual_kernel[(tiles, split)](
        a, a.stride(0), w, w.stride(0), b if b is not None else w, x, x.stride(0), ws, counters(a.device, tiles),
        M, N, K, BM=BM, BN=bn, BK=bk, SPLIT=split, HAS_BIAS=b is not None, PREC=_prec(a), num_warps=warps,
        num_stages=stages)
    return x


# ----- which groups take the kernels ----------------------------------------------------------------------

def _tensors(ws: list) -> bool:
    return all(isinstance(t, torch.Tensor) and t.stride(-1) == 1 for t in ws)


def _silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def plain(L: LayerWeights, act) -> dict[str, bool]:
    """Per projection group of a layer: whether its weights can go through these kernels."""
    gu = L.gate_up
    return {"qkv": L.qkv_lora is None and _tensors(L.qkv),
            "o": L.o_lora is None and _tensors([L.o]),
            "gate_up": (L.gate_up_lora is None and _tensors(gu) and all(b is None for b in L.gate_up_bias)
                        and _silu(act) and (len(gu) == 2 or gu[0].shape[0] % 2 == 0)),
            "down": L.down_lora is None and _tensors([L.down])}


def gate_up_of(L: LayerWeights) -> tuple[torch.Tensor, torch.Tensor]:
    gu = L.gate_up
    return (gu[0], gu[1]) if len(gu) == 2 else tuple(gu[0].chunk(2, 0))


def describe(w, act) -> dict[str, str]:
    """Which kernels each group's decode matmuls take on the Triton path (rows <= MAX_ROWS)."""
    kern = {"qkv": "triton RMSNorm+matmul", "o": "triton matmul+residual (split-K)",
            "gate_up": "triton RMSNorm+matmul+SwiGLU", "down": "triton matmul+residual (split-K)"}
    ok = [plain(L, act) for L in w.layers]
    return {g: (kern[g] if all(o[g] for o in ok) else "reference ops (cuBLAS)" if not any(o[g] for o in ok)
                else "mixed") + f" at <= {MAX_ROWS} rows" for g in kern}
