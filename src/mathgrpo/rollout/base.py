"""The rollout interface: sample G completions for each prompt.

The trainer and the evaluator only see `Rollout.generate` and `Rollout.sync_weights`; backends
("hf" for any device, "fast" for CUDA) register themselves in `BACKENDS` (see `rollout/__init__.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class SamplingConfig:
    """How to sample; mirrors the `generation` config section."""

    max_new_tokens: int = 2048
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    min_p: float = 0.0  # 0 disables min-p: tokens below min_p x the top token's probability are dropped
    repetition_penalty: float = 1.0  # 1 disables it (transformers' rule, in both backends)
    stop_strings: list[str] = field(default_factory=list)
    # Benchmarks force full-length completions by ignoring EOS.
    ignore_eos: bool = False
    seed: int | None = None


@dataclass
class Completions:
    """N = len(prompts) * n completions, ordered prompt-major: rows [i*n:(i+1)*n] belong to prompt i."""

    prompt_ids: list[list[int]]  # [N] unpadded prompt token ids (repeated per sample)
    completion_ids: torch.Tensor  # [N, T] int64, right-padded with pad_id after the end
    completion_mask: torch.Tensor  # [N, T] bool/int, 1 for real completion tokens (EOS included)
    texts: list[str]  # [N] decoded completions (special tokens skipped, cut at a stop string)
    truncated: torch.Tensor  # [N] bool, True when max_new_tokens ran out before EOS/stop
    # [N, T] float32 log-probs of the sampled tokens at the sampling temperature (the fast engine), checked against
    # the training forward in tests/test_rollout_fast.py. The update recomputes every log-prob and weights the policy
    # term by their ratio (grpo.sampler_correction, correction.sampler_weights) and logs the mismatch (sampler/*).
    logprobs: torch.Tensor | None = None
    gen_seconds: float = 0.0

    @property
    def lengths(self) -> torch.Tensor:  # [N]
        return self.completion_mask.sum(dim=1)


class Rollout(Protocol):
    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig) -> Completions: ...

    def sync_weights(self, model: torch.nn.Module) -> None: ...
