"""Named presets: no arguments = demo (said), --preset picks one, a file or overrides alone start from the
documented defaults; the source of every non-default value; `mathgrpo train`'s first line."""

from __future__ import annotations

import dataclasses

import pytest

from mathgrpo.cli import main
from mathgrpo.config import EMBEDDED, Config, ConfigError, load_config
from mathgrpo.presets import DEEPSCALER_8K, PRESETS, get_preset, resolve


def _embedded_as_before() -> Config:
    """What `mathgrpo train` with no arguments ran before presets had names: the defaults with EMBEDDED merged."""
    return load_config(None, base=EMBEDDED)


def test_no_arguments_is_the_demo_preset_unchanged():
    res = resolve()
    assert res.preset == "demo" and res.config == _embedded_as_before() and res.config == load_config()
    assert res.origin().startswith("config: preset demo (")
    assert get_preset("demo").values is EMBEDDED  # one source of truth for the README's measured run


def test_overrides_or_file_alone_start_from_the_documented_defaults(tmp_path):
    res = resolve(None, None, ["model.name_or_path=DIR", "model.quantization=nf4", "data.aimo_filter=true"])
    assert res.preset is None and "no preset" in res.origin() and "3 command-line values" in res.origin()
    expected = Config()
    expected.model.name_or_path, expected.model.quantization, expected.data.aimo_filter = "DIR", "nf4", True
    assert res.config == expected  # nothing of the demo's: 2048 tokens, LoRA on every layer, lr 1e-5
    f = tmp_path / "c.yaml"
    f.write_text("grpo:\n  beta: 0.1\n")
    assert resolve(None, f).config.model.name_or_path == Config().model.name_or_path
    assert resolve("notebook").config == Config()


def test_sources_of_non_default_values(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("trainer:\n  max_steps: 12\n  learning_rate: 1.0e-4\ngrpo:\n  beta: 0.04\n")  # beta = default
    res = resolve("demo", f, ["trainer.max_steps=7", "eval={num_samples: 2}"])
    rows = {k: (v, src) for k, v, src in res.non_defaults()}
    assert rows["trainer.max_steps"] == (7, "command line")  # the last layer wins
    assert rows["eval.num_samples"] == (2, "command line")
    assert rows["trainer.learning_rate"] == (1e-4, f"file {f}")  # over the demo's 5e-4
    assert rows["model.name_or_path"] == ("smollm2", "preset demo")
    assert "grpo.beta" not in rows  # the file set it back to the default: nothing to explain
    assert set(rows) == {k for k, v, _ in res.non_defaults()}
    default = dataclasses.asdict(Config())
    mine = dataclasses.asdict(res.config)
    differing = {f"{s}.{k}" for s in mine for k in mine[s] if mine[s][k] != default[s][k]}
    assert differing == set(rows)  # every differing value is listed, nothing else
    shown = res.show()
    assert shown.startswith(f"# config: preset demo (") and f"<- file {f} <- 2 command-line values" in shown
    assert "trainer.learning_rate: 0.0001" in shown and "<- preset demo" in shown
    assert load_config(_write(tmp_path / "shown.yaml", shown), base={}) == res.config  # still a valid config


def _write(path, text):
    path.write_text(text)
    return path


def test_unknown_preset_lists_them():
    with pytest.raises(ConfigError, match=r"--preset 'nope': no such preset; the presets are: demo .*notebook"):
        resolve("nope")


def test_deepscaler_preset_is_a_valid_config_with_the_scripts_numbers():
    cfg = resolve("deepscaler-8k").config
    assert cfg.model.name_or_path == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B" and cfg.model.lora is False
    g = cfg.generation
    assert (g.max_new_tokens, g.temperature, cfg.prompt.max_prompt_tokens) == (8192, 0.6, 1024)
    assert (cfg.grpo.num_generations, cfg.grpo.beta, cfg.trainer.learning_rate) == (8, 0.001, 1e-6)
    # train_batch_size=128 prompts, ppo_mini_batch_size=64: two optimizer steps per rollout; entropy_coeff=0.001
    assert (cfg.trainer.prompts_per_step, cfg.grpo.mini_batches, cfg.grpo.entropy_coef) == (128, 2, 0.001)
    assert cfg.data.source == DEEPSCALER_8K["data"]["source"] and set(PRESETS) == {"demo", "notebook", "deepscaler-8k"}


@pytest.mark.integration
def test_train_first_line_names_the_preset(capsys, tiny_model_dir, tmp_path):
    from helpers import tiny_overrides

    over = tiny_overrides(tiny_model_dir, tmp_path, **{"trainer.max_steps": 1, "model.lora_layers": "null"})
    assert main(["train", "--preset", "demo", *over, "--quiet"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("config: preset demo (") and f"<- {len(over)} command-line values" in first
    # eval of that run, without a file or preset: the run's own config, said so
    assert main(["eval", "--adapter", str(tmp_path / "run"), "eval.max_problems=1", "eval.num_samples=1"]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[0] == (f"config: the documented defaults (no preset; --preset NAME starts from one) "
                                       f"<- file {tmp_path / 'run' / 'config.yaml'} (the adapter's run config) "
                                       f"<- 2 command-line values")
    assert "eval model" in out.err and "1/1" in out.err  # the progress bar of problems
    # the first line comes before any work: a missing model fails after it
    assert main(["train", "model.name_or_path=./no/such/model", "--quiet"]) == 2
    out = capsys.readouterr()
    assert out.out.splitlines()[0].startswith("config: the documented defaults (no preset") and "no/such" in out.err


def test_config_presets_lists_them(capsys):
    assert main(["config", "presets"]) == 0
    out = capsys.readouterr().out
    assert all(f"| `{name}` |" in out for name in PRESETS)
