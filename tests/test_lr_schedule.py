"""trainer.lr_scheduler: transformers' names and shapes (get_scheduler), the one documented difference in the warm-up,
and the TRL front door's mapping of lr_scheduler_type onto them."""

import pytest
import torch

from mathgrpo.config import ConfigError, load_config
from mathgrpo.update import make_optimizer


def _stepped(opt, sched, n: int) -> list[float]:  # the learning rate of each of n optimizer steps
    out = []
    for _ in range(n):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


@pytest.fixture(autouse=True)
def _no_loss_scaler(monkeypatch):  # the schedule alone, on a plain layer: no model to ask for its compute dtype
    monkeypatch.setattr("mathgrpo.update.make_loss_scaler", lambda model, params: None)


def _lrs(cfg, n: int) -> list[float]:
    return _stepped(*make_optimizer(torch.nn.Linear(2, 2), cfg), n)


def _transformers_lrs(name: str, warmup: int, total: int, lr: float) -> list[float]:
    from transformers import get_scheduler

    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=lr)
    return _stepped(opt, get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total), total)


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine"])
def test_schedules_match_transformers_without_warmup(name):
    cfg = load_config(None, [f"trainer.lr_scheduler={name}", "trainer.max_steps=7", "trainer.learning_rate=0.01"])
    assert _lrs(cfg, 7) == pytest.approx(_transformers_lrs(name, 0, 7, 0.01), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name", ["constant_with_warmup", "linear", "cosine"])
def test_warmup_differs_from_transformers_only_in_its_steps(name):
    """After the warm-up, transformers' shape; during it, step i at (i+1)/(w+1), never 0 (documented)."""
    w, total, lr = 3, 10, 0.01
    cfg = load_config(None, [f"trainer.lr_scheduler={name}", f"trainer.max_steps={total}",
                             f"trainer.learning_rate={lr}", f"trainer.warmup_steps={w}"])
    ours, theirs = _lrs(cfg, total), _transformers_lrs(name, w, total, lr)
    assert ours[w:] == pytest.approx(theirs[w:], rel=1e-12, abs=1e-15)
    assert ours[:w] == pytest.approx([lr * (i + 1) / (w + 1) for i in range(w)])
    assert theirs[:w] == pytest.approx([lr * i / w for i in range(w)])


def test_num_iterations_counts_optimizer_steps():
    """mu optimizer steps per rollout: the schedule runs over max_steps x mu steps (TRL's max_steps counts them)."""
    cfg = load_config(None, ["trainer.lr_scheduler=linear", "trainer.max_steps=3", "grpo.num_iterations=2",
                             "trainer.learning_rate=0.01"])
    assert _lrs(cfg, 6) == pytest.approx(_transformers_lrs("linear", 0, 6, 0.01))


def test_constant_with_warmup_steps_is_an_error():
    with pytest.raises(ConfigError, match="trainer.lr_scheduler=constant takes no warm-up.*constant_with_warmup"):
        load_config(None, ["trainer.lr_scheduler=constant", "trainer.warmup_steps=2"])


def test_trl_door_maps_scheduler_names():
    from mathgrpo import GRPOConfig

    t = GRPOConfig(lr_scheduler_type="constant_with_warmup", warmup_steps=2, max_steps=5, bf16=False).to_mathgrpo_config().trainer
    assert (t.lr_scheduler, t.warmup_steps) == ("constant_with_warmup", 2)
    with pytest.warns(UserWarning, match="'constant' has no warm-up"):
        t = GRPOConfig(lr_scheduler_type="constant", warmup_steps=2, max_steps=5, bf16=False).to_mathgrpo_config().trainer
    assert (t.lr_scheduler, t.warmup_steps) == ("constant", 0)
    t = GRPOConfig(lr_scheduler_type="cosine", warmup_steps=0.5, max_steps=4, bf16=False).to_mathgrpo_config().trainer
    assert (t.lr_scheduler, t.warmup_steps) == ("cosine", 2)
