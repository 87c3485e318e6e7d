"""Token log-probs from the lm_head on the GPU: cuBLAS logits, then one Triton pass each way over them.

    logp, entropy = fused_token_logprobs(hidden, weight, bias, ids, chunk_size, temperature, with_entropy)

The same function as `logprobs._ChunkedTokenLogprobs` (chunked, logits recomputed in the backward, nothing
[B, T, V] kept), with its memory passes fused. That path runs the logits of a chunk ([c, 151,936] on the
1.5B model) through fp32 copies: upcast, divide by the temperature, logsumexp, (entropy: subtract, exp,
multiply-sum) in the forward and, in the backward, upcast, divide, subtract, exp, negate, scatter, scale,
downcast: about 16 GB of traffic per 1,024 tokens against 1.4 TFLOP of logits matmuls. Here the logits stay
in the matmul's dtype (bf16: the very values that path upcasts) and
- forward: one kernel per row reads them once, with an online (running max) logsumexp, the target's logit and
  the entropy (running sum of p * (z - max), rescaled as the max moves), all in fp32;
- backward: one kernel reads them once and writes d logp / d z = (onehot(id) - softmax(z / T)) * g / T over
  them in place (the buffer is the next matmul's input), so the chunk costs two reads and two writes.
The matmuls stay cuBLAS's: a Triton GEMM fused with the softmax would save the logits' round trip too, but
the two passes above are ~0.4 ms per 1,024 tokens against ~1.8 ms of matmuls, and cuBLAS runs those near peak.

liger-kernel's pieces do not fit: its fused linear cross-entropy computes the gradient in the forward (the
loss must be the last op, but GRPO's loss is a nonlinear function of these log-probs), and its cross-entropy
kernel has no temperature, entropy or per-token upstream gradient. Used by `logprobs.chunked_token_logprobs` on
CUDA tensors when Triton imports (`enabled`); `set_fused(False)` turns it off (benchmarks/update.py
`lmhead=torch`). Checked against that path in tests/test_lmhead.py (CUDA, and Triton's CPU interpreter).
"""

from __future__ import annotations

import functools
import os

import torch

triton = tl = None  # imported on first use (`_kernels`): the kernels below read `tl` from this module's globals

_STATE = {"on": True}
BLOCK_FWD = 4096  # vocab tile of the forward kernel (fp32 in registers: 8 warps x 32 lanes x 16 values)
BLOCK_BWD = 4096


def set_fused(on: bool) -> None:
    """Use the fused kernels where they apply (the default) or always the plain chunked path."""
    _STATE["on"] = bool(on)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _lse_fwd(z_ptr, stride_z, ids_ptr, lse_ptr, logp_ptr, ent_ptr, n_vocab: tl.constexpr, temperature,
            BLOCK: tl.constexpr, ENTROPY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride_z
    # Running max m, sum s of exp(x - m) and (entropy) sum t of exp(x - m) * (x - m); starting m is finite
    # so the first rescale multiplies 0 by a finite number, not infinity.
    m = tl.full((), -1e30, tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for start in range(0, n_vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < n_vocab
        x = tl.load(base + offs, mask=inside, other=float("-inf")).to(tl.float32) / temperature
        m_new = tl.maximum(m, tl.max(x, 0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(x - m_new)  # 0 outside
        if ENTROPY:
            t = alpha * (t + (m - m_new) * s) + tl.sum(e * tl.where(inside, x - m_new, 0.0), 0)
        s = s * alpha + tl.sum(e, 0)
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    target = tl.load(ids_ptr + row)
    picked = tl.load(base + target).to(tl.float32) / temperature
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, picked - lse)
    if ENTROPY:  # H = lse - E[x] = log s - E[x - m]
        tl.store(ent_ptr + row, log_s - t / s)


def _dz_bwd(z_ptr, stride_z, ids_ptr, lse_ptr, g_ptr, n_vocab: tl.constexpr, temperature, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n_vocab
    ptr = z_ptr + row * stride_z + offs
    x = tl.load(ptr, mask=inside, other=0.0).to(tl.float32) / temperature
    p = tl.exp(x - tl.load(lse_ptr + row))
    onehot = tl.where(offs == tl.load(ids_ptr + row), 1.0, 0.0)
    dz = (onehot - p) * (tl.load(g_ptr + row) / temperature)
    tl.store(ptr, dz.to(z_ptr.dtype.element_ty), mask=inside)


@functools.lru_cache(maxsize=1)
def _kernels():
    """The two kernels, jitted on first use (so TRITON_INTERPRET set by then counts); None without Triton."""
    global triton, tl
    try:
        import triton
        import triton.language as tl
    except ImportError:  # CPU-only installs: the plain chunked path (loss.py)
        return None
    return triton.jit(_lse_fwd), triton.jit(_dz_bwd)


def enabled(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `logprobs.chunked_token_logprobs` takes the fused path for these tensors."""
    if not _STATE["on"] or hidden.dtype == torch.float64 or weight.dtype == torch.float64:
        return False
    if not (hidden.is_cuda or _interpreted()):
        return False
    return _kernels() is not None


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:  # [c, H] -> [c, V]
    return h @ w.t() if b is None else torch.addmm(b, h, w.t())


class _FusedTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, chunk_size, temperature, with_entropy):
        lse_fwd, _ = _kernels()
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
        h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)  # [M, H]
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        flat_ids = ids.reshape(-1).contiguous()  # [M]
        n, n_vocab = h.shape[0], w.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=h.device)  # [M]
        lse = torch.empty_like(out)  # [M]
        ent = torch.empty_like(out) if with_entropy else out.new_empty(0)  # [M] or [0]
        for s in range(0, n, chunk_size):
            e = min(n, s + chunk_size)
            z = _logits(h[s:e], w, b)  # [c, V] in the model's dtype
            lse_fwd[(e - s,)](z, z.stride(0), flat_ids[s:e], lse[s:e], out[s:e], (ent if with_entropy else out)[s:e],
                              n_vocab, float(temperature), BLOCK=BLOCK_FWD, ENTROPY=bool(with_entropy),
                              num_warps=8)
        ctx.save_for_backward(hidden, weight, bias, ids, lse)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        ent = ent.reshape(ids.shape) if with_entropy else ent  # [B, T] or [0]
        ctx.mark_non_differentiable(ent)
        return out.reshape(ids.shape), ent

    @staticmethod
    def backward(ctx, grad_out, _grad_entropy=None):  # grad_out [B, T]; entropy carries no gradient
        _, dz_bwd = _kernels()
        hidden, weight, bias, ids, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
        h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)  # [M, H]
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        flat_ids = ids.reshape(-1).contiguous()
        g = grad_out.reshape(-1).float().contiguous()  # [M]
        n, n_vocab = h.shape[0], w.shape[0]
        grad_h = torch.empty_like(h) if need_h else None  # [M, H]
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None  # [V, H]
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if need_b else None  # [V]
        for s in range(0, n, ctx.chunk_size):
            e = min(n, s + ctx.chunk_size)
            dz = _logits(h[s:e], w, b)  # [c, V], overwritten by its gradient below
            dz_bwd[(e - s, -(-n_vocab // BLOCK_BWD))](dz, dz.stride(0), flat_ids[s:e], lse[s:e], g[s:e], n_vocab,
                                                      float(ctx.temperature), BLOCK=BLOCK_BWD, num_warps=4)
            if need_h:
                grad_h[s:e] = dz @ w
            if need_w:
                grad_w += dz.t() @ h[s:e]
            if need_b:
                grad_b += dz.float().sum(0)
        grad_h = None if grad_h is None else grad_h.reshape(hidden.shape).to(hidden.dtype)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def fused_token_logprobs(hidden, weight, bias, ids, chunk_size: int, temperature: float, with_entropy: bool):
    """(log-probs [B, T] fp32, entropy [B, T] or [0]) as `logprobs._ChunkedTokenLogprobs.apply`; see the module."""
    return _FusedTokenLogprobs.apply(hidden, weight, bias, ids, chunk_size, temperature, with_entropy)
