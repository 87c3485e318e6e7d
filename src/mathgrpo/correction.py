"""The sampler-trainer mismatch: the rollout engine's own log-probs against the update's.

The engine samples with its own kernels (merged bf16 weights, another summation order); the update recomputes every
log-prob with the training forward. Their ratio pi_train / pi_sampler weights the policy term (truncated or masked
importance sampling, TRL's vLLM correction: `sampler_weights`, passed to `loss.grpo_loss` as sampling_weight), and
its spread is logged every step (`mismatch_stats`, summed by update.py). Pure functions, tested in
tests/test_update_options.py against TRL's formulas.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .registry import lookup

SAMPLER_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def sampler_weights(logp_old: Tensor, logp_sampler: Tensor, mask: Tensor, mode: str, cap: float | None = 3.0,
                    floor: float | None = None) -> Tensor | None:
    """Importance weights of the sampler-trainer mismatch: exp(old - sampler) per token [N, T] or summed per
    sequence [N, 1], truncated to [floor, cap] ("*_truncate") or set to 0 outside it ("*_mask"); None for "none".
    TRL 1.16's `vllm_importance_sampling_mode` with its `clip_max` / `clip_min`. No gradient."""
    lookup(dict.fromkeys(SAMPLER_CORRECTIONS), mode, "sampler_weights: mode")
    if mode == "none":
        return None
    diff = torch.nan_to_num((logp_old.detach().float() - logp_sampler.float()) * mask, nan=0.0)  # [N, T]
    level, how = mode.split("_")
    ratio = torch.exp(diff.sum(-1, keepdim=True) if level == "sequence" else diff)  # [N, 1] or [N, T]
    if how == "truncate":
        return ratio.clamp(min=floor, max=cap)
    out = (ratio < (-math.inf if floor is None else floor)) | (ratio > (math.inf if cap is None else cap))
    return ratio.masked_fill(out, 0.0)


def mismatch_stats(logp_old: Tensor, logp_sampler: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Token sums of the sampler-trainer mismatch under mask [N, T] (0-d tensors, on the device): |delta log p|, the
    token ratio's deviation from 1, r - 1, and its square (about 1, so that the spread does not cancel in float32),
    the ratio's min and max, and the token count."""
    keep = mask.bool()  # masked reductions, no boolean indexing: no device sync inside the update's loop
    diff = torch.where(keep, logp_old.detach().float() - logp_sampler.float(), 0.0)  # [N, T]
    dev = torch.expm1(diff)  # r - 1, 0 off the mask
    inf = torch.tensor(float("inf"), device=diff.device)
    return {"abs": diff.abs().sum(), "abs_max": torch.where(keep, diff.abs(), -inf).max(),
            "dev": dev.sum(), "dev_sq": (dev * dev).sum(), "ratio_max": 1 + torch.where(keep, dev, -inf).max(),
            "ratio_min": 1 + torch.where(keep, dev, inf).min(), "tokens": keep.sum().float()}
