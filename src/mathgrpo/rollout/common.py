"""Shared by the rollout backends: turn raw generated token ids into `Completions`."""

from __future__ import annotations

import torch

from .base import Completions, SamplingConfig


def finish_completions(rows: list[list[int]], gen: torch.Tensor, tokenizer, sampling: SamplingConfig,
                       stop_ids: set[int], seconds: float, logprobs: torch.Tensor | None = None) -> Completions:
    """Cut each row after its first stop token or stop string; mark rows that ran out of tokens as truncated.

    gen: [N, T] generated ids (anything after a row's end is ignored and replaced by pad).
    """
    n_rows, width = gen.shape
    pad = tokenizer.pad_token_id
    mask = torch.zeros((n_rows, width), dtype=torch.bool)
    truncated = torch.ones(n_rows, dtype=torch.bool)
    texts = []
    for i in range(n_rows):
        row = gen[i].tolist()
        end = width
        for j, t in enumerate(row):
            if t in stop_ids:
                end = j + 1  # the EOS is part of the completion: the policy learns to stop
                truncated[i] = False
                break
        text = tokenizer.decode(row[:end], skip_special_tokens=True)
        for s in sampling.stop_strings:
            k = text.find(s)
            if k >= 0:
                text = text[:k + len(s)]
                end = min(end, _tokens_covering(tokenizer, row[:end], len(text)))
                truncated[i] = False
        if end == width and truncated[i] and len(row) < sampling.max_new_tokens:
            truncated[i] = False  # the backend stopped early for a stop condition it handled itself
        mask[i, :end] = True
        texts.append(text)
    gen = gen.masked_fill(~mask, pad)
    if logprobs is not None:
        logprobs = logprobs.masked_fill(~mask, 0.0)
    return Completions(prompt_ids=rows, completion_ids=gen, completion_mask=mask, texts=texts,
                       truncated=truncated, logprobs=logprobs, gen_seconds=seconds)


def _tokens_covering(tokenizer, ids: list[int], n_chars: int) -> int:
    """Smallest prefix of ids whose decoded text reaches n_chars characters."""
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[:mid], skip_special_tokens=True)) >= n_chars:
            hi = mid
        else:
            lo = mid + 1
    return hi
