"""Token sampling on the device for the `fast` engine: greedy, temperature, top-k, top-p, min-p, repetition penalty.

Order as in transformers: the repetition penalty (on the raw logits), temperature, then top-k, then top-p, then min-p. A categorical draw is
argmax(logits - log E) with E ~ Exp(1) (the Gumbel-max trick: exact, no softmax, no host sync), E drawn
from a private generator so a seed reproduces a run without touching the global RNG. The final
pick (argmax, logsumexp, gather) is one small function that the engine compiles on CUDA into two
reductions over [B, V]; the eager kernels of softmax/logsumexp run one block per row and starve the
GPU at small batch. The returned log-prob is that of the sampled
token under softmax(logits / temperature) before the repetition penalty and top-k/top-p/min-p truncation (raw
logits when greedy), the distribution a GRPO loss with the same temperature evaluates.
"""

from __future__ import annotations

import math
from dataclasses import replace

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
    if not 0 <= s.min_p <= 1:
        raise ValueError(f"SamplingConfig.min_p must be in [0, 1] (0 = off), got {s.min_p}")
    if s.repetition_penalty <= 0:
        raise ValueError(f"SamplingConfig.repetition_penalty must be > 0 (1 = off), got {s.repetition_penalty}")


def nucleus(sorted_logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (-inf) the tail of descending-sorted logits [B, K] outside the top-p nucleus; the first stays."""
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # probability of strictly higher-ranked tokens
    drop = mass_before >= top_p
    drop[:, 0] = False
    return sorted_logits.masked_fill(drop, float("-inf"))


def pick(logits: torch.Tensor, temperature: float, noise: torch.Tensor | None):
    """Greedy (noise None) or Gumbel-max draw over all of logits [B, V] -> (tokens, logprobs at temperature)."""
    x = logits.float()
    if temperature not in (0, 1):
        x = x / temperature
    # the clamp lives here (not in _exponential) so the compiled pick fuses it instead of a pass over [B, V]
    tok = x.argmax(-1) if noise is None else (x - noise.clamp(min=1e-30).log()).argmax(-1)
    return tok, x.gather(-1, tok[:, None])[:, 0] - torch.logsumexp(x, -1)


def compile_static(fn, pdl: bool = False):
    """torch.compile for a fixed shape. Every engine compiles the same functions, and dynamo keeps one cache per
    function: one process with many batch sizes / dtypes (evaluation, tests) passes its default limit of 8
    entries, which fullgraph=True turns into an error. Raise the limit (each entry is a small pointwise kernel).
    pdl: inductor generates programmatic-dependent-launch kernels (Hopper+; fast_kernels' module docstring)."""
    cfg = torch._dynamo.config
    for name, at_least in (("recompile_limit", 256), ("cache_size_limit", 256), ("accumulated_recompile_limit", 4096)):
        if hasattr(cfg, name) and getattr(cfg, name) < at_least:
            setattr(cfg, name, at_least)
    import torch._inductor.config as inductor

    options = {"triton.enable_pdl": True} if pdl and hasattr(inductor.triton, "enable_pdl") else None
    return torch.compile(fn, dynamic=False, fullgraph=True, options=options)


def compiled_pick():
    return compile_static(pick)


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty: the logits [B, V] of the tokens each row has seen (prompt and completion so
    far, seen [B, V] bool) divided by `penalty` where positive, multiplied where negative (a new tensor)."""
    x = logits.float()
    return torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)


def sample(logits: torch.Tensor, s: SamplingConfig, generator: torch.Generator | None, pick=pick, draw=None,
           seen: torch.Tensor | None = None):
    """logits [B, V] -> (tokens [B] int64, logprobs [B] float32). draw: fast_draw.draw (one kernel) for the
    greedy and plain-sampling cases, or None for the torch ops (`pick`). seen [B, V]: each row's tokens so far, for
    the repetition penalty (the draw is from the penalised logits, the log-prob the policy's, as for top-p)."""
    if seen is not None and s.repetition_penalty != 1.0:
        tok, _ = sample(penalize(logits, seen, s.repetition_penalty), replace(s, repetition_penalty=1.0), generator,
                        pick, draw)
        x = logits.float() / (s.temperature or 1.0)  # [B, V]
        return tok, x.gather(-1, tok[:, None])[:, 0] - torch.logsumexp(x, -1)
    plain = not (0 < s.top_k < logits.shape[-1]) and s.top_p >= 1 and not s.min_p  # the usual GRPO setting
    if draw is not None and (plain or s.temperature == 0):
        return draw(logits, s.temperature, generator)
    if s.temperature == 0:
        return pick(logits, 0, None)
    if plain:
        return pick(logits, s.temperature, _exponential(logits.shape, logits.device, generator, clamp=False))
    x = logits.float() / s.temperature
    if 0 < s.top_k < x.shape[-1]:
        cand, idx = x.topk(s.top_k, -1)  # sorted descending
    else:
        cand, idx = x.sort(-1, descending=True)
    if s.top_p < 1:
        cand = nucleus(cand, s.top_p)
    if s.min_p > 0:  # min-p: drop tokens whose probability is below min_p x the top one's (the first stays)
        cand = cand.masked_fill(cand < cand[:, :1] + math.log(s.min_p), float("-inf"))
    choice = (cand - _exponential(cand.shape, cand.device, generator).log()).argmax(-1)
    tok = idx.gather(-1, choice[:, None])[:, 0]
    return tok, x.gather(-1, tok[:, None])[:, 0] - torch.logsumexp(x, -1)


def _exponential(shape, device, generator, clamp: bool = True) -> torch.Tensor:
    # clamp: an exact 0 would make log() -inf and win every argmax
    e = torch.empty(shape, device=device).exponential_(generator=generator)
    return e.clamp_(min=1e-30) if clamp else e
