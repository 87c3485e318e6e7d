"""Group-relative advantages: per-completion advantages [N] from total rewards [N] (rows prompt-major, G per
prompt), TRL 1.16's reward scalings (`ADVANTAGE_SCALINGS`: group / batch / none), unscorable rows (every reward
None) kept out of their group's statistics, and the share of groups with no signal.

Pure functions on tensors; the trainer's advantage stage calls them once per step over the global batch.
Check with `pytest tests/test_loss.py -q -k "advantage or zero_std"` (plain-Python reference implementations).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .registry import lookup


def _nanstd(x: Tensor, dim: int | None = None) -> Tensor:
    # Unbiased (Bessel) std ignoring NaN, as TRL's `nanstd`; NaN where fewer than 2 values remain.
    keep = ~torch.isnan(x)
    n = keep.sum() if dim is None else keep.sum(dim=dim, keepdim=True)
    mean = x.nanmean() if dim is None else x.nanmean(dim=dim, keepdim=True)
    sq = torch.where(keep, (x - mean) ** 2, torch.zeros_like(x))
    ss = sq.sum() if dim is None else sq.sum(dim=dim, keepdim=True)
    return torch.where(n > 1, (ss / (n - 1).clamp(min=1)).sqrt(), torch.full_like(ss, float("nan")))


def _group_std(grouped: Tensor) -> Tensor:  # [P, G] -> [P, 1]
    # Unbiased (Bessel) std per group, as TRL's `nanstd(rewards.view(-1, G), dim=1)`.
    return _nanstd(grouped, dim=1)


def _batch_std(grouped: Tensor) -> Tensor:  # [P, G] -> [1, 1]
    # One unbiased std over every reward in the batch; the mean stays per group (TRL "batch"). With several
    # ranks the batch is the global one: the trainer gathers every rank's rewards first.
    return _nanstd(grouped).reshape(1, 1)


# name -> fn(grouped rewards [P, G]) -> divisor broadcastable to [P, G]; None means "don't scale".
ADVANTAGE_SCALINGS: dict[str, Callable[[Tensor], Tensor] | None] = {
    "group": _group_std,
    "batch": _batch_std,
    "none": None,
}


def _grouped(rewards: Tensor, group_size: int, fn: str) -> Tensor:  # [N] -> [P, G]
    if rewards.dim() != 1:
        raise ValueError(f"{fn}: rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{fn}: {rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.reshape(-1, group_size)


def group_advantages(
    rewards: Tensor, group_size: int, scale_rewards: str = "group", eps: float = 1e-4
) -> Tensor:
    """Group-relative advantages [N] from total rewards [N], rows prompt-major (G per prompt).

    A = (r - mean_group) / (std + eps), std unbiased (Bessel, as TRL). A NaN reward marks a completion no
    reward function could score (all returned None): as in TRL 1.16 it joins neither its group's mean nor
    the std, and its advantage is 0 (so is every advantage of a group left with < 2 scored members when
    scaling). With several ranks, pass the global batch: "batch" scaling needs every rank's rewards.
    """
    scale = lookup(ADVANTAGE_SCALINGS, scale_rewards, "group_advantages: scale_rewards")
    if group_size < 2:
        raise ValueError(f"group_advantages: group_size must be >= 2 (got {group_size}): no baseline")
    grouped = _grouped(rewards, group_size, "group_advantages").float()  # [P, G]
    if torch.isinf(grouped).any():
        bad = torch.isinf(rewards).nonzero().flatten().tolist()
        raise ValueError(f"group_advantages: infinite rewards at rows {bad[:10]}")
    adv = grouped - grouped.nanmean(dim=1, keepdim=True)  # [P, G]; NaN for unscorable rows
    if scale is not None:
        adv = adv / (scale(grouped) + eps)
    return torch.nan_to_num(adv, nan=0.0).reshape(-1)  # [N]


def normalized_sum_advantages(per_reward: Tensor, weights: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """GDPO's advantages [N] (TRL 1.16's multi_objective_aggregation="normalize_then_sum"), rows prompt-major: each
    reward function's rewards [N, R] normalised within its group, (r - mean) / (std + eps), the weighted sum of those
    (a None reward, NaN, adds nothing), then that sum normalised over the whole batch. Rows no function could score get
    0. Each function then weighs by its weight whatever its scale or spread, which a plain weighted sum does not give.
    With several ranks, pass the global batch."""
    if per_reward.dim() != 2 or per_reward.shape[1] != weights.numel():
        raise ValueError(f"normalized_sum_advantages: rewards must be [N, {weights.numel()}] (one column per weight), "
                         f"got shape {tuple(per_reward.shape)}")
    if group_size < 2 or per_reward.shape[0] % group_size:
        raise ValueError(f"normalized_sum_advantages: {per_reward.shape[0]} rows do not split into groups of "
                         f"{group_size} (>= 2)")
    n, r = per_reward.shape
    grouped = per_reward.float().reshape(-1, group_size, r)  # [P, G, R]
    z = (grouped - grouped.nanmean(dim=1, keepdim=True)) / (_nanstd(grouped, dim=1) + eps)  # [P, G, R]
    total = (z.reshape(n, r) * weights.float()[None, :]).nansum(dim=1)  # [N]
    total[torch.isnan(per_reward).all(dim=1)] = float("nan")  # unscorable: out of the batch statistics
    adv = (total - total.nanmean()) / (_nanstd(total) + eps)  # [N]
    return torch.nan_to_num(adv, nan=0.0)


def unscorable_as_nan(per_reward: Tensor, total: Tensor) -> Tensor:
    """total [N] with NaN where every reward of the row is NaN ([N, R] per_reward): `group_advantages` input."""
    return torch.where(torch.isnan(per_reward).all(dim=1), torch.full_like(total, float("nan")), total)


def zero_std_fraction(rewards: Tensor, group_size: int) -> float:
    """Fraction of groups whose scored rewards are all equal (zero advantage, hence no signal); NaN rewards
    (unscorable rows) are left out, as TRL's `frac_reward_zero_std` (per-group std, Bessel, close to 0)."""
    grouped = _grouped(rewards, group_size, "zero_std_fraction").double()  # [P, G]
    std = _group_std(grouped).squeeze(1)  # [P]; NaN with < 2 scored rewards
    return torch.isclose(std, torch.zeros_like(std)).double().mean().item()
