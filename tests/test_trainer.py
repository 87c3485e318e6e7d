"""The loop on a tiny random model: metrics, checkpoints, exact resume, SIGTERM, micro-batching."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_overrides
from mathgrpo.config import load_config
from mathgrpo.trainer import Sampler, microbatches, train

REWARD = str(Path(__file__).parent / "fixtures" / "user_rewards.py") + ":distinct_chars"


def _cfg(model_dir, out, **extra):
    extra.setdefault("rewards.functions", f"[accuracy, '{REWARD}']")
    return load_config(None, tiny_overrides(model_dir, out, **extra), base={})


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.integration
def test_three_steps_write_metrics_checkpoints_and_adapter(tiny_model_dir, tmp_path):
    run = train(_cfg(tiny_model_dir, tmp_path, **{"grpo.beta": 0.04}), quiet=True)
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ["reward", "reward_std", "rewards/accuracy/mean", "rewards/distinct_chars/std", "frac_zero_std", "kl",
                "clip_ratio/region", "completion_length_mean", "completion_length_max", "truncated_frac", "lr",
                "grad_norm", "loss", "step_time", "gen_time", "update_time", "tokens_per_s"]:
        assert key in rows[0], key
    assert rows[0]["grad_norm"] > 0  # the user reward varies, so the policy gets a gradient
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    ck = run / "checkpoints" / "checkpoint-3"
    assert (ck / "adapter" / "adapter_config.json").is_file() and (ck / "training_state.pt").is_file()
    assert json.loads((ck / "trainer_state.json").read_text())["step"] == 3
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "config.yaml").is_file() and any((run / "tensorboard").iterdir())
    comp = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert {c["step"] for c in comp} == {1, 2, 3} and len(comp) == 3 * 8


@pytest.mark.integration
def test_a_callback_returning_true_stops_with_a_checkpoint(tiny_model_dir, tmp_path):
    seen = []

    def cb(step, metrics):
        seen.append((step, metrics["reward"]))
        return step == 2

    run = train(_cfg(tiny_model_dir, tmp_path, **{"trainer.max_steps": 5, "trainer.save_steps": 10}), quiet=True,
                callbacks=[cb])
    assert [s for s, _ in seen] == [1, 2] and [r["step"] for r in _metrics(run)] == [1, 2]
    assert json.loads((run / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2
    comp = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert all(c["length"] >= 0 and isinstance(c["truncated"], bool) for c in comp)


@pytest.mark.integration
def test_keep_last_k_checkpoints(tiny_model_dir, tmp_path):
    run = train(_cfg(tiny_model_dir, tmp_path, **{"trainer.max_steps": 4, "trainer.save_steps": 1,
                                                    "trainer.save_total_limit": 2}), quiet=True)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-4"]


@pytest.mark.parametrize("extra", [{"grpo.beta": 0.04, "model.lora_dropout": 0.1},
                                   {"grpo.num_iterations": 2, "grpo.loss_type": "dapo"},
                                   # adaptive entropy control: its coefficient and last entropy come back on resume
                                   {"grpo.mini_batches": 2, "grpo.entropy_coef": 0.01, "grpo.entropy_target": 100.0,
                                    "grpo.entropy_coef_delta": 0.02},
                                   # full fine-tuning with a reference that training moves: it comes back too
                                   {"model.lora": False, "grpo.beta": 0.04, "grpo.ref_sync_steps": 1,
                                    "trainer.learning_rate": 1e-4}])
@pytest.mark.integration
def test_resume_repeats_the_straight_run_exactly(tiny_model_dir, tmp_path, extra):
    opts = {"trainer.max_steps": 4, "trainer.save_steps": 2, **extra}
    straight = train(_cfg(tiny_model_dir, tmp_path / "a", **opts), quiet=True)
    # Pretend the run died after step 3 (logged) but with checkpoint 2 as the last one written.
    broken = tmp_path / "b" / "run"
    shutil.copytree(straight, broken)
    shutil.rmtree(broken / "checkpoints" / "checkpoint-4")
    lines = (broken / "metrics.jsonl").read_text().splitlines()
    (broken / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")
    resumed = train(_cfg(tiny_model_dir, tmp_path / "b", **opts, **{"trainer.resume": str(broken)}), quiet=True)
    assert resumed == broken
    a, b = _metrics(straight), _metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    drawn = lambda run, step: [(c["problem"], c["completion"]) for c in  # noqa: E731
                               map(json.loads, (run / "completions.jsonl").read_text().splitlines()) if c["step"] == step]
    for step in (3, 4):  # the resumed run draws the same problems in the same order, and samples the same completions
        assert drawn(resumed, step) == drawn(straight, step) and len(drawn(straight, step)) == 8
    assert drawn(straight, 3) != drawn(straight, 1)  # (and those differ from step to step)
    for ra, rb in zip(a[2:], b[2:]):
        assert ra["reward"] == rb["reward"]
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5)
        assert ra.get("entropy_coef") == rb.get("entropy_coef")
        assert ra.get("kl") == pytest.approx(rb.get("kl"), rel=1e-4, abs=1e-9)
    if "grpo.entropy_target" in extra:  # (a target above any entropy: up by delta at every optimizer step)
        assert [r["entropy_coef"] for r in b] == pytest.approx([0.01 + 0.02 * (2 * s - 0.5) for s in (1, 2, 3, 4)])
    if extra.get("grpo.ref_sync_steps"):
        assert (straight / "checkpoints" / "checkpoint-4" / "reference").is_dir() and a[3]["kl"] > 0
    name = "adapter/adapter_model.safetensors" if extra.get("model.lora", True) else "model/model.safetensors"
    wa, wb = load_file(str(straight / name)), load_file(str(resumed / name))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
def test_sigterm_checkpoints_and_says_how_to_resume(tiny_model_dir, tmp_path):
    over = tiny_overrides(tiny_model_dir, tmp_path, **{"trainer.max_steps": 500, "trainer.save_steps": 1000,
                                                       "rewards.functions": f"[accuracy, '{REWARD}']"})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    # An empty config file means: dataclass defaults + overrides (not the embedded preset).
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    proc = subprocess.Popen([sys.executable, "-m", "mathgrpo", "train", str(cfg_file), *over, "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out  # stopped before max_steps: not a finished run
    assert "resume with: mathgrpo train" in out
    steps = len(_metrics(tmp_path / "run"))
    assert steps < 500
    assert (tmp_path / "run" / "checkpoints" / f"checkpoint-{steps}" / "adapter").is_dir()


def test_microbatches_respect_the_token_budget():
    lengths = [5, 50, 7, 48, 6, 30]
    groups = microbatches(lengths, budget=100)
    assert sorted(i for g in groups for i in g) == list(range(6))
    for g in groups:
        assert len(g) == 1 or max(lengths[i] for i in g) * len(g) <= 100
    assert microbatches([200], budget=100) == [[0]]  # a row longer than the budget still goes alone


def test_sampler_covers_every_problem_each_epoch_and_is_seeded():
    s = Sampler(5, seed=1)
    first = s.next(5)
    assert sorted(first) == list(range(5)) and sorted(s.next(5)) == list(range(5))
    again = Sampler(5, seed=1)
    assert again.next(5) == first
