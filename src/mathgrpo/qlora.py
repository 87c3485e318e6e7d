"""QLoRA's projection, y = x W^T + b + s B (A dropout(x)) over a bitsandbytes 4-bit W, as one autograd node.

Why hand-written: on the notebook's shape (NF4 + LoRA, 1 x 4 x 2,048) the update is host-bound. The GPU work is
small (~0.35 s of kernels on an H200) and Python/dispatcher time per projection sets the pace: peft's
`Linear4bit.forward` -> bitsandbytes' `Linear4bit.forward` -> `matmul_4bit` -> its `MatMul4Bit` function -> its
gemm op (past 1,536 rows: dequantise the double-quantised scales, add their offset, dequantise W, `F.linear`), then
peft's `lora_A` / `lora_B` modules with autocast's weight casts, each step its own frames and autograd nodes
(about ten nodes per projection, 196 projections, forward + checkpoint recompute + backward). Here one
`torch.autograd.Function` does the forward (bitsandbytes' `dequantize_4bit` op, one kernel, with the fp32 scales
dequantised once per weight and kept; `F.linear`; the LoRA delta accumulated in place with `addmm_`) and the
backward by hand (dequantise again, grad_x = g W + s (g B) A, grad_A = s (g B)^T x, grad_B = s g^T h). It saves
the LoRA input and h = A x (as bitsandbytes + peft do: no dequantised W is kept), and casts the fp32 adapters once
per call, as autocast would. H200, qlora-2k update with checkpointing: 0.393 s against 0.694 s for the addmm path
(docs/benchmarks.md).

`nf4_lora_forward(layer, x)` runs it for one peft 4-bit LoRA layer (adapters off and no grad: the base alone) and
returns None where it does not apply (adapters off with grad, merged or several adapters, DoRA/variants, LoRA
bias, a trainable base bias or weight, mixed dtypes outside autocast, bitsandbytes' packed CPU inference format,
no-grad calls small enough for bitsandbytes' fused CUDA kernel); `models.fuse_lora_add` installs it behind
`model.lora_fused_add` and falls back to its addmm path (then peft's) for those. Imports nothing of mathgrpo.
"""

from __future__ import annotations

import torch


# bitsandbytes runs its own fused 4-bit kernel for up to this many rows on CUDA (decode-sized batches) and
# dequantise + matmul past it; a no-grad call that small keeps bitsandbytes' path.
BNB_FUSED_MAX_ROWS = 1536


def absmax_fp32(state) -> torch.Tensor:
    """The fp32 per-block scales of a 4-bit weight. Double-quantised (nested) scales are dequantised once and kept
    on the quant state (4 bytes per 64 weights: ~80 MB on a 1.5B model), where bitsandbytes redoes it at every
    dequantisation (two more kernel launches each, 4 per weight per update)."""
    if not state.nested:
        return state.absmax
    kept = getattr(state, "_mathgrpo_absmax", None)
    if kept is not None and kept[0] is state.absmax:  # a re-quantised or moved state has a new absmax tensor
        return kept[1]
    from bitsandbytes.functional import dequantize_blockwise

    absmax = (dequantize_blockwise(state.absmax, state.state2) + state.offset).float()  # as dequantize_4bit does
    state._mathgrpo_absmax = (state.absmax, absmax)
    return absmax


def dequantize(weight: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """W [out, in] in dtype from its packed 4-bit data: bitsandbytes' dequantisation kernel, one launch."""
    return torch.ops.bitsandbytes.dequantize_4bit.default(weight, absmax_fp32(state), state.blocksize,
                                                          state.quant_type, state.shape, dtype)


class NF4LoRA(torch.autograd.Function):
    """out = x W^T + bias + scale * (xa A^T) B^T for x / xa [..., in] in the compute dtype; W [out, in] packed
    4-bit (`weight`, `quant_state`), frozen; A [r, in], B [out, r] the adapters (any float dtype: cast here, the
    gradients returned in theirs). xa: the LoRA input (dropout of x), or None for x itself."""

    @staticmethod
    def forward(ctx, x, xa, lora_a, lora_b, weight, quant_state, bias, scale):
        ctx.shape = x.shape
        x = x.reshape(-1, x.shape[-1])  # [N, in]: reshaped here, not outside, to keep the graph to one node
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)  # [r, in], [out, r]
        lin = x if xa is None else xa.reshape(x.shape)
        out = torch.nn.functional.linear(x, dequantize(weight, quant_state, x.dtype), bias)  # [N, out]
        h = torch.mm(lin, a.t())  # [N, r]
        out.addmm_(h, b.t(), alpha=scale)
        ctx.save_for_backward(lin, h, a, b)
        ctx.weight, ctx.quant_state, ctx.scale, ctx.two_inputs = weight, quant_state, scale, xa is not None
        ctx.ab_dtypes = (lora_a.dtype, lora_b.dtype)
        return out.view(*ctx.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, g):  # g: [..., out]
        lin, h, a, b = ctx.saved_tensors
        need_x, need_xa, need_a, need_b = ctx.needs_input_grad[:4]
        s, g = ctx.scale, g.reshape(-1, g.shape[-1])  # [N, out]
        grad_x = grad_xa = grad_a = grad_b = None
        gb = torch.mm(g, b) if (need_x or need_xa or need_a) else None  # [N, r]
        if need_x:  # the base's dequantisation again, as bitsandbytes' own backward does
            grad_x = torch.mm(g, dequantize(ctx.weight, ctx.quant_state, g.dtype))  # [N, in]
            if not ctx.two_inputs:
                grad_x.addmm_(gb, a, alpha=s)
        if need_xa:
            grad_xa = torch.mm(gb, a).mul_(s).view(ctx.shape)
        if need_a:  # scaled and cast in one pass
            grad_a = torch.mul(torch.mm(gb.t(), lin), s, out=torch.empty(a.shape, dtype=ctx.ab_dtypes[0], device=a.device))
        if need_b:
            grad_b = torch.mul(torch.mm(g.t(), h), s, out=torch.empty(b.shape, dtype=ctx.ab_dtypes[1], device=b.device))
        return (None if grad_x is None else grad_x.view(ctx.shape)), grad_xa, grad_a, grad_b, None, None, None, None


def nf4_lora_forward(layer, x: torch.Tensor) -> torch.Tensor | None:
    """peft's LoRA layer over a bitsandbytes 4-bit base through `NF4LoRA` (adapters off, without grad: the base
    alone, dequantise + matmul); None where that does not apply (see the module docstring): the caller then
    runs its own path. x: [..., in]; returns [..., out]."""
    base = layer.base_layer
    weight, bias = base.weight, base.bias
    state = getattr(weight, "quant_state", None)
    if (layer.merged or state is None or getattr(state, "packing_format_for_cpu", False) or weight.requires_grad
            or (bias is not None and bias.requires_grad)):
        return None
    grad, device = torch.is_grad_enabled(), x.device.type
    if not grad and device == "cuda" and x.numel() <= BNB_FUSED_MAX_ROWS * x.shape[-1]:
        return None
    off = layer.disable_adapters
    if off:
        if grad:
            return None
        lora_a = lora_b = name = None
    else:
        names = [n for n in layer.active_adapters if n in layer.lora_A]
        if len(names) != 1 or names[0] in getattr(layer, "lora_variant", {}) or layer.lora_B[names[0]].bias is not None:
            return None
        name = names[0]
        lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)  # what bitsandbytes' and peft's matmuls run in under autocast
    elif base.compute_dtype in (None, x.dtype) and (off or x.dtype == lora_a.dtype == lora_b.dtype):
        dtype = x.dtype
    else:
        return None  # mixed dtypes outside autocast: peft's conversions decide
    x = x.to(dtype)  # a no-op on a bf16 model under bf16 autocast
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    if off:
        return torch.nn.functional.linear(x, dequantize(weight.data, state, dtype), bias)
    dropout = layer.lora_dropout[name]
    xa = None if isinstance(dropout, torch.nn.Identity) or not dropout.training else dropout(x)
    return NF4LoRA.apply(x, xa, lora_a, lora_b, weight.data, state, bias, layer.scaling[name])  # [..., out]
