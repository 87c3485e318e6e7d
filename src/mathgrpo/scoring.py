"""Scoring completions with a weighted set of rewards: names resolved (built-ins from rewards.REWARDS, user rewards
as "package.module:function" or "path/file.py:function", or callables), every reward called once per batch with
TRL's signature, None kept as NaN, errors naming the reward and the example; and the keyword columns every reward
receives, built once for training, evaluation and the TRL door (`reward_inputs`).

    rs = RewardSet([("accuracy", 1.0), ("format", 0.2), ("my_pkg.rewards:brevity", 0.1)])
    per_reward, total = rs.score(completions, **reward_inputs(problems, G, prompts=..., ...))  # [N, R], [N]

Tests: `pytest tests/test_rewards.py`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import math
import numbers
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .registry import lookup
from .rewards import REWARDS, RewardError, RewardFn

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------- user rewards


def load_user_reward(spec: str) -> RewardFn:
    """Import `package.module:function` or `path/to/file.py:function` (dotted attributes ok)."""
    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise RewardError(
            f"reward spec {spec!r} must look like 'package.module:function' or 'path/to/file.py:function'"
        )
    if module_part.endswith(".py") or "/" in module_part:
        path = Path(module_part).expanduser()
        if not path.is_file():
            raise RewardError(f"reward spec {spec!r}: file {str(path)!r} not found")
        mod_name = "mathgrpo_user_reward_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        file_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(file_spec)
        sys.modules[mod_name] = module  # so pickling / dataclasses inside the file work
        try:
            file_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[mod_name]
            why = f"{type(exc).__name__}: {exc}"
            raise RewardError(f"reward spec {spec!r}: executing {str(path)!r} failed: {why}") from exc
    else:
        try:
            module = importlib.import_module(module_part)
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
            raise RewardError(f"reward spec {spec!r}: cannot import module {module_part!r}: {why}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"reward spec {spec!r}: {module_part!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"reward spec {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    return obj


def _resolve(item: str | RewardFn) -> tuple[str, RewardFn]:
    if callable(item):
        return getattr(item, "__name__", repr(item)), item
    if not isinstance(item, str):
        raise RewardError(f"reward must be a name, a 'module:function' spec or a callable, got {item!r}")
    if ":" in item and item not in REWARDS:
        # Logged under the function's own name, as TRL does (`rewards/<name>/mean`).
        return item.rsplit(":", 1)[1].rsplit(".", 1)[-1], load_user_reward(item)
    return item, lookup(REWARDS, item, "rewards.functions", error=RewardError, hint="; or give 'package.module:function'")


# ------------------------------------------------------------------------------- batch scoring

FLOAT32_MAX = float(np.finfo(np.float32).max)


def _real(v) -> float | None:
    """A reward value as a float: Python and numpy numbers, bools, 0-d tensors and arrays; None for anything else."""
    if isinstance(v, (str, bytes)):
        return None
    if getattr(v, "ndim", 0) == 0 and hasattr(v, "item") and not isinstance(v, numbers.Number):
        v = v.item()  # torch / numpy 0-d
    if isinstance(v, numbers.Real):
        return float(v)
    return None



def _row_kwargs(kwargs: dict, i: int, n: int) -> dict:
    """kwargs cut down to example `i` (per-completion sequences sliced, scalars kept)."""
    out = {}
    for key, value in kwargs.items():
        if not isinstance(value, (str, bytes)) and hasattr(value, "__len__") and hasattr(value, "__getitem__"):
            try:
                if len(value) == n:
                    out[key] = value[i : i + 1]
                    continue
            except TypeError:
                pass
        out[key] = value
    return out


class RewardTimeout(BaseException):
    """Raised inside a reward call that ran past its time limit (a BaseException: a reward's `except Exception`
    must not swallow it)."""


_PENDING: list = [None]  # the deadline (a threading.Event, set when it passes) of the reward call in progress


def _expired(signum, frame):
    if _PENDING[0] is not None and _PENDING[0].is_set():
        raise RewardTimeout


def _handler_installed() -> bool:
    """SIGUSR2 -> _expired, installed once and left in place (a late signal finds no deadline and does nothing);
    False when the host application has its own SIGUSR2 handler, which is not taken over."""
    current = signal.getsignal(signal.SIGUSR2)
    if current in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(signal.SIGUSR2, _expired)
        return True
    return current is _expired


def call_within(seconds: float | None, fn, *args, **kwargs):
    """fn(*args, **kwargs), interrupted by RewardTimeout after `seconds`. A timer thread signals the main thread
    (SIGUSR2, so the SIGALRM alarms of math-verify and timed_verify inside rewards keep working); a blocking sleep
    or wait is interrupted too. Off the main thread (signals cannot reach it), without a limit, or when the host
    application handles SIGUSR2 itself: a plain call."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not _handler_installed():
        return fn(*args, **kwargs)
    passed = threading.Event()

    def expire():
        passed.set()
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR2)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    _PENDING[0] = passed
    timer.start()
    try:
        return fn(*args, **kwargs)
    finally:
        _PENDING[0] = None
        timer.cancel()


class RewardSet:
    """Weighted rewards scored together: `total = nansum(weight * reward)` per completion (TRL's rule). Each call
    of a reward may take `time_limit` seconds at most (rewards.time_limit); past it, a RewardError names it."""

    def __init__(self, rewards: Sequence[tuple[str | RewardFn, float]], time_limit: float | None = None):
        self.time_limit = time_limit
        if not rewards:
            raise RewardError("RewardSet needs at least one (reward, weight) pair")
        self._names: list[str] = []
        self._funcs: list[RewardFn] = []
        weights = []
        for entry in rewards:
            try:
                item, weight = entry
            except (TypeError, ValueError):
                raise RewardError(f"reward entry {entry!r} must be a (name_or_spec, weight) pair") from None
            name, fn = _resolve(item)
            if name in self._names:
                raise RewardError(f"reward {name!r} is listed twice")
            try:
                w = float(weight)
            except (TypeError, ValueError):
                raise RewardError(f"reward {name!r}: weight {weight!r} is not a number") from None
            if not math.isfinite(w):
                raise RewardError(f"reward {name!r}: weight {weight!r} is not finite")
            self._names.append(name)
            self._funcs.append(fn)
            weights.append(w)
        self.weights = np.asarray(weights, dtype=np.float32)  # [R]
        self._warned: set[str] = set()

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def score(self, completions: list[str], **kwargs) -> tuple[np.ndarray, np.ndarray]:
        """Per-reward values `[N, R]` (None -> NaN) and weighted totals `[N]`, both float32."""
        n = len(completions)
        per_reward = np.empty((n, len(self._funcs)), dtype=np.float32)  # [N, R]
        for j, (name, fn) in enumerate(zip(self._names, self._funcs)):
            per_reward[:, j] = self._run(name, fn, completions, kwargs)
            if n and np.isnan(per_reward[:, j]).all() and name not in self._warned:
                self._warned.add(name)  # once per reward: a batch of "not applicable" can be legitimate
                log.warning("reward %r returned None for every completion of a batch (%d): it adds nothing to the "
                            "total; check its inputs (dataset columns passed as keyword arguments)", name, n)
        with np.errstate(over="ignore"):
            weighted = per_reward * self.weights[None, :]  # [N, R]
            total = np.nansum(weighted, axis=1).astype(np.float32)  # [N]
        if not np.isfinite(total).all():  # each value is in range, their weighted sum is not
            i = int(np.flatnonzero(~np.isfinite(total))[0])
            terms = ", ".join(f"{name!r} {per_reward[i, j]:g} x weight {self.weights[j]:g}"
                              for j, name in enumerate(self._names) if np.isfinite(per_reward[i, j]))
            raise RewardError(f"the weighted reward of example {i} overflows float32: {terms}")
        return per_reward, total

    def _run(self, name: str, fn: RewardFn, completions: list[str], kwargs: dict) -> list[float]:
        n = len(completions)
        try:
            out = call_within(self.time_limit, fn, completions, **kwargs)
        except RewardTimeout:
            raise RewardError(f"reward {name!r} did not return within rewards.time_limit={self.time_limit:g} s (a "
                              f"batch of {n} completions): it may never return; fix it, or raise "
                              f"rewards.time_limit") from None
        except Exception as exc:
            where = self._failing_index(fn, completions, kwargs)
            place = f"on example {where}" if where is not None else "on the batch (no single example reproduces it)"
            raise RewardError(f"reward {name!r} raised {type(exc).__name__} {place}: {exc}") from exc
        try:
            got = len(out)
        except TypeError:
            raise RewardError(f"reward {name!r} returned {type(out).__name__}, expected a list of {n} values") from None
        if got != n:
            raise RewardError(f"reward {name!r} returned {got} values, expected {n} (one per completion)")
        values = []
        for i, v in enumerate(out):
            if v is None:
                values.append(math.nan)
                continue
            f = _real(v)
            if f is None:  # "1.0" would pass float(): a reward returning text has a bug, not a score
                raise RewardError(f"reward {name!r} returned {v!r} ({type(v).__name__}) at example {i}: rewards "
                                  f"are real numbers, or None for 'not applicable'")
            if not math.isfinite(f):
                raise RewardError(f"reward {name!r} returned {f} at example {i}; use None for 'not applicable'")
            if abs(f) > FLOAT32_MAX:  # scores are float32: this would become an infinite reward
                raise RewardError(f"reward {name!r} returned {f:g} at example {i}: beyond float32's range "
                                  f"(±{FLOAT32_MAX:.2g}) in which rewards are kept")
            values.append(f)
        return values

    def _failing_index(self, fn: RewardFn, completions: list[str], kwargs: dict) -> int | None:
        n = len(completions)
        for i in range(n):
            try:
                call_within(self.time_limit, fn, completions[i : i + 1], **_row_kwargs(kwargs, i, n))
            except RewardTimeout:
                return None
            except Exception:
                return i
        return None


# --- what reward functions receive ----------------------------------------------------------------------------

def reward_columns(problems: Sequence, n: int) -> dict[str, list]:
    """Each problem's columns repeated n times (prompt-major): problem, gold, solution and every extra dataset column
    (the union over the problems, in first-seen order; None where a problem lacks one; never shadowing the three)."""
    names = dict.fromkeys(["problem", "gold", "solution", *(k for p in problems for k in (p.extra or {}))])
    cols: dict[str, list] = {k: [] for k in names}
    for p in problems:
        for key in cols:
            value = getattr(p, key) if key in ("problem", "gold", "solution") else (p.extra or {}).get(key)
            cols[key].extend([value] * n)
    return cols


def reward_inputs(problems: Sequence, n: int, *, prompts: list[str], completion_ids: list[list[int]],
                  truncated: list[bool], prefill: str | None, max_completion_len: int, **settings) -> dict[str, Any]:
    """The keyword arguments of `RewardSet.score` for n completions per problem (rows prompt-major): one entry per
    completion of `prompts` (one text per problem, as rendered for the model), `completion_ids` (each row's real
    tokens), `prefill` (the text the template put before every completion, "" for none), `truncated`, then
    `max_completion_len` (the generation cap) and `settings` (e.g. overlong_buffer) as scalars, then
    `reward_columns`. Training (sampling.py), evaluation (evaluate.py) and the TRL front door build them here.
    (The TRL door passes its dataset rows through an extra Problem column and adds TRL's own keys on top.)"""
    rep = [t for t in prompts for _ in range(n)]
    if not len(rep) == len(completion_ids) == len(truncated):
        raise ValueError(f"reward_inputs: {len(problems)} problems x {n} = {len(rep)} rows, but "
                         f"{len(completion_ids)} completion_ids and {len(truncated)} truncated flags")
    columns = reward_columns(problems, n)
    named = {"prompts": rep, "completion_ids": completion_ids, "prefill": [prefill or ""] * len(rep),
             "truncated": [bool(t) for t in truncated], "max_completion_len": max_completion_len, **settings}
    return {**named, **{k: v for k, v in columns.items() if k not in named}}
