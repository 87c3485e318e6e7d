"""diagnose.py on synthetic step metrics: each way a run learns nothing is found and said once, with its cause and the
setting to change; a run that learns says nothing; summary.json and the report carry the findings."""

from __future__ import annotations

import json
import math

import pytest

from mathgrpo import metrics as M
from mathgrpo.config import load_config
from mathgrpo.diagnose import WINDOW, Watch, diagnose

REWARDS = [("accuracy", 1.0), ("format", 0.5), ("boxed", 0.0)]


def _cfg(**over):
    return load_config(None, [f"{k}={v}" for k, v in {"generation.max_new_tokens": 2048, **over}.items()])


def _row(step: int, **kw) -> dict:
    """A healthy step: groups with spread, short completions, every reward matching sometimes."""
    row = {"step": step, M.REWARD: 0.5, M.REWARD_STD: 0.4, M.FRAC_ZERO_STD: 0.25, M.TRUNCATED_FRAC: 0.05,
           M.TRUNCATED_REWARD: 0.0, M.reward_mean("accuracy"): 0.3, M.reward_mean("format"): 0.6,
           M.reward_mean("boxed"): 0.0, M.LOSS: 0.01, M.GRAD_NORM: 0.3, M.KL: 0.02}
    row.update(kw)
    return row


def _rows(n: int = 8, **kw) -> list[dict]:
    return [_row(i + 1, **kw) for i in range(n)]


def _kinds(findings) -> list[str]:
    return [f.kind for f in findings]


def test_a_run_that_learns_says_nothing():
    assert diagnose(_rows(), _cfg(), REWARDS) == []


def test_nothing_is_judged_before_a_window_of_steps():
    assert diagnose(_rows(WINDOW - 1, **{M.FRAC_ZERO_STD: 1.0}), _cfg(), REWARDS) == []


def test_every_group_flat():
    rows = _rows(**{M.FRAC_ZERO_STD: 1.0, M.REWARD: 0.0, M.REWARD_STD: 0.0})
    (f,) = diagnose(rows, _cfg(), REWARDS + [("answer", 0.0)])
    assert f.kind == "flat"
    assert "every completion scored 0" in f.message and "grpo.num_generations=4" in f.message
    assert "every advantage is 0" in f.message and f"last {WINDOW} steps" in f.message
    rows[-1][M.FRAC_ZERO_STD] = 0.75  # one step with signal in the window: not flat
    assert "flat" not in _kinds(diagnose(rows, _cfg(), REWARDS))


def test_most_completions_truncated_and_scoring_nothing():
    rows = _rows(**{M.TRUNCATED_FRAC: 0.93, M.TRUNCATED_REWARD: 0.0, M.REWARD: 0.05})
    (f,) = diagnose(rows, _cfg(), REWARDS)
    assert f.kind == "truncated"
    assert f.message.startswith("93% of completions in the last 5 steps hit generation.max_new_tokens=2048")
    assert "score 0.00 on average" in f.message and "raise generation.max_new_tokens" in f.message.lower()
    # a length curriculum logs the step's cap: that one is named
    rows = _rows(**{M.TRUNCATED_FRAC: 0.93, M.TRUNCATED_REWARD: 0.0, M.REWARD: 0.05, M.MAX_NEW_TOKENS: 8192})
    assert "max_new_tokens=8192" in diagnose(rows, _cfg(), REWARDS)[0].message
    # truncated completions that score above the mean are not the problem; fewer than half truncated neither
    assert diagnose(_rows(**{M.TRUNCATED_FRAC: 0.9, M.TRUNCATED_REWARD: 0.8, M.REWARD: 0.5}), _cfg(), REWARDS) == []
    assert diagnose(_rows(**{M.TRUNCATED_FRAC: 0.4, M.TRUNCATED_REWARD: 0.0}), _cfg(), REWARDS) == []


def test_a_reward_that_never_matches():
    rows = _rows(**{M.reward_mean("accuracy"): 0.0})
    (f,) = diagnose(rows, _cfg(), REWARDS)  # boxed is 0 too, but has weight 0: only logged
    assert f.kind == "never_matches:accuracy"
    assert "reward 'accuracy' scored 0 on every completion" in f.message and "\\boxed{}" in f.message
    rows = _rows(**{M.reward_mean("format"): float("nan")})
    (f,) = diagnose(rows, _cfg(), REWARDS)
    assert f.kind == "never_matches:format" and "returned None for every completion" in f.message
    rows[0][M.reward_mean("format")] = 0.1  # one step in the window where it matched
    assert diagnose(rows[:5], _cfg(), REWARDS) == []


def test_kl_running_away_only_with_a_reference():
    rows = _rows(**{M.KL: 3.5})
    (f,) = diagnose(rows, _cfg(**{"grpo.beta": 0.04}), REWARDS)
    assert f.kind == "kl" and "averages 3.50 per token" in f.message and "trainer.learning_rate" in f.message
    assert diagnose(rows, _cfg(**{"grpo.beta": 0.0}), REWARDS) == []


def test_a_non_finite_loss():
    rows = _rows()
    rows[6][M.GRAD_NORM] = None  # metrics.jsonl writes NaN as null
    (f,) = diagnose(rows, _cfg(), REWARDS)
    assert f.kind == "diverged" and "grad_norm not finite (NaN or inf) at step 7" in f.message


def test_the_watch_says_each_finding_once():
    watch = Watch(_cfg(), REWARDS)
    said = []
    for i in range(12):
        flat = i >= 3
        said += watch.add(i + 1, _row(i + 1, **({M.FRAC_ZERO_STD: 1.0, M.REWARD_STD: 0.0} if flat else {})))
    assert len(said) == 1 and said[0].startswith(f"step {3 + WINDOW}: no learning signal")
    said = watch.add(13, _row(13, **{M.FRAC_ZERO_STD: 1.0, M.LOSS: math.inf}))
    assert len(said) == 1 and "diverged" in said[0]


@pytest.mark.integration
def test_a_run_learning_nothing_says_so_in_log_summary_and_report(tiny_model_dir, tmp_path, capsys):
    """The random tiny model never writes a right boxed answer: every group flat, `accuracy` never matching; the log
    says each once, summary.json and the report list them."""
    from helpers import tiny_overrides
    from mathgrpo.trainer import train

    over = tiny_overrides(tiny_model_dir, tmp_path, **{"trainer.max_steps": WINDOW + 2, "rewards.functions": "[accuracy]"})
    run = train(load_config(None, over, base={}), quiet=True)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r[M.FRAC_ZERO_STD] == 1.0 and r[M.reward_mean("accuracy")] == 0.0 for r in rows)  # the premise
    out = capsys.readouterr().out
    assert out.count("no learning signal") == 1 and out.count("reward 'accuracy' scored 0") == 1
    summary = json.loads((run / "summary.json").read_text())
    assert any("no learning signal" in m for m in summary["diagnosis"])
    assert "Learning nothing?" in (run / "report.md").read_text()
