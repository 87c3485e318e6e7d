"""Skinny matmuls of the `fast` engine's decode step: y = x @ W.T (+ b) for x [M <= 64, K], W [N, K] row-major.

At decode time every projection has 1-64 rows, so it is bound by streaming W (3 GB a step at the 1.5B shape)
through the memory system, not by arithmetic. This kernel is written for that case (hand-written because it
also carries the decode step's SwiGLU, which no library fuses into a skinny matmul):

- one program per BN output columns (x split-K over SPLIT slices of K where N alone cannot fill the GPU), its
  K loop a `tl.range(..., num_stages=STAGES)` software pipeline: the loads of the next STAGES-1 chunks of W are
  issued (`cp.async`, 16 bytes a thread) before the current chunk is multiplied, so each program keeps
  several tiles of W in flight instead of waiting for its own loads;
- the matrix units do the arithmetic: with SWAP, W is the left operand (W_tile [BN, BK] @ x_tile.T [BK, BM]:
  Hopper's wgmma takes 64 W rows a warpgroup and as few as 8 rows of x), else x is (mma.sync, x padded to 16
  rows); x is tiny and re-read from L2 by every program;
- split-K partials are fp32, and the last split of an output tile to arrive (an atomic counter per tile,
  fast_kernels.counters, reset by that program) sums them in a fixed order: deterministic, one launch;
- optional epilogues: bias, GLU (SiLU(x @ Wg.T) * (x @ Wu.T) from two weight pointers).

(Compiled offline for sm_90 without the 16-byte divisibility hints that the JIT adds at run time, such a loop
shows plain `ld.global` loads and no pipeline: check PTX with those hints, benchmarks/skinny.py --ptx.)

Measured inside CUDA graphs over streamed weights (benchmarks/skinny.py, docs/benchmarks.md) it is level with
cuBLAS where bytes dominate (gate/up, down: 55-80% of the copy bandwidth either way), slower on the small,
latency-bound shapes and at 32-64 rows, and faster where it removes a kernel (SwiGLU in gate/up's epilogue).
Which matmul runs is decided by a table, (kind, N, K, row bucket) -> Config: `TABLE` holds the sweep's winners on
the card it was measured on, and the engine's kernel plan (fast_plan.py) hands it to the decode step there only
(other cards take cuBLAS). Any other shape, bucket, dtype (fp32 takes cuBLAS: the table is measured in bf16 and holds for fp16's same bytes),
strided operand, a missing Triton or a CPU device outside Triton's interpreter takes cuBLAS (`F.linear`), which
stays the reference.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F

from .fast_kernels import available, counters, launch_options, pdl, triton

if triton is not None:
    import triton.language as tl

    from .fast_kernels import _dependent

    @triton.jit
    def _tile_dot(acc, w_ptrs, w_mask, x, EVEN: tl.constexpr, SWAP: tl.constexpr, PREC: tl.constexpr):
        """acc += this K chunk's product: W tile [BN, BK] (loaded here) with x tile [BM, BK], in acc's orientation."""
        if EVEN:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        if SWAP:
            acc = tl.dot(w, tl.trans(x), acc, input_precision=PREC)
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PREC)
        return acc

    @triton.jit
    def _prefetch_l2(ptrs):
        """A hint to pull the lines at `ptrs` into L2 (no registers, no fault; PTX `prefetch`)."""
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [ptrs], dtype=tl.int32, is_pure=False,
                                  pack=1)

    @triton.jit
    def _prefetch_w(w_ptr, rn, sw, k0, N, K, BK: tl.constexpr):
        """This program's W tile [BN, BK] at column k0 toward L2: one address per 128-byte line (16-bit weights)."""
        rk = k0 + tl.arange(0, BK // 64) * 64
        _prefetch_l2(w_ptr + tl.minimum(rn, N - 1)[:, None] * sw + tl.minimum(rk, K - 1)[None, :])

    @triton.jit(do_not_specialize=["M", "K"])
    def _skinny_kernel(x_ptr, sx, w_ptr, w2_ptr, sw, b_ptr, y_ptr, sy, ws_ptr, cnt_ptr, M, N, K,
                       KPER: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       SPLIT: tl.constexpr, SWAP: tl.constexpr, STAGES: tl.constexpr, EVEN_N: tl.constexpr,
                       EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, GLU: tl.constexpr, PREC: tl.constexpr,
                       PDL: tl.constexpr, PRE: tl.constexpr):
        pn = tl.program_id(0)
        pk = tl.program_id(1)
        rm = tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        for c in tl.static_range(PRE):  # under PDL: W does not depend on the kernel before, stream it meanwhile
            _prefetch_w(w_ptr, rn, sw, pk * KPER + c * BK, N, K, BK)
            if GLU:
                _prefetch_w(w2_ptr, rn, sw, pk * KPER + c * BK, N, K, BK)
        _dependent(PDL)
        if SWAP:  # the tile is [BN, BM] (W rows x x rows)
            m2 = rm[None, :]
            n2 = rn[:, None]
            acc = tl.zeros([BN, BM], tl.float32)
            acc2 = tl.zeros([BN, BM], tl.float32)
        else:
            m2 = rm[:, None]
            n2 = rn[None, :]
            acc = tl.zeros([BM, BN], tl.float32)
            acc2 = tl.zeros([BM, BN], tl.float32)
        xm = rm[:, None] < M
        wm = rn[:, None] < N
        k_lo = pk * KPER
        for k0 in tl.range(k_lo, k_lo + KPER, BK, num_stages=STAGES):
            rk = k0 + tl.arange(0, BK)
            if EVEN_K:
                x = tl.load(x_ptr + rm[:, None] * sx + rk[None, :], mask=xm, other=0.0)
                w_mask = wm
            else:  # K not a multiple of BK * SPLIT: the tail of the last slices is masked
                x = tl.load(x_ptr + rm[:, None] * sx + rk[None, :], mask=xm & (rk[None, :] < K), other=0.0)
                w_mask = wm & (rk[None, :] < K)
            w_off = rn[:, None] * sw + rk[None, :]
            acc = _tile_dot(acc, w_ptr + w_off, w_mask, x, EVEN_N and EVEN_K, SWAP, PREC)
            if GLU:
                acc2 = _tile_dot(acc2, w2_ptr + w_off, w_mask, x, EVEN_N and EVEN_K, SWAP, PREC)
        tm = (m2 < M) & (n2 < N)
        if SPLIT > 1:  # partials [SPLIT (x2 with GLU), BM, N]; the last split sums them
            tile = m2 * N + n2
            tl.store(ws_ptr + pk * BM * N + tile, acc, mask=tm)
            if GLU:
                tl.store(ws_ptr + (SPLIT + pk) * BM * N + tile, acc2, mask=tm)
            tl.debug_barrier()  # every thread's partial is stored before the counter moves
            if tl.atomic_add(cnt_ptr + pn, 1, sem="acq_rel") != SPLIT - 1:
                return
            acc = acc * 0.0
            acc2 = acc2 * 0.0
            for s in tl.static_range(SPLIT):  # fixed order: the same sum on every replay
                acc += tl.load(ws_ptr + s * BM * N + tile, mask=tm, other=0.0, cache_modifier=".cg")
                if GLU:
                    acc2 += tl.load(ws_ptr + (SPLIT + s) * BM * N + tile, mask=tm, other=0.0, cache_modifier=".cg")
            tl.store(cnt_ptr + pn, 0)  # ready for the next launch (or graph replay)
        if HAS_BIAS:
            acc += tl.load(b_ptr + n2, mask=n2 < N, other=0.0).to(tl.float32)
        if GLU:  # SiLU(gate) * up, in fp32
            acc = acc * tl.sigmoid(acc) * acc2
        tl.store(y_ptr + m2 * sy + n2, acc.to(y_ptr.dtype.element_ty), mask=tm)


class Config(NamedTuple):
    """One kernel configuration: SWAP (W as the left operand: wgmma), BN output columns and BK of K per
    program step, SPLIT slices of K, warps, pipeline stages."""

    swap: bool
    bn: int
    bk: int
    split: int
    warps: int
    stages: int

    def __str__(self) -> str:
        return (f"triton {'wgmma' if self.swap else 'mma'} BN{self.bn} BK{self.bk} split{self.split} "
                f"w{self.warps} s{self.stages}")


DTYPES = (torch.bfloat16, torch.float16)  # what TABLE is measured for (fp32: cuBLAS, as accurate as the reference)
MAX_ROWS = 64  # more rows: cuBLAS (the weights are reused across enough rows for its kernels)
BUCKETS = (1, 8, 16, 32, 64)

# (kind, N, K, row bucket) -> Config: the sweep's winners over cuBLAS (benchmarks/skinny.py on the H200; see
# docs/benchmarks.md). Kinds: "mm" y = x @ W.T; "glu" SiLU(x @ Wg.T) * (x @ Wu.T) (N = Wg's rows).
# Absent: cuBLAS (and the reference pointwise ops).
# Measured in two sweeps (2026-12-01, NVIDIA H200, device tool, torch 2.11 CUDA 13, Triton 3.6; us per matmul
# in a CUDA graph over 28 weight copies; the 1.5B shape): the kernel wins where it saves a kernel (SwiGLU in
# gate/up's epilogue: 16.9 us against cuBLAS 17.3 + a 1.3 us pointwise kernel at 8 rows, and one launch for
# the model's separate gate and up) and on down (10.8-10.9 us against cuBLAS 10.7-12.2); elsewhere cuBLAS is
# level or faster (q/k/v, o, k/v: latency-bound at 4-6 us either way; 32-64 rows). An RMSNorm prologue or a
# residual epilogue measured slower than cuBLAS plus the pointwise kernels they would save.
TABLE: dict[tuple[str, int, int, int], Config] = {
    **{("glu", 8960, 1536, b): Config(False, 32, 128, 1, 4, 4) for b in (1, 8, 16)},  # gate/up + SwiGLU
    **{("mm", 1536, 8960, b): Config(True, 64, 128, 5, 4, 6) for b in (1, 8, 16)},  # down
    ("mm", 1536, 1536, 1): Config(False, 32, 128, 3, 4, 4),  # q and o at 1 row (no CUDA graph: 5.6 vs 6.3-6.6 us)
}


def bucket(m: int) -> int:
    """Row bucket of an M-row matmul: 1, 8, 16, 32 or 64 (0: more rows than MAX_ROWS)."""
    return next((b for b in BUCKETS if m <= b), 0)


def _bm(cfg: Config, m: int) -> int:
    return max(8 if cfg.swap else 16, 1 << max(0, m - 1).bit_length())


def usable(x: torch.Tensor, *ws: torch.Tensor, any_dtype: bool = False) -> bool:
    """Whether the kernel can take x [M, K] and weights ws here: a 2-D x with M <= MAX_ROWS, unit column
    strides, one dtype (one of DTYPES unless any_dtype), Triton on this device."""
    return (x.dim() == 2 and x.shape[0] <= MAX_ROWS and (any_dtype or x.dtype in DTYPES) and available(x.device)
            and x.stride(-1) == 1 and all(w.dtype == x.dtype and w.stride(-1) == 1 for w in ws))


def choose(kind: str, m: int, n: int, k: int, table: Mapping) -> Config | None:
    """The configuration `table` gives a `kind` of (m x k) @ (n x k).T, None for cuBLAS / the reference ops."""
    b = bucket(m)
    return table.get((kind, n, k, b)) if b else None


def launch(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, cfg: Config, w2: torch.Tensor | None = None,
           out: torch.Tensor | None = None, prefetch: int = 0) -> torch.Tensor:
    """Run the kernel: x [M, K] @ w [N, K].T (+ b) -> [M, N]. w2 (same shape and strides as w): SiLU(x @ w.T) *
    (x @ w2.T); out: where to write; prefetch: under PDL, W chunks (BK columns of each program's rows) pulled
    toward L2 before the kernel waits on the one before it (measured slower on the H200, so plans keep 0)."""
    M, K = x.shape
    N = w.shape[0]
    if w2 is not None and (w2.shape != w.shape or w2.stride() != w.stride()):
        raise ValueError("fast_matmul.launch: the GLU's two weights need the same shape and strides")
    y = out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)
    bm = _bm(cfg, M)
    tiles = triton.cdiv(N, cfg.bn)
    kper = triton.cdiv(triton.cdiv(K, cfg.split), cfg.bk) * cfg.bk
    n_ws = (2 if w2 is not None else 1) * cfg.split * bm * N
    ws = torch.empty(n_ws, dtype=torch.float32, device=x.device) if cfg.split > 1 else y
    _skinny_kernel[(tiles, cfg.split)](
        x, x.stride(0), w, w2 if w2 is not None else w, w.stride(0), b if b is not None else w, y, y.stride(0), ws,
        counters(x.device, tiles), M, N, K, KPER=kper, BM=bm, BN=cfg.bn, BK=cfg.bk, SPLIT=cfg.split, SWAP=cfg.swap,
        STAGES=cfg.stages, EVEN_N=N % cfg.bn == 0, EVEN_K=K == kper * cfg.split, HAS_BIAS=b is not None,
        GLU=w2 is not None, PREC="ieee" if x.dtype == torch.float32 else "tf32",
        PRE=prefetch if pdl() and w.element_size() == 2 else 0, num_warps=cfg.warps, num_stages=cfg.stages,
        **launch_options())
    return y


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, *, table: Mapping,
           prefetch: int = 0) -> torch.Tensor:
    """F.linear(x, w, b) for x [M, K], taking the kernel where `table` has this shape and row bucket ("mm")."""
    cfg = choose("mm", x.shape[0], *w.shape, table) if usable(x, w) else None
    return launch(x, w, b, cfg, prefetch=prefetch) if cfg is not None else F.linear(x, w, b)


def glu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, *, table: Mapping,
        prefetch: int = 0) -> torch.Tensor | None:
    """SiLU(x @ gate.T) * (x @ up.T) in one launch where `table` has it ("glu"), else None."""
    ok = usable(x, gate, up) and gate.shape == up.shape and gate.stride() == up.stride()
    cfg = choose("glu", x.shape[0], *gate.shape, table) if ok else None
    return launch(x, gate, None, cfg, w2=up, prefetch=prefetch) if cfg is not None else None


def describe(groups: dict[str, list[tuple[int, int]]], glu_shape: tuple[int, int] | None, dtype: torch.dtype,
             table: Mapping) -> dict[str, dict[str, str]]:
    """Which matmul each projection group takes per row bucket (CUDA-graph batches are multiples of 8 rows):
    groups: name -> its weights' (N, K); glu_shape: gate's (N, K) where gate/up can take the SwiGLU epilogue."""
    out: dict[str, dict[str, str]] = {g: {} for g in groups}
    for b in BUCKETS[1:]:
        for g, shapes in groups.items():
            glu_cfg = choose("glu", b, *glu_shape, table) if g == "gate_up" and glu_shape else None
            if dtype in DTYPES and glu_cfg is not None:
                out[g][f"<={b} rows"] = f"matmul + SwiGLU, {glu_cfg}"
                continue
            kinds = [str(choose("mm", b, *s, table)) if dtype in DTYPES and choose("mm", b, *s, table) else "cuBLAS"
                     for s in shapes]
            out[g][f"<={b} rows"] = " | ".join(kinds) if set(kinds) - {"cuBLAS"} else "cuBLAS"
    for g in groups:
        out[g][f">{MAX_ROWS} rows"] = "cuBLAS"
    return out
