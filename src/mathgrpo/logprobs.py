"""Token log-probs without [B, T, V] tensors: the lm_head applied a chunk of rows at a time, logits recomputed in
the backward, so no full logits tensor ever exists (at 151,936 vocabulary x 16k tokens it would be ~10 GB in fp32).

`chunked_token_logprobs(hidden, lm_head_weight, ids)` -> each target token's log-prob under the temperature (and its
entropy on request); on CUDA the fused Triton kernels of lmhead.py compute the same function. Called by
models.completion_logprobs and packing.py for every log-prob pass of the update; check with
`pytest tests/test_loss.py tests/test_lmhead.py -q`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import lmhead


def _chunk_logits(h: Tensor, w: Tensor, b: Tensor | None, temperature: float) -> Tensor:  # [c,H] -> [c,V]
    # Matmul in the model's dtype (bf16 on GPU, tensor cores); softmax math in fp32 (fp64 if given fp64).
    z = h @ w.t()
    if b is not None:
        z = z + b
    return z.to(torch.promote_types(z.dtype, torch.float32)) / temperature


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """Per-token log p(ids) from hidden states; saves only inputs and logsumexp, recomputes logits in backward.
    Second output: the entropy of each position's distribution ([B, T], or [0] when not asked for), computed
    from the same chunk of logits; differentiable only when asked with with_entropy="grad" (the entropy bonus:
    dH/dz_v = -p_v (log p_v + H), computed from the same recomputed chunk in the backward)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, chunk_size, temperature, with_entropy=False):
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
        h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)  # [M, H]
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)  # [V, H], [V]
        flat_ids = ids.reshape(-1)  # [M]
        out = torch.empty(h.shape[0], dtype=torch.promote_types(dtype, torch.float32), device=h.device)  # [M]
        lse = torch.empty_like(out)  # [M]
        ent = torch.empty_like(out) if with_entropy else out.new_empty(0)  # [M] or [0]
        for s in range(0, h.shape[0], chunk_size):
            z = _chunk_logits(h[s : s + chunk_size], w, b, temperature)  # [c, V]
            lse[s : s + chunk_size] = torch.logsumexp(z, dim=1)
            picked = z.gather(1, flat_ids[s : s + chunk_size, None]).squeeze(1)  # [c]
            out[s : s + chunk_size] = picked - lse[s : s + chunk_size]
            if with_entropy:  # H = -sum_v p_v log p_v; log p (not z) keeps the fp32 sum from cancelling
                lp = z.sub_(lse[s : s + chunk_size, None])  # [c, V], z is not needed any more
                ent[s : s + chunk_size] = -torch.einsum("cv,cv->c", lp.exp(), lp)
        ctx.save_for_backward(hidden, weight, bias, ids, lse, ent)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no work for it
        ent = ent.reshape(ids.shape) if with_entropy else ent  # [B, T] or [0]
        if with_entropy != "grad":
            ctx.mark_non_differentiable(ent)
        return out.reshape(ids.shape), ent  # [B, T]

    @staticmethod
    def backward(ctx, grad_out, grad_entropy=None):  # [B, T] each, or None where that output was not used
        hidden, weight, bias, ids, lse, ent = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
        h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)  # [M, H]
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        acc = lse.dtype  # fp32 (fp64 for fp64 inputs): grads of W/b accumulate over chunks in it
        flat_ids = ids.reshape(-1)  # [M]
        g = torch.zeros_like(lse) if grad_out is None else grad_out.reshape(-1).to(acc)  # [M]
        g_ent = None if grad_entropy is None else grad_entropy.reshape(-1).to(acc)  # [M]
        grad_h = torch.empty_like(h) if need_h else None  # [M, H]
        grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_w else None  # [V, H]
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=h.device) if need_b else None  # [V]
        for s in range(0, h.shape[0], ctx.chunk_size):
            e = s + ctx.chunk_size
            z = _chunk_logits(h[s:e], w, b, ctx.temperature)  # [c, V]
            # d logp[id] / d z = onehot(id) - softmax(z); chain rule through the 1/temperature.
            lp = z.sub_(lse[s:e, None])  # [c, V] log p
            dz = torch.exp(lp).neg_()  # [c, V] -p
            if g_ent is not None:  # entropy: dH/dz = -p (log p + H), taken before dz is overwritten below
                dz_ent = dz * (lp + ent[s:e, None]) * g_ent[s:e, None]  # [c, V]
            dz.scatter_add_(1, flat_ids[s:e, None], torch.ones_like(dz[:, :1]))
            dz.mul_((g[s:e] / ctx.temperature)[:, None])
            if g_ent is not None:
                dz.add_(dz_ent.div_(ctx.temperature))
            if need_h:
                grad_h[s:e] = dz.to(dtype) @ w
            if need_w:
                grad_w += dz.t().to(dtype) @ h[s:e]
            if need_b:
                grad_b += dz.sum(0)
        grad_h = None if grad_h is None else grad_h.reshape(hidden.shape).to(hidden.dtype)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def check_token_ids(ids: Tensor, vocab: int, fn: str) -> None:
    """ValueError naming `fn` unless every id is in [0, vocab) (one device sync where ids live on a GPU)."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"{fn}: ids outside [0, {vocab}); use real token ids at padding")


def chunked_token_logprobs(
    hidden: Tensor,
    lm_head_weight: Tensor,
    ids: Tensor,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    lm_head_bias: Tensor | None = None,
    with_entropy: bool | str = False,
    check_ids: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """log softmax(hidden @ W.T + b) / temperature)[ids] -> [B, T] fp32, never holding more than
    chunk_size x V logits (forward or backward). hidden [B, T, H] is the state that predicts ids [B, T]
    (i.e. already shifted by the caller); W [V, H]. Gradients flow to hidden, and to W/b if they need them.
    with_entropy: also return the entropy [B, T] of every position's tempered distribution, computed chunk by
    chunk in the same pass (never [B, T, V]); True: without gradient, "grad": with it (the entropy bonus). On CUDA the passes over each chunk's logits
    are fused Triton kernels (`lmhead.py`; same function)."""
    if hidden.shape[:-1] != ids.shape or hidden.shape[-1] != lm_head_weight.shape[-1]:
        raise ValueError(
            f"chunked_token_logprobs: hidden {tuple(hidden.shape)}, weight {tuple(lm_head_weight.shape)}, "
            f"ids {tuple(ids.shape)} do not fit [B, T, H], [V, H], [B, T]"
        )
    if chunk_size < 1 or temperature <= 0:
        raise ValueError(
            f"chunked_token_logprobs: need chunk_size >= 1 and temperature > 0, got {chunk_size}, {temperature}"
        )
    if check_ids:  # callers that checked the host copy pass False: on a GPU this check is a device sync
        check_token_ids(ids, lm_head_weight.shape[0], "chunked_token_logprobs")
    # the fused kernels take no gradient through the entropy: the entropy bonus runs the plain chunked pass
    fused = lmhead.enabled(hidden, lm_head_weight) and with_entropy != "grad"
    fn = lmhead.fused_token_logprobs if fused else _ChunkedTokenLogprobs.apply
    logp, entropy = fn(hidden, lm_head_weight, lm_head_bias, ids, chunk_size, temperature, with_entropy)
    return (logp, entropy) if with_entropy else logp
