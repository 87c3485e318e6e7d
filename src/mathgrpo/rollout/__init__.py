"""Rollout backends behind one interface (`Rollout.generate`, `Rollout.sync_weights`).

    rollout = make_rollout(cfg.generation, model, tokenizer)
    completions = rollout.generate(prompt_ids, n=G, sampling=SamplingConfig(max_new_tokens=256))
"""

from __future__ import annotations

from typing import Callable

from ..memory_plan import value
from ..registry import lookup
from .base import Completions, Rollout, SamplingConfig
from .fast_weights import UnsupportedModel
from .hf import HFRollout


def _fast(model, tokenizer, gen_cfg):
    from ..loading import say
    from .fast import FastRollout  # CUDA-graph engine; imported lazily
    from .fast_plan import plan_for

    device = next(model.parameters()).device
    plan = plan_for(device, gen_cfg.kernels, attention=gen_cfg.decode_attention)
    engine = FastRollout(model, tokenizer, max_batch=_max_batch(gen_cfg), fuse_weights=gen_cfg.fuse_weights,
                         lora_merge=gen_cfg.lora_merge, plan=plan)
    say(f"fast engine: {plan.line()}")
    return engine


def _max_batch(gen_cfg) -> int:
    return value(gen_cfg.max_batch, "generation.max_batch")


# name -> factory(model, tokenizer, generation config)
BACKENDS: dict[str, Callable] = {
    "hf": lambda model, tok, gen_cfg: HFRollout(model, tok, max_batch=_max_batch(gen_cfg),
                                                merge_lora=gen_cfg.lora_merge == "copy"),
    "hf_unmerged": lambda model, tok, gen_cfg: HFRollout(model, tok, max_batch=_max_batch(gen_cfg), merge_lora=False),
    "fast": _fast,
}


def make_rollout(gen_cfg, model, tokenizer) -> Rollout:
    """The rollout backend generation.backend names; auto = the fast engine wherever it can read the model (on CUDA
    with CUDA graphs, on CPU eagerly: 2-2.6x the hf backend's speed on the embedded default), else hf, saying why."""
    name = gen_cfg.backend
    if name != "auto":
        return lookup(BACKENDS, name, "generation.backend")(model, tokenizer, gen_cfg)
    try:
        return _fast(model, tokenizer, gen_cfg)
    except (ImportError, UnsupportedModel) as e:  # ImportError: a torch too old for the engine's imports
        from ..loading import say

        say(f"generation.backend=auto: the fast engine cannot take this model ({e}); sampling with hf")
        return BACKENDS["hf"](model, tokenizer, gen_cfg)


def sampling_from(gen_cfg, seed: int | None = None, **changes) -> SamplingConfig:
    """Sampling settings of the generation config; a length schedule gives its last value unless `changes`
    name max_new_tokens (the trainer passes the step's value)."""
    from ..config import max_new_tokens_at

    s = SamplingConfig(max_new_tokens=max_new_tokens_at(gen_cfg.max_new_tokens, None), temperature=gen_cfg.temperature,
                       top_p=gen_cfg.top_p, top_k=gen_cfg.top_k, min_p=gen_cfg.min_p,
                       repetition_penalty=gen_cfg.repetition_penalty, stop_strings=list(gen_cfg.stop_strings),
                       seed=seed)
    for k, v in changes.items():
        setattr(s, k, v)
    return s


__all__ = ["BACKENDS", "Completions", "Rollout", "SamplingConfig", "make_rollout", "sampling_from"]
