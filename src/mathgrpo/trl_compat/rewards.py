"""Reward functions as TRL calls them: checked when the trainer is built, and wrapped so that mathgrpo's RewardSet
hands them exactly TRL's keyword arguments."""

from __future__ import annotations

import asyncio
import inspect

from .dataset import ROW, DatasetPrompts


def check_rewards(reward_funcs) -> list:
    """`reward_funcs` (one or a list) as a list of callables; reward models are refused."""
    import torch

    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if not funcs or funcs == [None]:
        raise ValueError("reward_funcs is required: give one or more functions f(prompts, completions, **kwargs)")
    for f in funcs:
        if isinstance(f, (str, torch.nn.Module)):
            raise NotImplementedError(f"reward_funcs: {f!r:.80} is a reward model; mathgrpo runs reward functions "
                                      f"only: pass f(prompts, completions, **kwargs) -> list[float | None]")
        if not callable(f):
            raise TypeError(f"reward_funcs: {f!r:.80} is not callable")
    return funcs


def trl_reward(fn, prompts: DatasetPrompts, extra_kwargs):
    """`fn` called as TRL calls it: prompts and completions as the dataset gives them (chat messages stay chat
    messages), completion_ids, every other dataset column by its name, trainer_state, log_extra, log_metric
    (`extra_kwargs()` gives the last three)."""

    def reward(completions: list[str], **kw):
        rows = [prompts.rows[i] for i in kw[ROW]]
        if prompts.conversational:
            completions = [[{"role": "assistant", "content": c}] for c in completions]
        out = fn(prompts=[r["prompt"] for r in rows], completions=completions, completion_ids=kw["completion_ids"],
                 **{k: [r.get(k) for r in rows] for k in prompts.columns}, **extra_kwargs())
        return asyncio.run(out) if inspect.isawaitable(out) else out  # async reward functions, as TRL allows

    reward.__name__ = getattr(fn, "__name__", type(fn).__name__)  # the name its metrics are logged under
    return reward


def reward_specs(funcs: list | None, weights: list | None) -> list[str]:
    """rewards.functions of the translated config: 'module:name' per function (placeholders without them)."""
    from ..config import Config

    if funcs is None:
        return [f"reward_funcs[{i}]" for i in range(len(weights))] if weights else Config().rewards.functions
    return [f"{getattr(f, '__module__', '?')}:{getattr(f, '__qualname__', type(f).__name__)}" for f in funcs]
