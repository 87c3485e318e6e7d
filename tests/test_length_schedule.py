"""generation.max_new_tokens as a length curriculum: YAML and dotted-override forms, the value at each step, errors."""

from __future__ import annotations

import pytest

from mathgrpo.config import ConfigError, dump_yaml, length_schedule, load_config, max_new_tokens_at
from mathgrpo.rollout import sampling_from
from mathgrpo.trainer import at_step


def test_yaml_and_override_forms_give_the_same_schedule(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("generation:\n  max_new_tokens: {0: 8192, 100: 16384}\n")
    from_file = load_config(f)
    from_override = load_config(None, ["generation.max_new_tokens={0: 8192, 100: 16384}"], base={})
    assert from_file.generation.max_new_tokens == from_override.generation.max_new_tokens == {0: 8192, 100: 16384}
    block = "generation:\n  max_new_tokens:\n    0: 4\n    '30': 12\n    10: 8\n"  # keys in any order, quoted ok
    f.write_text(block)
    c = load_config(f)
    assert length_schedule(c.generation.max_new_tokens) == [(0, 4), (10, 8), (30, 12)]
    # the saved config (what --resume reads back) keeps the schedule
    saved = tmp_path / "saved.yaml"
    saved.write_text(dump_yaml(c))
    assert load_config(saved).generation.max_new_tokens == {0: 4, 10: 8, 30: 12}


def test_value_at_each_step_is_the_last_entry_at_or_before_it():
    sched = {0: 8192, 100: 16384, 250: 24576}
    want = {1: 8192, 99: 8192, 100: 16384, 249: 16384, 250: 24576, 10**6: 24576}
    assert {s: max_new_tokens_at(sched, s) for s in want} == want
    assert max_new_tokens_at(sched, None) == 24576 and max_new_tokens_at(512, 7) == 512
    assert max_new_tokens_at({1: 5, 3: 9}, 0) == 5  # a schedule from step 1 covers every step
    cfg = load_config(None, ["generation.max_new_tokens={0: 6, 3: 10}"], base={})
    assert [at_step(cfg, s).generation.max_new_tokens for s in (1, 2, 3, 4)] == [6, 6, 10, 10]
    assert cfg.generation.max_new_tokens == {0: 6, 3: 10}  # at_step copies
    assert sampling_from(cfg.generation).max_new_tokens == 10  # outside training: the last value
    assert sampling_from(at_step(cfg, 1).generation).max_new_tokens == 6


@pytest.mark.parametrize("value,match", [("{5: 100}", "must start at step 0"), ("{0: 0, 3: 8}", "must be >= 1"),
                                         ("{}", "empty schedule"), ("{0: lots}", "expected int"),
                                         ("[8, 16]", "expected int")])
def test_bad_schedules_name_the_key(value, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, [f"generation.max_new_tokens={value}"], base={})
    assert "generation.max_new_tokens" in str(e.value)
