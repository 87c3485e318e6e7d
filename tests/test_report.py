"""Tests for mathgrpo.report: a report from a fabricated 12-step run, its plots and tables, bad input."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from mathgrpo.report import PLOTS, ReportError, ema, first_last, read_metrics, write_eval_report, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fabricate_run(tmp_path, n_steps=12, with_times=True, with_kl=True):
    run = tmp_path / "run-a"
    run.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for s in range(1, n_steps + 1):
        acc, fmt = s / n_steps + rng.normal(0, 0.05), 0.5 + 0.02 * s
        row = {"step": s, "loss": float(rng.normal()), "reward": acc + 0.5 * fmt, "reward_std": 0.3,
               "rewards/accuracy/mean": acc, "rewards/accuracy/std": 0.2,
               "rewards/format/mean": fmt, "rewards/format/std": 0.1, "frac_zero_std": 0.25,
               "clip_ratio/region": 0.0, "completion_length_mean": 40.0 + s, "completion_length_max": 64,
               "truncated_frac": 0.1, "lr": 1e-5, "grad_norm": 0.5}
        if with_kl:
            row["kl"] = 0.001 * s
        if with_times:
            row.update(step_time=2.0, gen_time=1.5, update_time=0.5, tokens_per_s=100.0)
        rows.append(row)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "completions.jsonl").write_text("".join(
        json.dumps({"step": s, "completion": "x", "length": int(l)}) + "\n"
        for s in range(1, n_steps + 1) for l in rng.integers(5, 64, size=4)))
    (run / "config.yaml").write_text("model:\n  name_or_path: tiny-llama\ndata:\n  source: arithmetic\n")
    return run, rows


def eval_summary():
    table = [{"metric": "pass@1", "key": "pass@1", "base": 0.25, "trained": 0.5, "diff": 0.25,
              "ci_low": 0.05, "ci_high": 0.45},
             {"metric": "problems", "key": "n_problems", "base": 8, "trained": 8, "diff": None,
              "ci_low": None, "ci_high": None}]
    return {"models": {}, "comparison": table, "table": table,
            "settings": {"num_samples": 4, "temperature": 0.7, "seed": 1, "bootstrap": 100, "data": "arithmetic"}}


def test_report_has_plots_and_tables(tmp_path):
    run, rows = fabricate_run(tmp_path)
    md_path, html_path = write_report(run, eval_summary())
    md, page = md_path.read_text(), html_path.read_text()

    linked = re.findall(r"!\[[^\]]*\]\((plots/[^)]+\.png)\)", md)
    assert sorted(linked) == sorted(f"plots/{n}.png" for n in PLOTS)
    for rel in linked:
        assert (run / rel).read_bytes()[:8] == PNG_MAGIC
    # The HTML carries every plot inline and refers to no file.
    assert page.count('src="data:image/png;base64,') == len(PLOTS)
    assert not re.search(r'src="(?!data:)', page)

    # Comparison table, from the summary passed in.
    assert "| pass@1 | 0.250 | 0.500 | +0.250 | [+0.050, +0.450] |" in md
    assert "<td>[+0.050, +0.450]</td>" in page

    # First vs last steps, checked against plain means (12 steps -> windows of 6).
    w = 6
    for key, label in [("reward", "total reward"), ("rewards/accuracy/mean", "accuracy"),
                       ("rewards/format/mean", "format")]:
        first = np.mean([r[key] for r in rows[:w]])
        last = np.mean([r[key] for r in rows[-w:]])
        assert f"| {label} | {first:.3f} | {last:.3f} | {last - first:+.3f} |" in md
    assert f"first {w} vs last {w}" in md


def test_report_reads_eval_summary_json_and_skips_missing_series(tmp_path):
    run, _ = fabricate_run(tmp_path, with_times=False, with_kl=False)
    (run / "eval_summary.json").write_text(json.dumps(eval_summary()))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({k: v for k, v in json.loads(line).items() if k != "clip_ratio/region"}) + "\n"
        for line in (run / "metrics.jsonl").read_text().splitlines()))
    md_path, _ = write_report(run)
    md = md_path.read_text()
    assert "| pass@1 | 0.250 | 0.500 |" in md
    assert "plots/kl.png" not in md and "plots/step_time.png" not in md
    assert "plots/rewards.png" in md and "plots/length_hist.png" in md


def test_report_without_eval_says_so(tmp_path):
    run, _ = fabricate_run(tmp_path)
    md_path, _ = write_report(run)
    assert "No evaluation yet" in md_path.read_text()


def test_first_last_short_run_does_not_overlap():
    rows = [{"step": i, "reward": float(i)} for i in range(1, 4)]
    w, table = first_last(rows)
    assert w == 1
    assert table == [["total reward", "1.000", "3.000", "+2.000"]]


def test_ema_matches_pandas_adjusted_ewm():
    x = np.array([1.0, 3.0, math.nan, 2.0, 8.0, 5.0, math.nan, 4.0])
    span = 3
    ref = pd.Series(x).ewm(span=span, adjust=True, ignore_na=True).mean().ffill().to_numpy()
    np.testing.assert_allclose(ema(x, span), ref)


def test_missing_run_dir_and_metrics(tmp_path):
    with pytest.raises(ReportError, match="not found"):
        write_report(tmp_path / "nope")
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(ReportError, match=re.escape(str(run / "metrics.jsonl"))):
        write_report(run)
    (run / "metrics.jsonl").write_text("\n")
    with pytest.raises(ReportError, match="empty"):
        read_metrics(run)
    (run / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n{"step": 2, "rew\n')
    with pytest.raises(ReportError, match="line 2"):
        read_metrics(run)


def test_eval_only_report(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    rec = {"id": "0", "samples": [{"length": 10}, {"length": 30}]}
    (out / "eval.jsonl").write_text(json.dumps(rec) + "\n")
    summary = {"models": {"model": {"file": str(out / "eval.jsonl")}}, "comparison": None,
               "table": [{"metric": "pass@1", "key": "pass@1", "value": 0.5}], "settings": {}}
    with pytest.raises(ReportError, match="eval_summary.json"):
        write_eval_report(out)
    md_path, html_path = write_eval_report(out, summary)
    md = md_path.read_text()
    assert "| pass@1 | 0.500 |" in md
    assert "plots/length_hist.png" in md
    assert (out / "plots" / "length_hist.png").read_bytes()[:8] == PNG_MAGIC


def test_the_clip_plot_reads_the_key_the_trainer_logs():
    from mathgrpo.report import plot_kl

    # a run with beta=0 logs no kl, and its clip ratio as clip_ratio/region (tests/test_trainer.py checks that key)
    rows = [{"step": s, "clip_ratio/region": 0.01 * s} for s in range(1, 6)]
    fig, caption = plot_kl(rows, None)
    assert fig is not None and "KL" in caption


# --- against a real run --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_run(tiny_model_dir, tmp_path_factory):
    """A 2-step tiny training run (beta > 0, so the KL is logged): the keys the trainer really writes."""
    from helpers import tiny_overrides

    from mathgrpo.config import load_config
    from mathgrpo.trainer import train

    out = tmp_path_factory.mktemp("real")
    cfg = load_config(None, tiny_overrides(tiny_model_dir, out, **{"trainer.max_steps": 2, "grpo.beta": 0.04,
                                                                   "trainer.tensorboard": False}))
    return train(cfg, quiet=True)


@pytest.mark.integration
def test_the_fabricated_run_uses_only_keys_a_real_run_logs(real_run, tmp_path):
    real = set().union(*read_metrics(real_run))
    _, rows = fabricate_run(tmp_path)
    fabricated = set().union(*rows) - {"rewards/format/mean", "rewards/format/std"}  # a reward the tiny run lacks
    assert fabricated <= real, sorted(fabricated - real)


@pytest.mark.integration
def test_a_real_run_fills_every_plot_and_the_reward_table(real_run):
    from mathgrpo import metrics as M

    md_path, _ = write_report(real_run)
    md = md_path.read_text()
    linked = re.findall(r"!\[[^\]]*\]\((plots/[^)]+\.png)\)", md)
    assert sorted(linked) == sorted(f"plots/{n}.png" for n in PLOTS)  # every plot found its series
    for name in ("boxed", "accuracy", "similarity"):  # the run's rewards, by the names report.py looks for
        assert M.reward_mean(name) in read_metrics(real_run)[0]
        assert f"| {name} |" in md
