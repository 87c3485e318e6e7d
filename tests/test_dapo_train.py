"""The loop on the tiny model with dynamic sampling, a length curriculum, the overlong reward and an entropy-masked
update in two mini-batches with an entropy bonus together: what each step trains on and logs is checked against
direct computations, and a resumed run repeats the uninterrupted one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_overrides
from mathgrpo.config import load_config
from mathgrpo.rewards import soft_overlong_penalty
from mathgrpo.trainer import train

REWARD = str(Path(__file__).parent / "fixtures" / "user_rewards.py") + ":odd_gold_only"
OPTS = {"rewards.functions": f"['{REWARD}', overlong]", "rewards.weights": "[1.0, 0.0]", "rewards.overlong_buffer": 3,
        "generation.max_new_tokens": "{0: 6, 3: 10}", "grpo.dynamic_sampling": True,
        "grpo.dynamic_sampling_max_rounds": 3, "grpo.top_entropy_quantile": 0.5, "grpo.beta": 0.0,
        "grpo.loss_type": "dr_grpo", "grpo.mini_batches": 2, "grpo.entropy_coef": 0.01, "trainer.max_steps": 4,
        "trainer.save_steps": 1, "trainer.save_total_limit": 3,
        "trainer.seed": 1}  # seed 1: steps 3 and 4 draw extra rounds (the resume below redoes them)


def _cfg(model_dir, out, **extra):
    return load_config(None, tiny_overrides(model_dir, out, **{**OPTS, **extra}), base={})


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    return train(_cfg(tiny_model_dir, tmp_path_factory.mktemp("straight")), quiet=True)


@pytest.mark.integration
def test_steps_train_on_informative_groups_at_the_scheduled_length(straight):
    metrics, comps = _jsonl(straight / "metrics.jsonl"), _jsonl(straight / "completions.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        cap = 6 if m["step"] < 3 else 10
        recs = [c for c in comps if c["step"] == m["step"]]
        assert m["max_new_tokens"] == cap and all(c["length"] <= cap for c in recs)
        assert all(c["truncated"] == (c["length"] == cap) for c in recs)  # a random model rarely stops early
        assert m["groups/generated"] >= m["groups/kept"] + m["groups/dropped"] - m["groups/surplus"] - 1e-9
        assert m["groups/kept"] == len(recs) // 4 or m["groups/kept"] == 0
        if m["groups/kept"]:  # trained only on problems with an odd answer: the others' groups are flat
            golds = {c["gold"] for c in recs}
            assert all(g.lstrip("-").isdigit() and int(g) % 2 for g in golds)
            assert m["frac_zero_std"] == 0.0
        # the overlong reward (weight 0, logged) follows the step's cap: ramp over its last 3 tokens
        want = sum(soft_overlong_penalty(c["length"], cap, 3) for c in recs) / len(recs)
        assert m["rewards/overlong/mean"] == pytest.approx(want, abs=1e-6)
        assert m["entropy"] > 0
    assert any(m["groups/dropped"] > 0 for m in metrics)  # the reward really made flat groups to drop
    assert [r["rewards/overlong/mean"] < 0 for r in metrics[:1]] == [True]  # capped completions are punished


@pytest.mark.integration
def test_resume_repeats_the_straight_run(straight, tiny_model_dir, tmp_path):
    """Resumed from the checkpoint just before the first step (after 2) that drew extra rounds: the refill after a
    resume draws from the restored sampler with the restored seeds, as the straight run did."""
    a = _jsonl(straight / "metrics.jsonl")
    refills = [r["step"] for r in a if r["step"] > 2 and r["groups/rounds"] > 0]
    assert refills, "no step after the first checkpoint kept drew extra rounds: the resume would test no refill"
    start = refills[0] - 1
    broken = tmp_path / "b" / "run"
    shutil.copytree(straight, broken)
    for ck in (broken / "checkpoints").iterdir():
        if int(ck.name.split("-")[1]) > start:
            shutil.rmtree(ck)
    lines = (broken / "metrics.jsonl").read_text().splitlines()
    (broken / "metrics.jsonl").write_text("\n".join(lines[:start + 1]) + "\n")  # one step logged past the checkpoint
    resumed = train(_cfg(tiny_model_dir, tmp_path / "b", **{"trainer.resume": str(broken)}), quiet=True)
    b = _jsonl(resumed / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    keys = ("reward", "groups/generated", "groups/kept", "groups/dropped", "groups/rounds", "max_new_tokens")
    assert [[r[k] for k in keys] for r in a[start:]] == [[r[k] for k in keys] for r in b[start:]]
    assert b[refills[0] - 1]["groups/rounds"] > 0  # the resumed run refilled
    assert [r["loss"] for r in b[start:]] == pytest.approx([r["loss"] for r in a[start:]], abs=1e-6)
    wa, wb = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (straight, resumed))
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6) for k in wa)


@pytest.mark.distributed
def test_two_torchrun_ranks_fill_their_shares_together(tiny_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    over = tiny_overrides(tiny_model_dir, tmp_path / "out", **{**OPTS, "trainer.max_steps": 2, "trainer.save_steps": 10,
                                                                "grpo.top_entropy_quantile": 1.0,
                                                                "grpo.dynamic_sampling_max_rounds": 8})
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "mathgrpo", "train", str(cfg_file), *over, "--quiet"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    run = tmp_path / "out" / "run"
    metrics, comps = _jsonl(run / "metrics.jsonl"), _jsonl(run / "completions.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        recs = [c for c in comps if c["step"] == m["step"]]
        assert m["groups/kept"] in (0.0, 2.0) and len(recs) == 8  # 1 group per rank, equal shares
        if m["groups/kept"]:
            assert all(c["gold"].lstrip("-").isdigit() and int(c["gold"]) % 2 for c in recs)
    assert sum(m["groups/dropped"] for m in metrics) > 0 and all(m["groups/kept"] == 2.0 for m in metrics)
