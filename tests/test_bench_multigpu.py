"""benchmarks.multigpu end to end on CPU (tiny model, gloo): a 1-rank and a 2-rank run under torchrun,
the table printed, and the 2-rank update of the shared rollout equal to the 1-rank one at fp32 rounding."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.distributed,  # spawns torchrun
              pytest.mark.skipif(shutil.which("torchrun") is None or importlib.util.find_spec("torch.distributed.run") is None,
                                 reason="torchrun is not available")]


def test_tiny_one_and_two_ranks_agree(tmp_path):
    out = tmp_path / "multigpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.multigpu", "--tiny", "--gpus", "1", "2",
                           "--global-prompts", "4", "--group", "4", "--new-tokens", "8", "--steps", "2",
                           "--work-dir", str(tmp_path / "work"), "--timeout", "100", "--total-timeout", "110",
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=150, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| GPUs | global completions | step s |" in proc.stdout, proc.stdout[-3000:]
    res = json.loads(out.read_text())
    assert [r["gpus"] for r in res["summary"]] == [1, 2]
    assert all("error" not in r and r["global_completions"] == 16 for r in res["summary"]), res["summary"]
    assert res["summary"][1]["rows_per_gpu"] == 8
    (agree,) = res["agreement"]
    assert agree["same_rollout"] and agree["start_max_diff"] == 0
    assert agree["grad_max"] > 0 and agree["weight_max_update"] > 0
    assert agree["grad_rel"] < 1e-5, agree  # fp32: rounding only
    assert abs(agree["loss_diff"]) < 1e-6 and abs(agree["grad_norm_rel"]) < 1e-5, agree
