"""trainer.report_to: a tiny training run logged to W&B (offline), MLflow (a local file store) and Trackio (a local
folder), with the run name, the config and every step's metrics read back from what each library wrote and
compared with metrics.jsonl. Each test skips when its library is not installed (`pip install 'mathgrpo[dev]'`
brings wandb and mlflow-skinny; trackio is an extra of its own)."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
from pathlib import Path

import pytest

from mathgrpo.config import load_config
from mathgrpo.trackers import TrackerError, Trackers, check_installed, scalars


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs = {m: pytest.mark.skipif(not _installed(m), reason=f"{m} is not installed")
         for m in ("wandb", "mlflow", "trackio")}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    (tmp_path / "wandb-dir").mkdir()
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 keeps the file store behind this switch
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mathgrpo-test")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.setenv("TRACKIO_PROJECT", "mathgrpo-test")
    return tmp_path


def _train(model_dir: str, out: Path, report_to: str, **extra):
    from helpers import tiny_overrides

    from mathgrpo.trainer import train

    over = tiny_overrides(model_dir, out, **{"trainer.report_to": report_to, "trainer.tensorboard": False,
                                             "trainer.max_steps": 2, **extra})
    run = train(load_config(None, over, base={}), quiet=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return run, rows


def _expected(rows: list[dict]) -> dict[int, dict[str, float]]:
    return {r["step"]: scalars({k: v for k, v in r.items() if k != "step"}) for r in rows}


def wandb_records(run_file: Path) -> list:
    """The records of a .wandb file (W&B's offline log: LevelDB-style 32 KiB blocks of chunked protobufs),
    read without the network; wandb >= 0.20 ships no Python reader."""
    from wandb.proto import wandb_internal_pb2

    raw, block, pos, buf, out = run_file.read_bytes(), 32768, 7, b"", []
    assert raw[:4] == b":W&B", raw[:7]
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        buf, pos = buf + raw[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last chunk of one
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@needs["wandb"]
@pytest.mark.integration
def test_wandb_offline_gets_name_config_and_every_metric(tiny_model_dir, offline):
    run, rows = _train(tiny_model_dir, offline / "out", "[wandb]", **{"trainer.tracker_run_name": "my-run"})
    state = json.loads((run / "trackers.json").read_text())["wandb"]
    (run_file,) = (offline / "wandb-dir").glob(f"wandb/offline-run-*-{state['id']}/run-{state['id']}.wandb")
    records = wandb_records(run_file)
    (run_rec,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_rec.display_name == "my-run" and run_rec.project == "mathgrpo"
    config = {_key(i): json.loads(i.value_json) for i in run_rec.config.update}
    assert config["trainer"]["max_steps"] == 2 and config["model"]["name_or_path"] == tiny_model_dir
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {_key(i): json.loads(i.value_json) for i in r.history.item}
            history[items["_step"]] = {k: v for k, v in items.items() if not k.startswith("_")}
    expected = _expected(rows)
    assert sorted(history) == [1, 2] and set(history[1]) == set(expected[1])
    for step, values in expected.items():
        for k, v in values.items():
            assert math.isclose(history[step][k], v, rel_tol=1e-12), (step, k)
    assert "train/reward" in history[1] and "train/loss" in history[2]


@needs["mlflow"]
@pytest.mark.integration
def test_mlflow_file_store_gets_name_config_and_every_metric(tiny_model_dir, offline):
    from mlflow.tracking import MlflowClient

    run, rows = _train(tiny_model_dir, offline / "out", "[mlflow]", **{"trainer.eval_at_end": True,
                                                                       "eval.max_problems": 2, "eval.num_samples": 2})
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"]
    client = MlflowClient()  # the same MLFLOW_TRACKING_URI: a file store under tmp_path
    got = client.get_run(run_id)
    assert got.info.run_name == "run" and got.info.status == "FINISHED"  # trainer.run_name of tiny_overrides
    assert client.get_experiment(got.info.experiment_id).name == "mathgrpo-test"
    assert got.data.params["trainer.max_steps"] == "2" and got.data.params["model.name_or_path"] == tiny_model_dir
    expected = _expected(rows)
    for key in expected[1]:
        history = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        assert history.keys() == expected.keys(), key
        for step, v in history.items():
            assert math.isclose(v, expected[step][key], rel_tol=1e-12, abs_tol=1e-300), (key, step)
    # the end-of-training evaluation joins the same run, at the last step (MLflow spells pass@1 as pass_1)
    summary = json.loads((run / "eval_summary.json").read_text())["models"]
    for label in ("base", "trained"):
        for key, mlflow_key in (("pass@1", "pass_1"), ("completion_length", "completion_length")):
            (m,) = client.get_metric_history(run_id, f"eval/{label}/{mlflow_key}")
            assert (m.step, m.value) == (2, summary[label]["metrics"][key])


@needs["mlflow"]
def test_resume_continues_the_same_tracker_run(offline, monkeypatch):
    from mlflow.tracking import MlflowClient

    run_dir = offline / "r"
    run_dir.mkdir()
    first = Trackers(["mlflow"], run_dir, "r", {"trainer": {"max_steps": 4}})
    first.log(1, {"reward": 0.5, "note": "text", "kl": float("nan")})
    first.close()
    second = Trackers(["mlflow"], run_dir, "r", {"trainer": {"max_steps": 4}}, resume=True)  # as a resumed run
    second.log(2, {"reward": 0.75})
    second.close()
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]["run_id"]
    client = MlflowClient()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/reward")] == [(1, 0.5), (2, 0.75)]
    assert "train/kl" not in client.get_run(run_id).data.metrics  # NaN and text are not logged
    exp_id = client.get_experiment_by_name("mathgrpo-test").experiment_id
    assert len(client.search_runs([exp_id])) == 1
    Trackers(["mlflow"], run_dir, "r", {}).close()  # a fresh run in the same folder: a new tracker run
    assert len(client.search_runs([exp_id])) == 2
    assert json.loads((run_dir / "trackers.json").read_text())["mlflow"]["run_id"] != run_id


@needs["trackio"]
@pytest.mark.integration
def test_trackio_local_gets_name_config_and_every_metric(tiny_model_dir, offline):
    run, rows = _train(tiny_model_dir, offline / "out", "[trackio]")
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs("mathgrpo-test", "run")
    expected = _expected(rows)
    assert [r["step"] for r in logs] == [1, 2]
    for r in logs:
        for k, v in expected[r["step"]].items():
            assert math.isclose(r[k], v, rel_tol=1e-12), (r["step"], k)
    assert SQLiteStorage.get_run_config("mathgrpo-test", "run")["trainer"]["max_steps"] == 2


def test_a_missing_library_names_its_extra(monkeypatch, tmp_path):
    import mathgrpo.trackers as trackers

    monkeypatch.setitem(trackers.LIBRARIES, "wandb", ("no_such_wandb_module", "wandb"))
    with pytest.raises(TrackerError, match=r"'wandb' but the no_such_wandb_module library is not installed: "
                                           r"pip install 'mathgrpo\[wandb\]'"):
        check_installed(["tensorboard", "wandb"])
    with pytest.raises(TrackerError, match=r"pip install 'mathgrpo\[wandb\]'"):
        Trackers(["tensorboard", "wandb"], tmp_path, "r", {})
    with pytest.raises(ValueError, match="trainer.report_to: 'neptune' not among tensorboard, wandb, mlflow"):
        load_config(None, ["trainer.report_to=[neptune]"])


def test_tensorboard_through_report_to(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = Trackers(["tensorboard"], tmp_path, "r", {"trainer": {"max_steps": 3}})
    t.log(1, {"reward": 0.25, "loss": -0.5})
    t.log(2, {"reward": 0.5, "loss": None})
    t.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/reward")] == [(1, 0.25), (2, 0.5)]
    assert [e.step for e in acc.Scalars("train/loss")] == [1]


@needs["mlflow"]
@pytest.mark.integration
def test_trl_door_reports_trl_logs_to_the_tracker(tiny_model_dir, offline):
    """report_to='mlflow', run_name='exp': TRL's metric names at its logging steps, eval_x as eval/x, TRL's
    options in the params; evaluate() after train() continues the same tracker run."""
    from datasets import Dataset
    from mlflow.tracking import MlflowClient
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from mathgrpo.trl_compat import GRPOConfig, GRPOTrainer

    out = offline / "trl-out"
    ds = Dataset.from_dict({"prompt": ["1 + 1 =", "2 + 2 =", "3 + 3 ="]})
    args = GRPOConfig(output_dir=str(out), per_device_train_batch_size=2, num_generations=2, max_completion_length=4,
                      max_steps=2, logging_steps=1, save_strategy="no", learning_rate=1e-3, bf16=False,
                      gradient_checkpointing=False, disable_tqdm=True, report_to="mlflow", run_name="exp")
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args, train_dataset=ds,
                          reward_funcs=lambda completions, **k: [float(len(c)) for c in completions],
                          peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    trainer.train()
    trainer.evaluate(ds)
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"]
    client = MlflowClient()
    got = client.get_run(run_id)
    assert got.info.run_name == "exp" and got.data.params["trl.learning_rate"] == "0.001"
    assert got.data.params["grpo.num_generations"] == "2"
    logged = [h for h in trainer.state.log_history if "reward" in h]
    history = {m.step: m.value for m in client.get_metric_history(run_id, "train/reward")}
    assert history == {h["step"]: h["reward"] for h in logged} and sorted(history) == [1, 2]
    assert [m.value for m in client.get_metric_history(run_id, "train/completions/mean_length")] == \
        [h["completions/mean_length"] for h in logged]
    (ev,) = [h for h in trainer.state.log_history if "eval_reward" in h]
    assert [m.value for m in client.get_metric_history(run_id, "eval/reward")] == [ev["eval_reward"]]
    assert len(client.search_runs([got.info.experiment_id])) == 1
    assert not (out / "tensorboard").exists()  # report_to names only mlflow
