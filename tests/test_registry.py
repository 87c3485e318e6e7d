"""registry.lookup: one uniform error for every name -> function table, and the tables that use it."""

from __future__ import annotations

import pytest
import torch

from mathgrpo import distributed as D
from mathgrpo.advantages import group_advantages
from mathgrpo.loss import grpo_loss
from mathgrpo.registry import lookup
from mathgrpo.rewards import RewardError
from mathgrpo.scoring import RewardSet
from mathgrpo.trackers import TrackerError, Trackers


def test_lookup_returns_the_entry_or_names_key_name_and_choices_in_table_order():
    table = {"b": 1, "a": 2}
    assert lookup(table, "a", "k") == 2
    with pytest.raises(ValueError) as err:
        lookup(table, "c", "section.key")
    assert str(err.value) == "section.key: unknown 'c'; choose from b, a"
    with pytest.raises(KeyError, match=r"k: unknown \['x'\]; choose from b, a; or else"):  # unhashable name
        lookup(table, ["x"], "k", error=KeyError, hint="; or else")


@pytest.mark.parametrize("call, error, message", [
    (lambda: group_advantages(torch.zeros(4), 2, "nope"), ValueError,
     "group_advantages: scale_rewards: unknown 'nope'; choose from group, batch, none"),
    (lambda: grpo_loss(torch.zeros(1, 1), None, None, torch.zeros(1), torch.ones(1, 1), loss_type="ppo"),
     ValueError, "grpo_loss: loss_type: unknown 'ppo'; choose from grpo, "),
    (lambda: grpo_loss(torch.zeros(1, 1), None, None, torch.zeros(1), torch.ones(1, 1),
                       importance_sampling_level="word"),
     ValueError, "grpo_loss: importance_sampling_level: unknown 'word'; choose from token, sequence"),
    (lambda: D.SINGLE.loss_counts("ppo", 1, 1.0), ValueError, "loss_counts: loss_type: unknown 'ppo'; choose from "),
    (lambda: RewardSet([("acuracy", 1.0)]), RewardError,
     "rewards.functions: unknown 'acuracy'; choose from .*accuracy.*; or give 'package.module:function'"),
])
def test_the_registries_answer_a_typo_the_same_way(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_unknown_tracker_through_the_lookup(tmp_path):
    with pytest.raises(TrackerError, match="trainer.report_to: unknown 'neptune'; choose from tensorboard, wandb, "
                                           "mlflow, trackio"):
        Trackers(["neptune"], tmp_path, "run", {})


def test_unknown_rollout_backend_through_the_lookup():
    from types import SimpleNamespace

    from mathgrpo.rollout import make_rollout

    model = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="generation.backend: unknown 'vllm'; choose from hf, hf_unmerged, fast"):
        make_rollout(SimpleNamespace(backend="vllm"), model, None)
