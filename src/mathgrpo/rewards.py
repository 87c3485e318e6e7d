"""Reward functions: the built-ins and their name registry (scoring.py loads user rewards and scores a batch).

Every reward has TRL's signature, `f(completions: list[str], **kwargs) -> list[float | None]`,
where kwargs hold `prompts`, `completion_ids` and every dataset column as per-completion lists
(mathgrpo passes `gold`, `solution`, `problem`, `prefill` and `truncated`). Built-ins ignore
keys they do not use. `None` means "not applicable to this example".

    REWARDS["accuracy"](completions, gold=golds)   # a built-in by name; @register_reward("name") adds one

Benchmark: `python benchmarks/rewards.py`; tests: `pytest tests/test_rewards.py`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

from rapidfuzz.distance import Levenshtein

from mathgrpo.answers import extract_boxed, is_equivalent

__all__ = [
    "REWARDS",
    "RewardError",
    "get_soft_overlong_punishment",
    "make_cosine_reward",
    "make_overlong_reward",
    "register_reward",
]

RewardFn = Callable[..., Sequence[Any]]
REWARDS: dict[str, RewardFn] = {}

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
DEFAULT_MAX_COMPLETION_TOKENS = 2048
CHARS_PER_TOKEN = 4  # length estimate when `completion_ids` are not given


class RewardError(ValueError):
    """A reward could not be loaded, or misbehaved while scoring (names the reward and example)."""


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding a reward function to `REWARDS` under `name` (duplicates are refused)."""

    def decorator(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered ({REWARDS[name]!r})")
        REWARDS[name] = fn
        return fn

    return decorator


# ------------------------------------------------------------------------------------ helpers


def _column(kwargs: dict, key: str, n: int, default: Any) -> list:
    """Per-completion column `key`, or `default` repeated when the caller did not pass it."""
    values = kwargs.get(key)
    if values is None:
        return [default] * n
    if isinstance(values, str) or len(values) != n:
        raise ValueError(f"column {key!r} must be a list with one entry per completion ({n})")
    return list(values)


def _lengths_in_tokens(completions: list[str], kwargs: dict) -> list[float]:
    """Token counts from `completion_ids` when given, else characters / CHARS_PER_TOKEN."""
    ids = kwargs.get("completion_ids")
    if ids is not None and len(ids) == len(completions):
        return [float(len(x)) for x in ids]
    return [len(c) / CHARS_PER_TOKEN for c in completions]


def _correctness(completions: list[str], kwargs: dict) -> list[bool]:
    golds = _column(kwargs, "gold", len(completions), None)
    return [is_equivalent(extract_boxed(c), g) for c, g in zip(completions, golds)]


def _after_think(text: str) -> str | None:
    head, sep, tail = text.rpartition(THINK_CLOSE)
    return tail if sep else None


def _group_keys(completions: list[str], kwargs: dict) -> list[Any]:
    """Completions of one prompt form a group (`prompts`, else `problem`, else one batch group)."""
    for key in ("prompts", "problem"):
        values = kwargs.get(key)
        if values is not None and len(values) == len(completions):
            return [v if isinstance(v, str) else repr(v) for v in values]
    return [0] * len(completions)


# ---------------------------------------------------------------------------------- built-ins


def _is_well_formatted(text: str) -> bool:
    body = text.lstrip()
    if not body.startswith(THINK_OPEN) or body.count(THINK_OPEN) != 1 or body.count(THINK_CLOSE) != 1:
        return False
    close = body.find(THINK_CLOSE)
    if not body[len(THINK_OPEN) : close].strip():
        return False
    return extract_boxed(body[close + len(THINK_CLOSE) :]) is not None


@register_reward("format")
def format_reward(completions: list[str], **kwargs) -> list[float]:
    """1.0 when `prefill + completion` is `<think>reasoning</think> ... \\boxed{answer}`.

    The text must start (after whitespace) with the single `<think>`, hold one `</think>`,
    non-blank reasoning between them, and a non-empty box after `</think>`.
    """
    prefills = _column(kwargs, "prefill", len(completions), "")
    return [float(_is_well_formatted(p + c)) for p, c in zip(prefills, completions)]


@register_reward("boxed")
def boxed_reward(completions: list[str], **kwargs) -> list[float]:
    """1.0 when the completion holds a final, non-empty `\\boxed{}` / `\\fbox{}` answer."""
    return [float(extract_boxed(c) is not None) for c in completions]


@register_reward("accuracy")
def accuracy_reward(completions: list[str], **kwargs) -> list[float]:
    """1.0 when the last boxed answer is equivalent to `gold` (missing gold or box -> 0.0)."""
    return [float(ok) for ok in _correctness(completions, kwargs)]


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str) -> str | None:
    """The last boxed answer; without a box, the last number of the text (commas dropped)."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


@register_reward("answer")
def answer_reward(completions: list[str], **kwargs) -> list[float]:
    """1.0 when the final answer is equivalent to `gold`: the last boxed answer, or, with no box, the last
    number of the completion (as open-r1's math-verify accuracy also finds unboxed answers). For small models
    that do not box yet: `accuracy` alone gives them no signal, and a box reward alone is easily gamed."""
    golds = _column(kwargs, "gold", len(completions), None)
    return [float(is_equivalent(final_answer(c), g)) for c, g in zip(completions, golds)]


@register_reward("similarity")
def similarity_reward(completions: list[str], **kwargs) -> list[float]:
    """Normalised Levenshtein similarity (0..1) of the text after `</think>` to `solution`.

    0.0 when there is no `</think>` in `prefill + completion`, or the solution is empty.
    """
    n = len(completions)
    prefills = _column(kwargs, "prefill", n, "")
    solutions = _column(kwargs, "solution", n, "")
    out = []
    for p, c, sol in zip(prefills, completions, solutions):
        answer = _after_think(p + c)
        sol = (sol or "").strip()
        if answer is None or not sol:
            out.append(0.0)
        else:
            out.append(Levenshtein.normalized_similarity(answer.strip(), sol))
    return out


@register_reward("length")
def length_reward(completions: list[str], **kwargs) -> list[float]:
    """Kimi 1.5 length reward, relative to the other completions of the same prompt.

    With lam = 0.5 - (len - min_len) / (max_len - min_len) over the group, a correct answer
    earns lam (shortest +0.5, longest -0.5) and a wrong one min(0, lam) (never a bonus). A
    group whose completions all have one length gets 0.0. Lengths are tokens when
    `completion_ids` are given, else characters (the scale cancels out).
    """
    n = len(completions)
    correct = _correctness(completions, kwargs)
    ids = kwargs.get("completion_ids")
    lengths = [len(x) for x in ids] if ids is not None and len(ids) == n else [len(c) for c in completions]
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(_group_keys(completions, kwargs)):
        groups.setdefault(key, []).append(i)
    out = [0.0] * n
    for members in groups.values():
        lo = min(lengths[i] for i in members)
        hi = max(lengths[i] for i in members)
        if hi == lo:
            continue
        for i in members:
            lam = 0.5 - (lengths[i] - lo) / (hi - lo)
            out[i] = lam if correct[i] else min(0.0, lam)
    return out


def make_cosine_reward(
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    max_len: int | None = None,
) -> RewardFn:
    """Cosine length schedule (open-r1's defaults): short-and-right best, short-and-wrong worst.

    progress = min(len / max_len, 1); c = cos(pi * progress) runs 1 -> -1. Correct answers go
    from `max_value_correct` (len 0) down to `min_value_correct` (len >= max_len); wrong ones
    from `min_value_wrong` up to `max_value_wrong`, so a long wrong attempt is penalised less.
    Length is in tokens (`completion_ids`, else characters / 4). `max_len` None reads
    `kwargs["max_completion_len"]` (scalar or per-row list), default 2048 tokens. Unlike
    open-r1 we clip progress at 1 so overlong completions do not climb back up the cosine.
    """

    def cosine_reward(completions: list[str], **kwargs) -> list[float]:
        n = len(completions)
        correct = _correctness(completions, kwargs)
        lengths = _lengths_in_tokens(completions, kwargs)
        limit = max_len if max_len is not None else kwargs.get("max_completion_len", DEFAULT_MAX_COMPLETION_TOKENS)
        limits = list(limit) if isinstance(limit, (list, tuple)) else [limit] * n
        out = []
        for ok, length, cap in zip(correct, lengths, limits):
            if cap is None or cap <= 0:
                raise ValueError(f"cosine reward needs a positive max_completion_len, got {cap!r}")
            cos = math.cos(math.pi * min(length / cap, 1.0))
            lo, hi = (min_value_correct, max_value_correct) if ok else (max_value_wrong, min_value_wrong)
            out.append(lo + 0.5 * (hi - lo) * (1.0 + cos))
        return out

    return cosine_reward


register_reward("cosine")(make_cosine_reward())


def soft_overlong_penalty(length: float, max_len: int, buffer: int) -> float:
    """DAPO's soft overlong punishment (eq. 13): 0 up to max_len - buffer tokens, then a linear ramp down to -1
    at max_len, -1 beyond it. buffer 0 is a hard -1 past max_len only."""
    start = max_len - buffer
    if length <= start:
        return 0.0
    if length <= max_len:
        return (start - length) / buffer
    return -1.0


def make_overlong_reward(buffer: int | None = None, max_len: int | None = None) -> RewardFn:
    """The `overlong` reward: `soft_overlong_penalty` of each completion's token count (`completion_ids`, else
    characters / 4). `max_len` None reads `kwargs["max_completion_len"]` (the trainer passes the step's
    generation.max_new_tokens, so a length curriculum moves the ramp with it; default 2048); `buffer` None reads
    `kwargs["overlong_buffer"]` (rewards.overlong_buffer), default max_len // 5, DAPO's 4096 of 20480."""

    def overlong_reward(completions: list[str], **kwargs) -> list[float]:
        cap = max_len if max_len is not None else kwargs.get("max_completion_len") or DEFAULT_MAX_COMPLETION_TOKENS
        buf = buffer if buffer is not None else kwargs.get("overlong_buffer")
        buf = cap // 5 if buf is None else buf
        if cap <= 0 or not 0 <= buf <= cap:
            raise ValueError(f"overlong reward needs 0 <= buffer <= max_completion_len, got {buf} and {cap}")
        return [soft_overlong_penalty(n, cap, buf) for n in _lengths_in_tokens(completions, kwargs)]

    return overlong_reward


register_reward("overlong")(make_overlong_reward())


def get_soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int) -> RewardFn:
    """TRL's `trl.rewards.get_soft_overlong_punishment` (same arguments, same values): a reward
    `f(completion_ids, **kwargs)` for scripts run through mathgrpo's TRL front door without TRL installed."""
    if soft_punish_cache < 0 or soft_punish_cache > max_completion_len:
        raise ValueError(f"get_soft_overlong_punishment: soft_punish_cache={soft_punish_cache} must be in "
                         f"[0, max_completion_len={max_completion_len}]")

    def soft_overlong_punishment_reward(completion_ids: list[list[int]], **kwargs) -> list[float]:
        return [soft_overlong_penalty(len(ids), max_completion_len, soft_punish_cache) for ids in completion_ids]

    return soft_overlong_punishment_reward
