"""update_stage's memory handover to and from the rollout engine (generation.release_memory and its null default)."""

from __future__ import annotations

import pytest
import torch

from mathgrpo import metrics as M
from mathgrpo import update as U
from mathgrpo.config import Config


class _Engine:
    def __init__(self):
        self.calls = []

    def release(self, **kw):
        self.calls.append(("release", kw))

    def sync_weights(self, model):
        self.calls.append(("sync", model))


def _model(quantized: bool) -> torch.nn.Module:
    m = torch.nn.Linear(2, 2)
    if quantized:
        m.is_loaded_in_4bit = True  # what transformers sets on a bitsandbytes 4-bit model
    return m


@pytest.mark.parametrize("setting, quantized, released", [
    (None, True, True), (None, False, False), (True, False, True), (False, True, False)])
def test_update_stage_releases_the_engine_memory_as_configured(monkeypatch, setting, quantized, released):
    monkeypatch.setattr(U, "policy_update", lambda *a, **k: {"loss": 0.0})
    cfg = Config()
    cfg.generation.release_memory = setting
    model, engine = _model(quantized), _Engine()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    metrics = U.update_stage(model, opt, sched, None, None, torch.zeros(1), cfg, rollout=engine)
    # released before the update (the KV cache and the owned weight copy), synced (copies back) after it
    want = ([("release", {"weights": True})] if released else []) + [("sync", model)]
    assert engine.calls == want and U.release_memory(cfg, model) == released and metrics[M.LR] == 1e-3
