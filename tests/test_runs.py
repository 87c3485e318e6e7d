"""Runs never lost or mixed (issue 16): run folders, resume checks, damaged checkpoints, full disks, errors mid-run.

Each test reproduces a reported case: two runs in one second, a reused run_name, a resume with other settings or
a reordered / shrunk data file, a truncated checkpoint file, a half-written metrics line, a full disk at checkpoint
time, an exception in a reward at step 2, a reward that is always None.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_overrides
from mathgrpo import checkpoint as ckpt
from mathgrpo.cli import main
from mathgrpo.config import ConfigError, load_config
from mathgrpo.rewards import RewardError
from mathgrpo.scoring import RewardSet
from mathgrpo.runs import ResumeError, RunDirError, create_run_dir, truncate_logs
from mathgrpo.trainer import train

FIXTURES = Path(__file__).parent / "fixtures"
FLAKY = f"{FIXTURES / 'faulty_rewards.py'}:flaky"


def _rows(n: int = 40) -> list[dict]:
    return [{"problem": f"What is {a} + {a + 3}?", "solution": f"\\boxed{{{2 * a + 3}}}"} for a in range(n)]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _opts(data: Path, **extra) -> dict:
    return {"data.source": str(data), "rewards.functions": f"[accuracy, '{FLAKY}']", "trainer.save_steps": 1, **extra}


def _cfg(model_dir, out, data, **extra):
    return load_config(None, tiny_overrides(model_dir, out, **_opts(data, **extra)), base={})


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _rewards(run: Path) -> dict[int, float]:
    return {r["step"]: r["reward"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    """A finished 3-step run on a data file, a checkpoint after every step."""
    root = tmp_path_factory.mktemp("straight")
    data = _write(root / "d.jsonl", _rows())
    return train(_cfg(tiny_model_dir, root / "out", data), quiet=True), data


def _copy(straight, tmp_path) -> Path:
    run = tmp_path / "out" / "run"
    shutil.copytree(straight[0], run)
    return run


# --- run folders -----------------------------------------------------------------------------------------

def test_two_runs_started_in_the_same_second_get_two_folders(tmp_path):
    cfg = load_config(None, [f"trainer.output_dir={tmp_path}"], base={})
    same_second = lambda fmt: "20260101-120000"  # noqa: E731
    a, b = create_run_dir(cfg, clock=same_second), create_run_dir(cfg, clock=same_second)
    assert (a.name, b.name) == ("20260101-120000", "20260101-120000-2")
    assert (a / "config.yaml").is_file() and (b / "config.yaml").is_file()


def test_an_existing_run_name_is_an_error_and_the_run_is_untouched(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("old")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    assert main(["train", str(cfg_file), *tiny_overrides(tiny_model_dir, tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{run} already holds a run; resume it with --resume {run}" in err and "Traceback" not in err
    assert (run / "config.yaml").read_text() == "old" and (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
    # an empty folder (made by hand) is not a run: it is used
    cfg = load_config(None, [f"trainer.output_dir={tmp_path}", "trainer.run_name=empty"], base={})
    (tmp_path / "empty").mkdir()
    assert create_run_dir(cfg) == tmp_path / "empty"


@pytest.mark.parametrize("err,reason", [(errno.EACCES, "Permission denied"), (errno.EROFS, "Read-only file system"),
                                        (errno.ENOSPC, "No space left on device")])
def test_an_unwritable_output_location_is_one_line_naming_path_and_reason(tmp_path, monkeypatch, err, reason):
    def refuse(self, *a, **k):
        raise OSError(err, os.strerror(err), str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    cfg = load_config(None, [f"trainer.output_dir={tmp_path / 'out'}", "trainer.run_name=r"], base={})
    with pytest.raises(RunDirError) as e:
        create_run_dir(cfg)
    assert str(e.value) == f"trainer.output_dir={tmp_path / 'out'}: cannot create the folder: {reason}"


def test_an_output_dir_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "runs").write_text("a file")
    assert main(["train", f"trainer.output_dir={tmp_path / 'runs'}", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"mathgrpo train: error: trainer.output_dir={tmp_path / 'runs'}: cannot create the folder: "
                   f"{tmp_path / 'runs'} is a file, not a folder")


def test_the_cli_turns_a_file_system_error_into_one_line(monkeypatch, capsys):
    import mathgrpo.cli as cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl")

    monkeypatch.setattr(cli, "cmd_config", full)
    assert main(["config", "show"]) == 2
    assert capsys.readouterr().err == "mathgrpo config: error: /runs/x/metrics.jsonl: No space left on device\n"


# --- resume checks --------------------------------------------------------------------------------------

@pytest.mark.integration
def test_a_resume_with_other_settings_is_refused_with_the_differences(straight, tiny_model_dir, tmp_path):
    run = _copy(straight, tmp_path)
    before = {p: (run / p).read_bytes() for p in ("config.yaml", "metrics.jsonl")}
    cfg = _cfg(tiny_model_dir, tmp_path / "out", straight[1], **{
        "grpo.num_generations": 8, "generation.max_new_tokens": 12, "trainer.learning_rate": 0.1,
        "trainer.save_total_limit": 1, "trainer.resume": str(run)})
    with pytest.raises(ResumeError) as e:
        train(cfg, quiet=True)
    msg = str(e.value)
    for line in ("grpo.num_generations: 4 in the checkpoint, 8 now", "generation.max_new_tokens: 8 in the checkpoint, "
                 "12 now", "trainer.learning_rate: 0.001 in the checkpoint, 0.1 now",
                 "trainer.save_total_limit: 3 in the checkpoint, 1 now", "--resume-changing KEY"):
        assert line in msg
    assert {p: (run / p).read_bytes() for p in before} == before  # nothing rewritten, nothing pruned
    assert len(ckpt.list_checkpoints(run)) == 3
    cfg.trainer.resume_changing = ["trainer.learning_rate"]  # the restored scheduler would keep the old one
    with pytest.raises(ConfigError, match="'trainer.learning_rate' cannot change on resume"):
        train(cfg, quiet=True)
    # the same settings: resumes (nothing left to do), config.yaml untouched, the resume recorded
    train(_cfg(tiny_model_dir, tmp_path / "out", straight[1], **{"trainer.resume": str(run)}), quiet=True)
    assert (run / "config.yaml").read_bytes() == before["config.yaml"]
    assert json.loads((run / "resumes.jsonl").read_text())["changes"] == {}


@pytest.mark.parametrize("change,message", [
    (lambda rows: rows[::-1], "split: the same problems, split or ordered differently"),
    (lambda rows: rows[:30], "data: other problems or golds than the checkpoint's (20 train + 4 test then, 20 + 3 now)"),
])
@pytest.mark.integration
def test_a_reordered_or_shrunk_data_file_is_refused(straight, tiny_model_dir, tmp_path, change, message):
    run = _copy(straight, tmp_path)
    data = _write(tmp_path / "d2.jsonl", change(_rows()))
    cfg = _cfg(tiny_model_dir, tmp_path / "out", data, **{"trainer.resume": str(run),
                                                          "trainer.resume_changing": "[data.source]"})
    with pytest.raises(ResumeError) as e:
        train(cfg, quiet=True)
    assert message in str(e.value) and "data.source" not in str(e.value)


@pytest.mark.integration
def test_resume_changing_max_steps_skips_a_damaged_checkpoint_and_records_the_change(
        straight, tiny_model_dir, tmp_path, caplog):
    run = _copy(straight, tmp_path)
    state = run / "checkpoints" / "checkpoint-3" / "training_state.pt"
    size = state.stat().st_size
    state.write_bytes(state.read_bytes()[: size // 2])  # killed while copying, a bad disk...
    leftover = run / "checkpoints" / ".tmp-checkpoint-3-999"
    leftover.mkdir()
    (leftover / "training_state.pt").write_bytes(b"half")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "rew')  # a crash in the middle of a line
    cfg = _cfg(tiny_model_dir, tmp_path / "out", straight[1], **{
        "trainer.resume": "latest", "trainer.max_steps": 4, "trainer.resume_changing": "[trainer.max_steps]"})
    with caplog.at_level(logging.WARNING):
        assert train(cfg, quiet=True) == run
    log = caplog.text
    assert (f"skipped {run / 'checkpoints' / 'checkpoint-3'}: training_state.pt has {size // 2} bytes, {size} were "
            f"written") in log
    assert f"{run / 'metrics.jsonl'}: line 4 was cut short" in log
    assert _steps(run) == [1, 2, 3, 4]
    assert _rewards(run)[3] == _rewards(straight[0])[3]  # resumed from checkpoint-2 exactly
    rec = json.loads((run / "resumes.jsonl").read_text())
    assert rec["changes"] == {"trainer.max_steps": [3, 4]} and rec["from"].endswith("checkpoint-2")
    assert "max_steps: 4" in (run / "config.yaml").read_text()
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert ckpt.verify(run / "checkpoints" / "checkpoint-4") is None


@pytest.mark.integration
def test_damaged_checkpoints_are_named_with_the_reason(straight, tmp_path, caplog):
    run = _copy(straight, tmp_path)
    c1, c2, c3 = ckpt.list_checkpoints(run)
    (c3 / "trainer_state.json").write_text('{"step": 3, "sampl')
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.find_resume(str(c3), tmp_path)
    assert f"trainer.resume={c3}: cannot resume from it: trainer_state.json is damaged" in str(e.value)
    assert f"the newest complete one is {c2}" in str(e.value)
    adapter = c2 / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        assert ckpt.find_resume(str(run), tmp_path) == c1
    assert f"skipped {c3}: trainer_state.json is damaged" in caplog.text
    assert f"skipped {c2}: adapter/adapter_model.safetensors has 100 bytes" in caplog.text
    cfg_file = c1 / "config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("seed: 42", "seed: 43"))  # same size, other content
    assert "config.yaml does not match the sha256" in ckpt.verify(c1)
    (c1 / "manifest.json").unlink()  # a checkpoint of an older version: accepted unverified
    assert ckpt.verify(c1) is None


def test_a_damaged_metrics_line_before_the_last_names_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "x\n{"step": 3}\n')
    with pytest.raises(RunDirError, match=r"metrics.jsonl: line 2 is not valid JSON"):
        truncate_logs(tmp_path, 3)


# --- faults during the run ------------------------------------------------------------------------------

@pytest.mark.integration
def test_an_error_in_a_reward_at_step_2_saves_then_resumes_exactly(straight, tiny_model_dir, tmp_path, monkeypatch,
                                                                   caplog):
    opts = {"trainer.save_steps": 10}  # no periodic checkpoint before the failure: what is there, the error saved
    monkeypatch.setenv("MATHGRPO_TEST_FAIL_AT", "2")
    with caplog.at_level(logging.ERROR), pytest.raises(RewardError, match="a bug in the user's reward"):
        train(_cfg(tiny_model_dir, tmp_path, straight[1], **opts), quiet=True)
    run = tmp_path / "run"
    assert [c.name for c in ckpt.list_checkpoints(run)] == ["checkpoint-1"]
    state = json.loads((run / "checkpoints" / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["sampler"]["position"] == 2  # where step 2 began, not after its draw of 2 problems
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert f"step 2 failed (RewardError); saved checkpoint {run / 'checkpoints' / 'checkpoint-1'}" in caplog.text
    monkeypatch.delenv("MATHGRPO_TEST_FAIL_AT")
    train(_cfg(tiny_model_dir, tmp_path, straight[1], **opts, **{"trainer.resume": str(run)}), quiet=True)
    assert _steps(run) == [1, 2, 3] and _rewards(run) == _rewards(straight[0])
    wa = load_file(str(straight[0] / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


@pytest.mark.integration
@pytest.mark.parametrize("extra", [{}, {"grpo.mini_batches": 2}])  # with mini-batches: 2 optimizer steps per step
def test_an_error_after_the_update_saves_that_step(straight, tiny_model_dir, tmp_path, caplog, extra):
    def callback(step, metrics):
        if step == 2:
            raise RuntimeError("a bug in a callback")

    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="a bug in a callback"):
        train(_cfg(tiny_model_dir, tmp_path, straight[1], **{"trainer.save_steps": 10, **extra}), quiet=True,
              callbacks=[callback])
    run = tmp_path / "run"
    assert [c.name for c in ckpt.list_checkpoints(run)] == ["checkpoint-2"]
    state = json.loads((run / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["sampler"]["position"] == 4
    assert "step 2 failed (RuntimeError); saved checkpoint" in caplog.text


@pytest.mark.integration
def test_a_full_disk_at_checkpoint_time_keeps_the_previous_one(tiny_model_dir, tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def save(obj, f, *a, **k):
        if ".tmp-checkpoint-2" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    data = _write(tmp_path / "d.jsonl", _rows())
    over = tiny_overrides(tiny_model_dir, tmp_path / "out", **_opts(data, **{"trainer.max_steps": 2}))
    assert main(["train", str(cfg_file), *over, "--quiet"]) == 2
    err = capsys.readouterr().err
    root = tmp_path / "out" / "run" / "checkpoints"
    assert (f"mathgrpo train: error: could not write checkpoint-2 in {root}: No space left on device; the previous "
            f"checkpoint {root / 'checkpoint-1'} is kept") in err and "Traceback" not in err
    assert [p.name for p in root.iterdir()] == ["checkpoint-1"] and ckpt.verify(root / "checkpoint-1") is None


def test_a_reward_that_is_always_none_warns_once(caplog):
    rs = RewardSet([(f"{FIXTURES / 'faulty_rewards.py'}:never", 1.0), ("boxed", 1.0)])
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            rs.score(["\\boxed{1}", "no"], gold=["1", "2"])
    warned = [r for r in caplog.records if "returned None for every completion" in r.getMessage()]
    assert len(warned) == 1 and "'never'" in warned[0].getMessage()


def test_a_run_name_taken_by_a_run_that_never_started_says_so(tmp_path):
    cfg = load_config(None, [f"trainer.output_dir={tmp_path}", "trainer.run_name=r"], base={})
    create_run_dir(cfg)  # e.g. a typo in data.source made it stop before step 1
    with pytest.raises(RunDirError, match="holds a run that has not logged a step .* delete that folder"):
        create_run_dir(cfg)
