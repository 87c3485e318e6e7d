"""Bad inputs and faults that must not pass in silence: each test reproduces one reported case (a setting the model
cannot honour, a resume that would shrink a run, a reward returning strings or huge numbers or never returning, a
run folder used by two processes, a merge over the user's files, an unreadable model or cache, mixed data files,
an interrupted run's exit status...) and checks the one-line error or the documented behaviour."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from helpers import tiny_overrides
from mathgrpo.cli import main
from mathgrpo.config import ConfigError, load_config
from mathgrpo.modelinfo import ModelError
from mathgrpo.rewards import RewardError
from mathgrpo.runs import ResumeError
from mathgrpo.scoring import RewardSet
from mathgrpo.trainer import train

FIXTURES = Path(__file__).parent / "fixtures"


def _cfg(model_dir, out, **extra):
    return load_config(None, tiny_overrides(model_dir, out, **extra), base={})


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    """A finished 2-step run of the tiny model, a checkpoint after every step."""
    out = tmp_path_factory.mktemp("finished")
    return train(_cfg(tiny_model_dir, out, **{"trainer.max_steps": 2, "trainer.save_steps": 1}), quiet=True)


# --- wrong results with exit 0 -------------------------------------------------------------------------------

def test_max_new_tokens_past_the_models_context_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ModelError, match=r"generation.max_new_tokens=600 does not fit the model's context: .* "
                                         r"max_position_embeddings=512.* at most \d{3}"):
        train(_cfg(tiny_model_dir, tmp_path, **{"generation.max_new_tokens": "{0: 8, 2: 600}"}), quiet=True)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_training_max_new_tokens_counts_the_longest_prompt(tiny_model_dir, tmp_path):
    with pytest.raises(ModelError, match=r"generation.max_new_tokens=500 does not fit .*the prompt \((\d\d+) tokens"):
        train(_cfg(tiny_model_dir, tmp_path, **{"generation.max_new_tokens": 500}), quiet=True)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_eval_max_new_tokens_counts_the_longest_prompt(tiny_model_dir):
    from mathgrpo.evaluate import evaluate
    from mathgrpo.models import load_model
    from mathgrpo.data import Problem

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "eval.max_new_tokens=500"], base={})
    model, tok = load_model(cfg.model)
    with pytest.raises(ModelError, match=r"eval.max_new_tokens=500 does not fit .*the prompt \(\d\d+ tokens"):
        evaluate(model, tok, [Problem("p0", "What is 2 + 2?", "4", "")], cfg)


@pytest.mark.integration
def test_a_resume_with_fewer_max_steps_than_trained_is_refused(finished, tiny_model_dir, tmp_path):
    before = (finished / "config.yaml").read_text()
    cfg = _cfg(tiny_model_dir, tmp_path, **{"trainer.max_steps": 1, "trainer.resume": str(finished),
                                            "trainer.resume_changing": "[trainer.max_steps]"})
    with pytest.raises(ResumeError, match=r"trainer.max_steps=1 but the run has trained 2 steps already"):
        train(cfg, quiet=True)
    assert (finished / "config.yaml").read_text() == before and not (finished / "resumes.jsonl").exists()


def test_eval_at_end_without_test_problems_is_refused_before_any_work(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path, **{"trainer.eval_at_end": True, "data.test_fraction": 0.0})
    with pytest.raises(ConfigError, match=r"trainer.eval_at_end=true but no test problems are held out .*"
                                          r"data.test_fraction=0.0"):
        train(cfg, quiet=True)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value, shown", [("1.0", "'1.0' (str)"), ([1.0], "[1.0] (list)"), (1e300, "1e+300")])
def test_a_reward_must_return_real_numbers_in_float32_range(value, shown):
    def bad(completions, **kw):
        return [0.5] + [value] * (len(completions) - 1)

    with pytest.raises(RewardError) as e:
        RewardSet([("boxed", 1.0), (bad, 1.0)]).score(["a", "b", "c"])
    assert f"reward 'bad' returned {shown} at example 1" in str(e.value)


def test_numpy_torch_and_bool_rewards_are_numbers():
    import numpy as np
    import torch

    def ok(completions, **kw):
        return [np.float32(0.5), torch.tensor(1.0), True, None, 2][: len(completions)]

    per, total = RewardSet([(ok, 1.0)]).score(list("abcde"))
    assert per[:, 0].tolist()[:3] == [0.5, 1.0, 1.0] and np.isnan(per[3, 0]) and total.tolist() == [0.5, 1, 1, 0, 2]


@pytest.mark.integration
def test_eval_from_another_folder_reads_the_runs_data_or_refuses(tiny_model_dir, tmp_path, monkeypatch, capsys):
    rows = [{"problem": f"What is {a} + 3?", "answer": str(a + 3)} for a in range(24)]
    train_dir, other = tmp_path / "project", tmp_path / "elsewhere"
    for folder, shift in ((train_dir, 0), (other, 100)):  # a different file of the same name in the other folder
        (folder / "data").mkdir(parents=True)
        (folder / "data" / "p.jsonl").write_text("".join(json.dumps({**r, "answer": str(int(r["answer"]) + shift)})
                                                         + "\n" for r in rows))
    monkeypatch.chdir(train_dir)
    run = train(_cfg(tiny_model_dir, tmp_path / "out", **{
        "data.source": "data/p.jsonl", "data.answer_column": "answer", "data.solution_column": "null",
        "data.test_fraction": 0.25,
        "trainer.max_steps": 1, "rewards.functions": "[accuracy]"}), quiet=True)
    assert json.loads((run / "data.json").read_text())["source"] == str(train_dir / "data" / "p.jsonl")
    monkeypatch.chdir(other)
    assert main(["eval", "--adapter", str(run), "eval.num_samples=1", "eval.max_new_tokens=4"]) == 0
    out = capsys.readouterr().out
    assert f"data.source=data/p.jsonl: the run read {train_dir / 'data' / 'p.jsonl'}" in out
    golds = {r["gold"] for r in map(json.loads, (run / "eval.jsonl").read_text().splitlines())}
    assert golds and all(int(g) < 100 for g in golds)  # the run's own test problems
    (train_dir / "data" / "p.jsonl").unlink()  # the run's data is gone: what is found here is not it
    assert main(["eval", "--adapter", str(run), "eval.num_samples=1", "eval.max_new_tokens=4"]) == 2
    err = capsys.readouterr().err
    assert f"{run}: data.source=data/p.jsonl ({other / 'data' / 'p.jsonl'} here) is not the data this run was " \
           f"trained on" in err


@pytest.mark.integration
def test_a_run_in_use_by_another_process_is_refused_and_a_stale_lock_is_not(finished, tiny_model_dir, tmp_path):
    import shutil

    from mathgrpo.runs import RunDirError, lock_run

    run = tmp_path / "out" / "run"
    shutil.copytree(finished, run)
    (run / ".lock").write_text("process 999999 on a-host-that-crashed since 2026-01-01 00:00:00\n")  # stale
    cfg = _cfg(tiny_model_dir, tmp_path / "out", **{"trainer.max_steps": 3, "trainer.resume": str(run),
                                                     "trainer.save_steps": 1,
                                                     "trainer.resume_changing": "[trainer.max_steps]"})
    held = lock_run(run)  # another process resuming it now (flock: a second open file is refused alike)
    try:
        with pytest.raises(RunDirError, match=rf"{run} is in use by process \d+ on .* two processes would write"):
            train(cfg, quiet=True)
    finally:
        held.close()
    assert not (run / "resumes.jsonl").exists()
    assert train(cfg, quiet=True) == run  # the lock file left behind holds no lock
    with lock_run(run):  # released when train returned
        pass


# --- lost data -----------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_merge_into_a_non_empty_folder_is_refused_unless_overwrite(finished, tmp_path, capsys):
    out = tmp_path / "deploy"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    (out / "config.json").write_text("{}")
    assert main(["merge", str(finished), str(out)]) == 2
    err = capsys.readouterr().err
    assert f"merge: {out} is not empty (2 entries); the merged model would overwrite them" in err
    assert "--overwrite" in err
    assert (out / "config.json").read_text() == "{}"
    assert main(["merge", str(finished), str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "the user's own file" and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 512


# --- the hang ------------------------------------------------------------------------------------------------

def test_a_reward_that_never_returns_is_stopped_by_its_time_limit_naming_it():
    import time

    def stuck(completions, **kw):
        try:
            time.sleep(60)  # a network call that never answers
        except Exception:  # a reward's own broad except must not swallow the limit
            return [0.0] * len(completions)
        return [1.0] * len(completions)

    rs = RewardSet([("boxed", 1.0), (stuck, 1.0)], time_limit=0.5)
    t0 = time.perf_counter()
    with pytest.raises(RewardError, match=r"reward 'stuck' did not return within rewards.time_limit=0.5 s \(a batch "
                                          r"of 2 completions\)"):
        rs.score(["a", "b"])
    assert time.perf_counter() - t0 < 5
    import os
    import signal

    os.kill(os.getpid(), signal.SIGUSR2)  # a signal arriving after the call is harmless
    time.sleep(0.1)
    fast = RewardSet([("boxed", 1.0)], time_limit=0.2)
    time.sleep(0.4)  # a timer left running would fire here
    assert fast.score(["\\boxed{1}"])[1].tolist() == [1.0]


def test_the_time_limit_is_a_config_key():
    assert load_config(None, ["rewards.time_limit=30"], base={}).rewards.time_limit == 30
    assert load_config(None, [], base={}).rewards.time_limit == 600
    with pytest.raises(ConfigError, match="rewards.time_limit"):
        load_config(None, ["rewards.time_limit=0"], base={})


def test_the_first_ctrl_c_says_what_happens_and_how_to_stop_now(capsys):
    import os
    import signal

    from mathgrpo.checkpoint import StopFlag

    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signal == signal.SIGINT
        assert "SIGINT: stopping after this step, with a checkpoint (Ctrl-C again: stop now)" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


# --- one line instead of a traceback ---------------------------------------------------------------------------

def test_an_uncached_hub_model_offline_is_one_line_saying_how_to_go_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "mathgrpo-tests/never-downloaded-1.5B"  # not in any cache, as the defaults' model on a fresh machine
    over = tiny_overrides(name, tmp_path, **{"trainer.max_steps": 1})
    assert main(["train", *over, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"mathgrpo train: error: model.name_or_path={name}: not in the local Hugging Face cache, and "
                       f"the hub cannot be reached (offline): download it once where there is network (`hf download "
                       f"{name}`), run offline with `--preset demo` (the embedded SmolLM2-135M), or set "
                       f"model.name_or_path to a local model folder") and not any("Traceback" in x for x in err)


def test_a_model_folder_with_only_config_json_names_folder_and_what_is_missing(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text((Path(tiny_model_dir) / "config.json").read_text())
    assert main(["train", *tiny_overrides(str(tmp_path / "m"), tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (f"model folder {tmp_path / 'm'} has no weights (*.safetensors or pytorch_model*.bin) and no tokenizer "
            f"(tokenizer.json, tokenizer_config.json, ...)") in err and "sentencepiece" not in err


def test_wandb_without_a_login_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED", "WANDB_IDENTITY_TOKEN_FILE", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no wandb settings
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.chdir(tmp_path)
    over = tiny_overrides("no/such-model", tmp_path / "out", **{"trainer.report_to": "[wandb]"})
    assert main(["train", *over, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "mathgrpo train: error: trainer.report_to lists 'wandb' but no W&B login was found (WANDB_API_KEY, ~/.netrc, "
        "wandb's settings file): run `wandb login`, or set WANDB_MODE=offline to write the run locally (`wandb sync` "
        "uploads it later)") and "loading model" not in err
    from mathgrpo.trackers import wandb_login_found

    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_login_found()
    (tmp_path / ".netrc").unlink()
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_login_found()


def test_a_damaged_gguf_cache_is_converted_again_and_an_unwritable_one_moves_to_temp(tiny_model_dir, tmp_path,
                                                                                      monkeypatch, caplog):
    import logging
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mathgrpo import loading
    from mathgrpo.config import ModelConfig

    conversions = []
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def converting(real):
        def load(path, *a, gguf_file=None, **kw):
            if gguf_file:  # "dequantise the GGUF": the tiny model stands in for it
                conversions.append(real.__self__.__name__)
                return real(tiny_model_dir, *a, **kw)
            return real(path, *a, **kw)
        return load

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", converting(real_model))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", converting(real_tok))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "tiny.gguf").write_bytes(b"GGUF")
    cfg = ModelConfig(name_or_path=str(tmp_path / "m" / "tiny.gguf"))
    monkeypatch.setenv("MATHGRPO_CACHE", str(tmp_path / "cache"))
    load = lambda: (loading.load_tokenizer(cfg), loading.load_base(cfg, torch.device("cpu"), torch.float32))  # noqa
    load()
    assert len(conversions) == 2  # tokenizer and model converted once, then cached
    (cached,) = (tmp_path / "cache" / "gguf").iterdir()
    weights = cached / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a damaged cached copy
    with caplog.at_level(logging.WARNING):
        load()
    assert f"the cached model in {cached / 'model'} is damaged (SafetensorError" in caplog.text
    assert len(conversions) == 3 and weights.stat().st_size > 1000  # converted and cached again
    load()
    assert len(conversions) == 3
    (tmp_path / "blocked").write_text("a file where the cache folder would be")
    monkeypatch.setenv("MATHGRPO_CACHE", str(tmp_path / "blocked" / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load()
    assert f"cannot write the model cache {tmp_path / 'blocked' / 'cache'} (Not a directory): converting into " \
           f"{tmp_path / 'tmp'}" in caplog.text
    assert len(list((tmp_path / "tmp").glob("mathgrpo-cache-*/gguf/tiny-*/model/model.safetensors"))) == 1


def test_a_weighted_total_past_float32_names_the_rewards():
    def huge(completions, **kw):
        return [3e38] * len(completions)

    with pytest.raises(RewardError, match=r"weighted reward of example 0 overflows float32: 'huge' 3e\+38 x weight 2"):
        RewardSet([(huge, 2.0)]).score(["a"])


def test_a_data_folder_mixing_column_layouts_names_the_file_that_does_not_fit(tmp_path):
    from mathgrpo.data import load_problems
    from mathgrpo.sources import DataError

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"problem": f"{i} + 1?", "answer": str(i + 1)}) + "\n"
                                            for i in range(6)))
    (folder / "b.jsonl").write_text("".join(json.dumps({"question": f"{i} + 2?", "final": str(i + 2)}) + "\n"
                                            for i in range(6)))
    cfg = load_config(None, [f"data.source={folder}", "data.answer_column=answer", "data.solution_column=null"],
                      base={})
    with pytest.raises(DataError, match=rf"{folder / 'b.jsonl'}: no column 'problem' \(data.problem_column\), which "
                                        rf"a.jsonl has; its columns: final, question. The files of folder"):
        load_problems(cfg.data)
    (folder / "b.jsonl").write_text("".join(json.dumps({"problem": f"{i} + 2?", "answer": str(i + 2), "id": i})
                                            + "\n" for i in range(6)))  # an extra column is fine
    assert len(load_problems(cfg.data).pool) == 12


@pytest.mark.integration
def test_a_run_folder_deleted_mid_run_is_one_line_naming_it_and_nothing_is_recreated(tiny_model_dir, tmp_path,
                                                                                     capfd, caplog):
    import logging
    import shutil

    from mathgrpo.runs import RunDirError

    def delete(step, metrics):
        if step == 1:
            shutil.rmtree(tmp_path / "run")

    with caplog.at_level(logging.ERROR), pytest.raises(RunDirError) as e:
        train(_cfg(tiny_model_dir, tmp_path, **{"trainer.save_steps": 1}), quiet=True, callbacks=[delete])
    assert str(e.value).startswith(f"{tmp_path / 'run'} was deleted while the run was training (checkpoint-1 not "
                                   f"written)")
    assert not (tmp_path / "run").exists() and "resume with" not in caplog.text
    assert f"the run folder {tmp_path / 'run'} is gone, so nothing is saved" in caplog.text
    assert "Exception in thread" not in capfd.readouterr().err


def test_a_tensorboard_write_failing_in_its_thread_surfaces_once_in_the_main_thread(tmp_path, monkeypatch):
    import errno
    import time

    from tensorboard.compat.tensorflow_stub.io import gfile

    from mathgrpo.trackers import Trackers

    import threading

    printed = []  # what Python's default hook would print as a thread traceback
    monkeypatch.setattr(threading, "excepthook", printed.append)
    trackers = Trackers(["tensorboard"], tmp_path, "r", {})
    trackers.log(1, {"reward": 1.0})
    trackers.open[0].writer.flush()

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "events.out.tfevents")

    monkeypatch.setattr(gfile.LocalFileSystem, "append", full)
    with pytest.raises(OSError, match="No space left on device"):
        for step in range(2, 50):  # the thread fails on its write; a later log call raises it
            trackers.log(step, {"reward": 1.0})
            time.sleep(0.05)
    assert printed == []


@pytest.mark.integration
def test_a_run_stopped_by_a_signal_exits_143_with_a_shell_quoted_resume_command(tiny_model_dir, tmp_path, capsys,
                                                                                 monkeypatch):
    monkeypatch.setenv("MATHGRPO_TEST_SIGTERM", "1")
    out = tmp_path / "my runs ü 'x'"
    over = tiny_overrides(tiny_model_dir, out, **{
        "rewards.functions": f"[boxed, '{FIXTURES / 'faulty_rewards.py'}:sigterm_once']", "trainer.max_steps": 3})
    assert main(["train", *over, "--quiet"]) == 143  # 128 + SIGTERM: not a finished run
    captured = capsys.readouterr()
    (line,) = [x for x in captured.out.splitlines() if x.startswith("resume with: ")]
    argv = shlex.split(line.removeprefix("resume with: "))
    assert argv == ["mathgrpo", "train", str(out / "run" / "config.yaml"), "--resume", str(out / "run")]
    assert json.loads((out / "run" / "summary.json").read_text())["stopped_by"] == "SIGTERM"
    monkeypatch.delenv("MATHGRPO_TEST_SIGTERM")
    assert main(["train", *over, "--quiet", "--resume", str(out / "run")]) == 0  # finished now
    assert json.loads((out / "run" / "summary.json").read_text())["stopped_by"] is None


def test_the_trl_door_refuses_an_empty_prompt_naming_the_dataset_row(smol_tokenizer):
    from mathgrpo.trl_compat.dataset import DatasetPrompts

    rows = [{"prompt": "What is 1 + 1?"}, {"prompt": "What is 2 + 2?"}, {"prompt": "  "}]
    with pytest.raises(ValueError, match=r"train_dataset row 2: the prompt is empty \('  '\)"):
        DatasetPrompts(rows, "train_dataset", smol_tokenizer, None, None)
    chats = [[{"role": "user", "content": "1 + 1?"}], [{"role": "user", "content": ""}]]
    with pytest.raises(ValueError, match=r"eval_dataset row 1: the prompt is empty"):
        DatasetPrompts([{"prompt": c} for c in chats], "eval_dataset", smol_tokenizer, None, None)


def test_the_report_of_a_run_without_test_problems_suggests_an_eval_that_can_run(tmp_path):
    from mathgrpo.report import _eval_blocks

    (tmp_path / "data.json").write_text(json.dumps({"fingerprints": {"n_train": 40, "n_test": 0}}))
    (_, _), (_, text) = _eval_blocks(None, tmp_path)
    assert "holds out no test problems" in text and "--baseline data.test_source=PATH`" in text
    (tmp_path / "data.json").write_text(json.dumps({"fingerprints": {"n_train": 36, "n_test": 4}}))
    assert _eval_blocks(None, tmp_path)[1][1] == ("No evaluation yet: run `mathgrpo eval --adapter <run_dir> "
                                                  "--baseline`.")


def test_a_full_disk_while_logging_names_the_file(tmp_path, capsys, monkeypatch):
    import errno

    from mathgrpo.logger import RunLogger

    logger = RunLogger(tmp_path, tensorboard=False, max_steps=2, quiet=True)

    class Full:
        name = logger.metrics.name

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")  # as a file object raises it: no file name

    monkeypatch.setattr(logger, "metrics", Full())
    with pytest.raises(OSError) as e:
        logger.log(1, {"reward": 1.0}, False)
    assert e.value.filename == str(tmp_path / "metrics.jsonl") and e.value.errno == errno.ENOSPC


def test_a_reference_sync_with_lora_is_refused(tiny_model_dir, tmp_path):
    """grpo.ref_sync_steps moves a full fine-tuning reference copy; with LoRA the reference is the base model."""
    with pytest.raises(ConfigError, match=r"grpo.ref_sync_steps=2 needs full fine-tuning \(model.lora=false\)"):
        train(_cfg(tiny_model_dir, tmp_path, **{"grpo.ref_sync_steps": 2, "grpo.beta": 0.04}), quiet=True)
