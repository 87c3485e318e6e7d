"""Triton kernels of the `fast` engine's decode attention; the SDPA path in fast_forward.py is their reference.

The default triton path runs two per layer (and a small merge) in place of the reference's RoPE (+ Qwen3 q/k
norms), the two `index_copy_` KV writes, the attention mask built per step and SDPA:

- `rope_write`: one program per (row, head) of the q/k/v projection output: q heads are normed (Qwen3) and
  rotated into a small q buffer, k heads normed, rotated and written into the cache at column `col`, v
  heads copied there. cos/sin are read straight from the table at each row's position.
- `attend`: flash-decoding. Grid (rows * kv_heads, splits): each program takes one KV head with all of its
  `group` query heads (GQA: K/V are read once per KV head, not once per query head) and one slice of
  the row's filled columns [pad_b, col], read from device memory; so the kernel reads only the filled
  part of the cache, the grid is the same at every length (one CUDA graph serves a whole generation),
  and a short batch still spreads over every multiprocessor. A second small kernel merges the splits'
  partial softmax sums.

Their tiling (columns a block step, pipeline stages, columns a split) is the engine's kernel plan's
(fast_plan.py): the measured one on the card it was measured on, one that fits 64 KiB of shared memory elsewhere.

Programmatic dependent launch (PDL, Hopper and later): inside `dependent_launch(True)` every kernel here (and
fast_matmul's) launches with CUDA's programmatic-serialization attribute, so the GPU starts it while the kernel
before it drains; its first instruction (`griddepcontrol.wait`) holds it until that kernel's memory is visible,
and its second lets the next one launch in turn. At decode sizes a kernel is a few microseconds, and each
boundary otherwise costs the drain, the launch and the ramp-up of the next grid. The engine turns it on where the
GPU supports it (`supports_pdl`); CUDA graphs keep the launch attribute. Measured on the H200: 0.4-3% a step
(docs/benchmarks.md): inside a graph the launch gaps were already small.

Without Triton (or on CPU outside its interpreter) `available()` is False and the engine takes the
reference path. The tests run these against the reference on the GPU, and on CPU with TRITON_INTERPRET=1."""

from __future__ import annotations

import contextlib
import contextvars
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # torch alone: the engine uses the SDPA reference path
    triton = None

_LOG2E = 1.4426950408889634

if triton is not None and os.environ.get("TRITON_INTERPRET") == "1":  # CPU tests run the kernels interpreted
    from triton.runtime import interpreter as _interp

    _patch = _interp._patch_lang_tensor

    def _patch_index(tensor, scope):
        # Triton 3.6's interpreter holds scalars as 1-element arrays and converts them with int(), which
        # numpy >= 2.4 refuses: a runtime loop bound (`range(lo, hi, ...)`) then fails. Convert with .item().
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_index


def available(device: torch.device) -> bool:
    """Whether the kernels can run on `device` (a CUDA GPU of compute capability >= 7.0 with Triton, which
    supports no older card, or CPU under TRITON_INTERPRET=1)."""
    if triton is None:
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 7
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


_PDL = contextvars.ContextVar("fast_kernels_pdl", default=False)


@contextlib.contextmanager
def dependent_launch(on: bool):
    """Kernels launched inside take programmatic dependent launch (see the module docstring) when `on`."""
    token = _PDL.set(bool(on))
    try:
        yield
    finally:
        _PDL.reset(token)


def pdl() -> bool:
    """Whether kernels launched now take programmatic dependent launch (`dependent_launch`)."""
    return _PDL.get()


def supports_pdl(device: torch.device) -> bool:
    """PDL needs a CUDA GPU of compute capability >= 9 (Hopper) and a Triton with grid dependency control."""
    return (triton is not None and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
            and hasattr(getattr(getattr(tl, "extra", None), "cuda", None), "gdc_wait"))


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def splits_for(rows: int, n_kv: int, device: torch.device, per_sm: int = 8, cap: int = 64) -> int:
    """Number of KV-length splits: enough programs to give every multiprocessor `per_sm` of them at long
    contexts (a short one uses fewer: at least `attend`'s min_chunk columns a split)."""
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(cap, _pow2(-(-per_sm * n_sm // (rows * n_kv)))))


if triton is not None:

    @triton.jit
    def _dependent(PDL: tl.constexpr):
        """Under PDL: wait until the previous kernel's writes are visible, then let the next kernel launch."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _rope_write_kernel(q_ptr, k_ptr, v_ptr, sq, sk, sv, cos_ptr, sin_ptr, pos_ptr, qn_ptr, kn_ptr, eps,
                           qo_ptr, kc_ptr, vc_ptr, col_ptr, s_b, s_h, s_s,
                           H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                           NORM: tl.constexpr, PDL: tl.constexpr):
        _dependent(PDL)
        b = tl.program_id(0)
        h = tl.program_id(1)  # [0, H) q heads, [H, H+KV) k heads, [H+KV, H+2KV) v heads
        i = tl.arange(0, HALF)
        m = i < D // 2
        col = tl.load(col_ptr)
        if h >= H + KV:  # v: copied into the cache as it is
            src = v_ptr + b * sv + (h - H - KV) * D
            dst = vc_ptr + b.to(tl.int64) * s_b + (h - H - KV) * s_h + col * s_s
            tl.store(dst + i, tl.load(src + i, mask=m), mask=m)
            tl.store(dst + D // 2 + i, tl.load(src + D // 2 + i, mask=m), mask=m)
        else:
            if h < H:
                src = q_ptr + b * sq + h * D
                nw = qn_ptr
            else:
                src = k_ptr + b * sk + (h - H) * D
                nw = kn_ptr
            x1 = tl.load(src + i, mask=m, other=0.0)
            x2 = tl.load(src + D // 2 + i, mask=m, other=0.0)
            dt = x1.dtype
            x1 = x1.to(tl.float32)
            x2 = x2.to(tl.float32)
            if NORM:  # Qwen3's per-head RMSNorm (as HF: normalise in fp32, round, then scale)
                r = tl.rsqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / D + eps)
                x1 = (x1 * r).to(dt).to(tl.float32) * tl.load(nw + i, mask=m, other=0.0).to(tl.float32)
                x2 = (x2 * r).to(dt).to(tl.float32) * tl.load(nw + D // 2 + i, mask=m, other=0.0).to(tl.float32)
                x1 = x1.to(dt).to(tl.float32)
                x2 = x2.to(dt).to(tl.float32)
            p = tl.load(pos_ptr + b)
            c1 = tl.load(cos_ptr + p * D + i, mask=m, other=0.0).to(tl.float32)
            c2 = tl.load(cos_ptr + p * D + D // 2 + i, mask=m, other=0.0).to(tl.float32)
            s1 = tl.load(sin_ptr + p * D + i, mask=m, other=0.0).to(tl.float32)
            s2 = tl.load(sin_ptr + p * D + D // 2 + i, mask=m, other=0.0).to(tl.float32)
            y1 = (x1 * c1 - x2 * s1).to(dt)  # rotate_half: [-x2, x1]
            y2 = (x2 * c2 + x1 * s2).to(dt)
            if h < H:
                dst = qo_ptr + (b * H + h) * D
            else:
                dst = kc_ptr + b.to(tl.int64) * s_b + (h - H) * s_h + col * s_s
            tl.store(dst + i, y1, mask=m)
            tl.store(dst + D // 2 + i, y2, mask=m)

    @triton.jit
    def _split_plan(n_cols, pad, NSPLIT: tl.constexpr, BLOCK_N: tl.constexpr, MIN_CHUNK: tl.constexpr):
        """(first column, columns per split, splits in use) for a row: at least MIN_CHUNK columns a split,
        so a short context fills few splits (and leaves few partial sums to merge)."""
        start = (pad // BLOCK_N) * BLOCK_N
        n = tl.maximum(n_cols - start, 0)
        chunk = tl.maximum(tl.cdiv(tl.cdiv(n, NSPLIT), BLOCK_N) * BLOCK_N, MIN_CHUNK)
        return start, chunk, tl.cdiv(n, chunk)

    @triton.jit
    def _attend_split_kernel(q_ptr, kc_ptr, vc_ptr, pad_ptr, col_ptr, m_ptr, l_ptr, acc_ptr, qk_scale,
                             s_b, s_h, s_s, H: tl.constexpr, KV: tl.constexpr, G: tl.constexpr,
                             GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, NSPLIT: tl.constexpr,
                             BLOCK_N: tl.constexpr, MIN_CHUNK: tl.constexpr, PREC: tl.constexpr,
                             PDL: tl.constexpr):
        _dependent(PDL)
        bk = tl.program_id(0)
        sp = tl.program_id(1)
        b = bk // KV
        kh = bk % KV
        n_cols = tl.load(col_ptr) + 1  # columns [pad, col] are this row's
        pad = tl.load(pad_ptr + b)
        start, chunk, _ = _split_plan(n_cols, pad, NSPLIT, BLOCK_N, MIN_CHUNK)
        lo = start + sp * chunk
        hi = tl.minimum(lo + chunk, n_cols)
        if lo >= hi:  # a split past the filled length: the merge does not read it
            return
        g = tl.arange(0, GP)
        d = tl.arange(0, DP)
        gm = g < G
        dm = d < D
        q = tl.load(q_ptr + (b * H + kh * G + g)[:, None] * D + d[None, :], mask=gm[:, None] & dm[None, :],
                    other=0.0)  # [GP, DP]
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DP], tl.float32)
        base = b.to(tl.int64) * s_b + kh * s_h  # one layer of a 256-row 32k cache passes 2**31 elements
        for s0 in range(lo, hi, BLOCK_N):
            j = s0 + tl.arange(0, BLOCK_N)
            jm = j < hi
            k = tl.load(kc_ptr + base + j[:, None] * s_s + d[None, :], mask=jm[:, None] & dm[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [GP, BLOCK_N], log2 units
            s = tl.where((jm & (j >= pad))[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block of padding only: nothing to add
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(vc_ptr + base + j[:, None] * s_s + d[None, :], mask=jm[:, None] & dm[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        row = (b * H + kh * G + g) * NSPLIT + sp  # partials [B, H, NSPLIT(, D)]
        tl.store(m_ptr + row, m_i, mask=gm)
        tl.store(l_ptr + row, l_i, mask=gm)
        tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=gm[:, None] & dm[None, :])

    @triton.jit
    def _attend_merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, pad_ptr, col_ptr, H: tl.constexpr, D: tl.constexpr,
                             DP: tl.constexpr, NSPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
                             MIN_CHUNK: tl.constexpr, PDL: tl.constexpr):
        _dependent(PDL)
        bh = tl.program_id(0)
        _, _, used = _split_plan(tl.load(col_ptr) + 1, tl.load(pad_ptr + bh // H), NSPLIT, BLOCK_N, MIN_CHUNK)
        sp = tl.arange(0, NSPLIT)
        d = tl.arange(0, DP)
        um = sp < used
        m = tl.load(m_ptr + bh * NSPLIT + sp, mask=um, other=float("-inf"))
        l = tl.load(l_ptr + bh * NSPLIT + sp, mask=um, other=0.0)
        top = tl.max(m, 0)
        w = tl.exp2(m - tl.where(top == float("-inf"), 0.0, top))  # a split of padding only weighs 0
        acc = tl.load(acc_ptr + (bh * NSPLIT + sp)[:, None] * D + d[None, :], mask=um[:, None] & (d < D)[None, :],
                      other=0.0)
        den = tl.sum(l * w, 0)
        o = tl.sum(acc * w[:, None], 0) / tl.where(den == 0, 1.0, den)  # a row with no columns (unused slot): 0
        tl.store(out_ptr + bh * D + d, o.to(out_ptr.dtype.element_ty), mask=d < D)


def _min_chunk(rows: int, n_kv: int) -> int:
    """Columns a split takes at least: 128 for a few (row, KV head) pairs, whose splits are then twice as many
    (more blocks reading the cache at once), 256 otherwise (fewer partial sums to merge). Measured on the H200
    (ms per step, 128 against 256): 1 x 2k 1.670 / 1.716, 8 x 2k 1.832 / 1.856, 8 x 16k 2.616 / 2.613,
    64 x 2k 2.992 / 2.962."""
    return 128 if rows * n_kv <= 16 else 256


def launch_options() -> dict:
    """The PDL constexpr and launch option of a kernel launched now (`dependent_launch`)."""
    on = pdl()
    return dict(PDL=on, launch_pdl=True) if on else dict(PDL=False)


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def counters(device: torch.device, n: int) -> torch.Tensor:
    """Arrival counters for kernels whose last program to finish a tile sums the others' partials: zero between
    launches (each launch resets the ones it used), so kernels in one stream can share them."""
    c = _COUNTERS.get(device)
    if c is None or c.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("fast_kernels: counters must be allocated before CUDA graph capture (warm-up)")
        c = _COUNTERS[device] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return c


def rope_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               pos: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
               kc: torch.Tensor, vc: torch.Tensor, col: torch.Tensor, n_heads: int, n_kv: int) -> torch.Tensor:
    """q [B, H*D], k, v [B, KV*D] (row-strided views are fine); cos, sin [len, D]; pos [B]; kc, vc one layer's
    cache [rows, KV, cap, D]; col [1]. Writes rotated k and v at column col; returns rotated q [B, H, D]."""
    B, D = q.shape[0], cos.shape[-1]
    assert kc.stride(-1) == 1 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and cos.is_contiguous()
    qo = torch.empty(B, n_heads, D, dtype=q.dtype, device=q.device)
    norm = q_norm is not None
    _rope_write_kernel[(B, n_heads + 2 * n_kv)](
        q, k, v, q.stride(0), k.stride(0), v.stride(0), cos, sin, pos, q_norm if norm else cos,
        k_norm if norm else cos, eps, qo, kc, vc, col, kc.stride(0), kc.stride(1), kc.stride(2),
        H=n_heads, KV=n_kv, D=D, HALF=_pow2(D // 2), NORM=norm, **launch_options())
    return qo


def attend(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, pad: torch.Tensor, col: torch.Tensor,
           scale: float, n_splits: int, block_n: int = 64, min_chunk: int | None = None,
           stages: int | None = None) -> torch.Tensor:
    """Decode attention of q [B, H, D] over one layer's cache kc, vc [rows, KV, cap, D], row b seeing columns
    [pad[b], col] -> [B, H*D]. n_splits: a power of two (see `splits_for`); block_n: columns a block step;
    min_chunk: a multiple of block_n (None: `_min_chunk`); stages: the column loop's software-pipeline depth (None:
    Triton's default; each stage holds a K and a V tile in shared memory)."""
    B, H, D = q.shape
    KV = kc.shape[1]
    min_chunk = min_chunk or max(block_n, _min_chunk(B, KV))
    G = H // KV
    f32 = torch.float32
    m = torch.empty(B, H, n_splits, dtype=f32, device=q.device)
    l_ = torch.empty_like(m)
    acc = torch.empty(B, H, n_splits, D, dtype=f32, device=q.device)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    tiling = {"num_stages": stages} if stages else {}
    _attend_split_kernel[(B * KV, n_splits)](
        q, kc, vc, pad, col, m, l_, acc, scale * _LOG2E, kc.stride(0), kc.stride(1), kc.stride(2),
        H=H, KV=KV, G=G, GP=max(16, _pow2(G)), D=D, DP=max(16, _pow2(D)), NSPLIT=n_splits, BLOCK_N=block_n,
        MIN_CHUNK=min_chunk, PREC=prec, **tiling, **launch_options())
    out = torch.empty(B, H * D, dtype=q.dtype, device=q.device)
    _attend_merge_kernel[(B * H,)](m, l_, acc, out, pad, col, H=H, D=D, DP=_pow2(D), NSPLIT=n_splits,
                                   BLOCK_N=block_n, MIN_CHUNK=min_chunk, **launch_options())
    return out
