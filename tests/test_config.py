"""Config: defaults, YAML, dotted overrides, type checks, unknown keys, the embedded preset."""

from __future__ import annotations

import pytest
import yaml

from mathgrpo.config import ALL_PROJECTIONS, EMBEDDED, Config, ConfigError, config_reference, dump_yaml, load_config


def test_defaults_reproduce_the_notebook():
    c = Config()
    assert c.data.max_problems == 100 and c.generation.max_new_tokens == 2048 and c.grpo.num_generations == 4
    assert c.model.lora and c.trainer.prompts_per_step == 1 and c.trainer.max_steps == 80
    assert c.grpo.beta == 0.04 and c.trainer.learning_rate == 1e-5
    assert c.trainer.save_steps == 10 and c.trainer.logging_steps == 10 and c.trainer.log_completions_steps == 10
    assert c.data.test_fraction == 0.1 and c.trainer.seed == 42
    assert c.model.lora_target_modules == ALL_PROJECTIONS
    assert c.prompt.system_prompt is None and "\\boxed{}" in c.prompt.instruction


def test_nothing_means_the_embedded_preset_and_file_or_overrides_mean_defaults(tmp_path):
    assert load_config().model.name_or_path == EMBEDDED["model"]["name_or_path"]
    f = tmp_path / "c.yaml"
    f.write_text("grpo:\n  beta: 0.1\n")
    c = load_config(f)
    assert c.grpo.beta == 0.1 and c.model.name_or_path == Config().model.name_or_path
    c = load_config(None, ["model.name_or_path=DIR", "model.quantization=nf4"])  # issue 18: not the demo's settings
    assert c.generation.max_new_tokens == 2048 and c.model.lora_layers is None and c.trainer.learning_rate == 1e-5


def test_yaml_then_overrides_with_types(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("trainer:\n  max_steps: 10\nrewards:\n  functions: [format, accuracy]\n")
    c = load_config(f, ["trainer.max_steps=80", "grpo.beta=0.0", "model.lora=false", "data.answer_mod=1000",
                        "rewards.weights=[1, 2]", "generation.stop_strings=a,b", "model.quantization=null"])
    assert c.trainer.max_steps == 80 and c.grpo.beta == 0.0 and c.model.lora is False
    assert c.data.answer_mod == 1000 and c.rewards.weights == [1.0, 2.0] and c.generation.stop_strings == ["a", "b"]
    assert c.model.quantization is None


def test_override_text_with_a_colon_stays_text():
    c = load_config(None, ["prompt.instruction=For example: 3 + 4 = 7, so \\boxed{7}.", "prompt.system_prompt=a: b: c"])
    assert c.prompt.instruction == "For example: 3 + 4 = 7, so \\boxed{7}." and c.prompt.system_prompt == "a: b: c"
    assert load_config(None, ["trainer={max_steps: 3}"]).trainer.max_steps == 3  # an explicit mapping stays one


@pytest.mark.parametrize("override,message", [
    ("grpo.bogus=1", "unknown key 'grpo.bogus'; valid keys in section 'grpo': num_generations"),
    ("nosection.x=1", "unknown key 'nosection'; valid keys in the top level: model, data"),
    ("trainer.max_steps=abc", "trainer.max_steps: expected an integer"),
    ("trainer.max_steps=1.5", "trainer.max_steps: expected an integer"),
    ("grpo.beta=high", "grpo.beta: expected a number"),
    ("model.lora=maybe", "model.lora: expected true/false"),
    ("grpo.loss_type=ppo", "grpo.loss_type: 'ppo' is not one of grpo, bnpo, dr_grpo, dapo"),
    ("grpo.num_generations=1", "grpo.num_generations must be >= 2"),
    ("rewards.weights=[1, 2]", "rewards.weights has 2 values but rewards.functions has"),
    ("trainer", "must look like section.key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trainer:\n  maxsteps: 3\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml: unknown key 'trainer.maxsteps'; valid keys .*max_steps"):
        load_config(unknown)


def test_dump_round_trips(tmp_path):
    c = load_config(None, ["grpo.epsilon_high=0.28", "trainer.run_name=x"])
    f = tmp_path / "saved.yaml"
    f.write_text(dump_yaml(c))
    assert load_config(f, base={}) == c
    assert yaml.safe_load(dump_yaml(c))["grpo"]["epsilon_high"] == 0.28


def test_reference_lists_every_key():
    ref = config_reference()
    for key in ("model.lora_target_modules", "grpo.loss_type", "trainer.max_tokens_per_microbatch", "eval.num_samples"):
        assert f"`{key}`" in ref


def test_docs_config_reference_is_current():
    from pathlib import Path

    page = (Path(__file__).parent.parent / "docs" / "config.md").read_text()
    stale = [row for row in config_reference().splitlines() if row not in page]
    assert not stale, ("docs/config.md is out of date; paste `mathgrpo config reference` into it:\n"
                       + "\n".join(stale))


@pytest.mark.parametrize("override,message", [
    ("trainer.save_steps=0", "trainer.save_steps must be >= 1, got 0"),
    ("trainer.logging_steps=0", "trainer.logging_steps must be >= 1, got 0"),
    ("trainer.max_steps=0", "trainer.max_steps must be >= 1, got 0"),
    ("trainer.max_steps=-3", "trainer.max_steps must be >= 1, got -3"),
    ("trainer.learning_rate=0", "trainer.learning_rate must be > 0, got 0.0"),
    ("trainer.learning_rate=-1e-5", "trainer.learning_rate must be > 0, got -1e-05"),
    ("trainer.learning_rate=nan", "trainer.learning_rate must be a finite number, got nan"),
    ("grpo.beta=-0.1", "grpo.beta must be >= 0, got -0.1"),
    ("generation.temperature=-1", "generation.temperature must be >= 0, got -1.0"),
    ("generation.top_p=1.5", "generation.top_p must be in (0, 1], got 1.5"),
    ("generation.top_p=0", "generation.top_p must be in (0, 1], got 0.0"),
    ("model.lora_dropout=1", "model.lora_dropout must be in [0, 1), got 1.0"),
    ("trainer.adam_beta2=1.0", "trainer.adam_beta2 must be in [0, 1), got 1.0"),
    ("data.max_problems=0", "data.max_problems must be >= 1, got 0"),
    ("rewards.weights=[1, .inf, 1]", "rewards.weights must be a finite number, got [1.0, inf, 1.0]"),
])
def test_settings_out_of_range_are_caught_when_the_config_is_built(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_every_preset_passes_the_range_checks(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("{}\n")
    load_config(f)  # the dataclass defaults
    load_config()  # the embedded preset
    assert load_config(None, ["data.max_problems=null", "grpo.epsilon_high=null"]).data.max_problems is None


def test_an_empty_yaml_file_is_a_clear_error(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("\n# nothing here\n")
    with pytest.raises(ConfigError, match=r"empty.yaml: the file is empty; put `\{\}` in it"):
        load_config(f)


def test_an_override_without_equals_that_is_no_file_says_so():
    with pytest.raises(ConfigError, match=r"config file not found: trainer.max_steps \(and not an override either: "
                                          r"an override looks like section.key=value\)"):
        load_config("trainer.max_steps")


def test_every_key_has_a_doc_and_choices_come_from_the_type():
    """Each field is a `setting(default, doc)`; a Literal field's names are what the loader accepts."""
    import dataclasses
    import typing

    from mathgrpo.config import Config
    from mathgrpo.settings import choices

    root = Config()
    undocumented = [f"{s.name}.{f.name}" for s in dataclasses.fields(root)
                    for f in dataclasses.fields(getattr(root, s.name)) if not f.metadata.get("doc")]
    assert not undocumented, f"config keys without a doc (use setting(default, doc)): {undocumented}"
    hints = typing.get_type_hints(type(root.grpo))
    assert choices(hints["loss_type"]) == ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
    assert choices(typing.get_type_hints(type(root.model))["quantization"]) == (None, "nf4")
    assert choices(hints["beta"]) is None
    assert load_config(None, ["grpo.loss_type=dapo"]).grpo.loss_type == "dapo"
    assert load_config(None, ["trainer.fsdp=off"]).trainer.fsdp == "off"  # YAML's bare off is a boolean


def test_a_config_changed_in_code_is_checked_against_its_literal_type():
    from mathgrpo.config import Config, validate

    cfg = Config()
    cfg.generation.lora_merge = "sometimes"
    with pytest.raises(ConfigError, match="generation.lora_merge: 'sometimes' is not one of copy, in_place, none"):
        validate(cfg)
