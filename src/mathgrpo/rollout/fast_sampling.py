"""Token sampling on the device for the `fast` engine: greedy, temperature, top-k, top-p.

Order as in transformers: temperature, then top-k, then top-p. A categorical draw is
argmax(p / E) with E ~ Exp(1) (exact, one pass, no host sync), from a private generator so a seed
reproduces a run without touching the global RNG. The returned log-prob is that of the sampled
token under softmax(logits / temperature) before top-k/top-p truncation (raw logits when greedy),
the distribution a GRPO loss with the same temperature evaluates.
"""

from __future__ import annotations

import torch

from .base import SamplingConfig


def check_sampling(s: SamplingConfig) -> None:
    if s.max_new_tokens < 1:
        raise ValueError(f"SamplingConfig.max_new_tokens must be >= 1, got {s.max_new_tokens}")
    if s.temperature < 0:
        raise ValueError(f"SamplingConfig.temperature must be >= 0 (0 = greedy), got {s.temperature}")
    if not 0 < s.top_p <= 1:
        raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {s.top_p}")
    if s.top_k < 0:
        raise ValueError(f"SamplingConfig.top_k must be >= 0 (0 = off), got {s.top_k}")


def nucleus(sorted_logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (-inf) the tail of descending-sorted logits [B, K] outside the top-p nucleus; the first stays."""
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # probability of strictly higher-ranked tokens
    drop = mass_before >= top_p
    drop[:, 0] = False
    return sorted_logits.masked_fill(drop, float("-inf"))


def sample(logits: torch.Tensor, s: SamplingConfig, generator: torch.Generator | None):
    """logits [B, V] -> (tokens [B] int64, logprobs [B] float32)."""
    x = logits.float()
    if s.temperature == 0:
        tok = x.argmax(-1)
        return tok, x.gather(-1, tok[:, None])[:, 0] - torch.logsumexp(x, -1)
    if s.temperature != 1:
        x = x / s.temperature
    lse = torch.logsumexp(x, -1)
    idx = None
    cand = x
    if 0 < s.top_k < x.shape[-1]:
        cand, idx = x.topk(s.top_k, -1)  # sorted descending
    elif s.top_p < 1:
        cand, idx = x.sort(-1, descending=True)
    if s.top_p < 1:
        cand = nucleus(cand, s.top_p)
    probs = cand.softmax(-1)
    noise = torch.empty_like(probs).exponential_(generator=generator).clamp_(min=1e-20)
    choice = (probs / noise).argmax(-1)
    tok = choice if idx is None else idx.gather(-1, choice[:, None])[:, 0]
    return tok, x.gather(-1, tok[:, None])[:, 0] - lse
