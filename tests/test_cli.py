"""The command line: config show, data inspect, clear errors with exit code 2."""

from __future__ import annotations

import pytest

from mathgrpo.cli import main


def test_config_show_prints_resolved_yaml(capsys):
    assert main(["config", "show", "--preset", "demo", "trainer.max_steps=7"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "name_or_path: smollm2" in out
    assert out.startswith("# config: preset demo (")
    assert "#   trainer.max_steps: 7" in out and "<- command line" in out
    assert "#   model.name_or_path: 'smollm2'" in out and "<- preset demo" in out
    # overrides without --preset start from the documented defaults, not the demo
    assert main(["config", "show", "trainer.max_steps=7"]) == 0
    out = capsys.readouterr().out
    assert "name_or_path: deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B" in out and "no preset" in out.splitlines()[0]


def test_unknown_key_is_a_clean_error(capsys):
    assert main(["config", "show", "trainer.maxsteps=7"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'trainer.maxsteps'" in err and "max_steps" in err and "Traceback" not in err


def test_data_inspect_arithmetic(capsys):
    assert main(["data", "inspect", "arithmetic", "data.arithmetic_size=20"]) == 0
    out = capsys.readouterr().out
    assert "kept 20 of 20" in out


def test_data_inspect_missing_file_names_it(capsys, tmp_path):
    missing = tmp_path / "nope.parquet"
    assert main(["data", "inspect", str(missing)]) == 2
    assert "nope.parquet" in capsys.readouterr().err


def test_train_with_bad_lora_target_lists_layers(capsys, tiny_model_dir, tmp_path):
    from helpers import tiny_overrides

    rc = main(["train", *tiny_overrides(tiny_model_dir, tmp_path, **{"model.lora_target_modules": "[dense]"}), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "dense" in err and "q_proj" in err and "down_proj" in err


def test_nf4_on_cpu_is_a_clear_error(capsys, tiny_model_dir, tmp_path):
    from helpers import tiny_overrides

    rc = main(["train", *tiny_overrides(tiny_model_dir, tmp_path, **{"model.quantization": "nf4"}), "--quiet"])
    assert rc == 2 and "needs a CUDA GPU" in capsys.readouterr().err


def test_an_override_without_equals_is_no_file_path(capsys):
    assert main(["config", "show", "trainer.max_steps"]) == 2
    err = capsys.readouterr().err
    assert "config file not found: trainer.max_steps (and not an override either" in err and "Traceback" not in err


def test_a_bad_setting_fails_before_any_work(capsys, tmp_path):
    assert main(["train", f"trainer.output_dir={tmp_path / 'runs'}", "trainer.save_steps=0", "--quiet"]) == 2
    assert "trainer.save_steps must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_resume_changing_reaches_the_config(monkeypatch):
    import mathgrpo.trainer

    seen = {}
    monkeypatch.setattr(mathgrpo.trainer, "train", lambda cfg, quiet: seen.setdefault("cfg", cfg))
    assert main(["train", "--resume", "runs/x", "--resume-changing", "trainer.max_steps,trainer.save_steps",
                 "--resume-changing", "eval.num_samples"]) == 0
    t = seen["cfg"].trainer
    assert t.resume == "runs/x" and t.resume_changing == ["trainer.max_steps", "trainer.save_steps", "eval.num_samples"]
