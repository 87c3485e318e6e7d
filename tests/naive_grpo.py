"""An independent GRPO reference for the wiring tests: full logits from `model(input_ids)`, a plain log-softmax, the
TRL 1.16 formulas written out with tensors. It shares no code with mathgrpo's loss, log-prob or update paths."""

from __future__ import annotations

import torch


def naive_logps(model, prompt_ids: list[list[int]], completion_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(token) [N, T] of each completion token, one row at a time through the model's own forward."""
    rows = []
    for p, c in zip(prompt_ids, completion_ids):
        ids = torch.tensor([list(p) + c.tolist()])
        logits = model(input_ids=ids).logits[0, len(p) - 1:len(p) - 1 + len(c)].float() / temperature  # [T, V]
        rows.append(torch.log_softmax(logits, dim=-1).gather(1, c[:, None]).squeeze(1))
    return torch.stack(rows)


def naive_loss(logp, old, ref, adv, mask, *, beta: float, eps_low: float = 0.2, eps_high: float = 0.2,
               loss_type: str = "grpo", bias_correction: bool = True, max_len: int | None = None) -> torch.Tensor:
    """The clipped GRPO objective over one whole batch (token-level ratios): logp, old, ref, mask [N, T], adv [N]."""
    m = mask.float()
    old = logp.detach() if old is None else old
    ratio = torch.exp((logp - old) * m)  # [N, T]
    a = adv[:, None].float()
    per_tok = -torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    if beta:
        d = (ref - logp) * m
        per_tok = per_tok + beta * (torch.exp(d) - d - 1) * (ratio if bias_correction else 1.0)
    per_tok = per_tok * m
    if loss_type == "grpo":
        return (per_tok.sum(1) / m.sum(1).clamp(min=1)).mean()
    if loss_type == "dapo":
        return per_tok.sum() / m.sum()
    if loss_type == "dr_grpo":
        return per_tok.sum() / (m.shape[0] * max_len)
    raise ValueError(loss_type)


def clipped_fraction(logp, old, adv, mask, eps_low=0.2, eps_high=0.2) -> float:
    ratio = torch.exp(logp - old)
    a = adv[:, None]
    hit = ((ratio < 1 - eps_low) & (a < 0)) | ((ratio > 1 + eps_high) & (a > 0))
    return float((hit & mask.bool()).sum() / mask.sum())
