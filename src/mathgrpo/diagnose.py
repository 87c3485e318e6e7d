"""A run that learns nothing says so: the step metrics read for the usual causes, each said once, plainly, with
what to change.

    watch = Watch(cfg, rewards)               # the trainer, one per run; rewards: [(name, weight)] as logged
    for line in watch.add(step, metrics):     # after each step: findings not said before, as log lines
        print(line)
    diagnose(rows, cfg, rewards)              # the end of the run (summary.json, report): findings on the last steps

Checks, each over the last WINDOW logged steps (none before WINDOW steps exist), pure functions of the metric rows
(metrics.jsonl's, or the in-memory ones: NaN and None both mean "no value"):
- flat: every group had equal rewards in every step (frac_zero_std = 1): every advantage is 0, no gradient;
- truncated: at least TRUNCATED_SHARE of the completions hit generation.max_new_tokens and they score no more than
  the step's mean reward;
- never matches: a reward with non-zero weight scored 0 (or None) on every completion of every step;
- kl: the KL to the reference averages above KL_LIMIT per token (grpo.beta > 0 only);
- diverged: the loss or the gradient norm is NaN or infinite.
The log says a finding the first time it holds; summary.json and the report list those that hold at the end.
Check with `pytest tests/test_diagnose.py -q` (synthetic metric rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import metrics as M
from .config import Config, max_new_tokens_at

WINDOW = 5  # steps a finding is judged on
TRUNCATED_SHARE = 0.5
KL_LIMIT = 1.0  # nats per token (k3); GRPO runs that learn stay well below 0.1


@dataclass
class Finding:
    kind: str  # flat | truncated | never_matches:<reward> | kl | diverged
    message: str


def _value(row: dict, key: str) -> float | None:
    v = row.get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [v for v in (_value(r, key) for r in rows) if v is not None]
    return sum(vals) / len(vals) if vals else None


def _flat(rows: list[dict], cfg: Config, rewards) -> list[Finding]:
    if not all((_value(r, M.FRAC_ZERO_STD) or 0.0) >= 1.0 for r in rows):
        return []
    rewards = sorted({round(v, 3) for v in (_value(r, M.REWARD) for r in rows) if v is not None})
    same = (f"every completion scored {rewards[0]:g}" if len(rewards) == 1 and
            all((_value(r, M.REWARD_STD) or 0.0) == 0.0 for r in rows) else "each group's completions scored alike")
    return [Finding("flat", (
        f"no learning signal: every group of grpo.num_generations={cfg.grpo.num_generations} had equal rewards in each "
        f"of the last {len(rows)} steps ({same}), so every advantage is 0 and the updates change nothing. The problems "
        f"are all too hard or all too easy for the model, or the reward cannot tell its completions apart: look at "
        f"completions.jsonl; use problems of mixed difficulty, raise grpo.num_generations, or add a reward with partial "
        f"credit"))]


def _truncated(rows: list[dict], cfg: Config, rewards) -> list[Finding]:
    share, reward = _mean(rows, M.TRUNCATED_FRAC), _mean(rows, M.REWARD)
    scored = _mean(rows, M.TRUNCATED_REWARD)
    if share is None or share < TRUNCATED_SHARE or (scored is not None and reward is not None and scored > reward):
        return []
    step = int(rows[-1].get("step", 0))
    cap = _value(rows[-1], M.MAX_NEW_TOKENS) or max_new_tokens_at(cfg.generation.max_new_tokens, step)
    how = f" and score {scored:.2f} on average (all completions: {reward:.2f})" if scored is not None else ""
    return [Finding("truncated", (
        f"{share:.0%} of completions in the last {len(rows)} steps hit generation.max_new_tokens={int(cap)}{how}: cut "
        f"answers rarely score. Raise generation.max_new_tokens if the model needs the room; if it rambles, add the "
        f"`overlong` or `length` reward or set grpo.mask_truncated_completions=true"))]


def _never_matches(rows: list[dict], cfg: Config, rewards) -> list[Finding]:
    out = []
    for name, w in rewards:
        key = M.reward_mean(name)
        if w == 0 or not any(key in r for r in rows):
            continue
        vals = [_value(r, key) for r in rows]
        if all(v is None for v in vals):
            what = "returned None for every completion (it could score none of them)"
        elif all(v == 0.0 for v in vals):
            what = "scored 0 on every completion"
        else:
            continue
        out.append(Finding(f"never_matches:{name}", (
            f"reward '{name}' {what} in each of the last {len(rows)} steps: it never matches. Look at completions.jsonl: "
            f"the answers may not be in the form it reads (e.g. `accuracy` needs a \\boxed{{}} answer; `answer` also "
            f"reads the last number), or the gold answers may be wrong (data.answer_column, data.solution_column)")))
    return out


def _kl(rows: list[dict], cfg: Config, rewards) -> list[Finding]:
    kl = _mean(rows, M.KL)
    if cfg.grpo.beta <= 0 or kl is None or kl <= KL_LIMIT:
        return []
    return [Finding("kl", (
        f"KL to the reference averages {kl:.2f} per token over the last {len(rows)} steps (grpo.beta={cfg.grpo.beta}; "
        f"runs that learn stay below 0.1): the policy is running away from the reference. Lower "
        f"trainer.learning_rate or raise grpo.beta"))]


def _diverged(rows: list[dict], cfg: Config, rewards) -> list[Finding]:
    for r in rows:
        bad = [k for k in (M.LOSS, M.GRAD_NORM) if k in r and (r[k] is None or not math.isfinite(float(r[k])))]
        if bad:
            return [Finding("diverged", (
                f"{' and '.join(bad)} not finite (NaN or inf) at step {r.get('step', '?')}: training diverged. Lower "
                f"trainer.learning_rate, check that no reward returns NaN or inf, and prefer bf16 to fp16"))]
    return []


CHECKS = (_flat, _truncated, _never_matches, _kl, _diverged)


def diagnose(rows: list[dict], cfg: Config, rewards: list[tuple[str, float]]) -> list[Finding]:
    """Findings on the last WINDOW of `rows` (metric rows in step order; none with fewer rows). `rewards`: the
    run's (name as logged, weight) pairs (scoring.RewardSet's names and weights)."""
    if len(rows) < WINDOW:
        return []
    last = rows[-WINDOW:]
    return [f for check in CHECKS for f in check(last, cfg, rewards)]


@dataclass
class Watch:
    """The trainer's running check: `add` returns the log lines of findings not said before in this process."""

    cfg: Config
    rewards: list[tuple[str, float]]
    rows: list[dict] = field(default_factory=list)
    said: set[str] = field(default_factory=set)

    def add(self, step: int, metrics: dict) -> list[str]:
        self.rows = (self.rows + [{"step": step, **metrics}])[-WINDOW:]
        new = [f for f in diagnose(self.rows, self.cfg, self.rewards) if f.kind not in self.said]
        self.said |= {f.kind for f in new}
        return [f"step {step}: {f.message}" for f in new]
