"""Partial activation checkpointing (`models.enable_checkpointing(keep_layers=N)`, config
`model.gradient_checkpointing_keep_layers`): the chosen layers are not recomputed, the rest are, and the
log-probs and gradients are those of the plain (un-checkpointed) update."""

from __future__ import annotations

import pytest
import torch
from helpers import random_lora_b

from mathgrpo.config import ModelConfig

VOCAB = 61


def _tiny_lora_model(layers: int = 4):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mathgrpo.models import add_lora

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=False,
                      attn_implementation="sdpa")
    model = add_lora(Qwen2ForCausalLM(cfg).double(), ModelConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0))
    return random_lora_b(model).train()


def _mlp_calls(model) -> list[int]:
    """Per layer, how often its MLP runs (the replay of a checkpointed layer calls it again in the backward)."""
    calls = [0] * len(model.base_model.model.model.layers)
    for i, layer in enumerate(model.base_model.model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def _grads(model):
    from mathgrpo.models import completion_logprobs

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, VOCAB, (k,), generator=g).tolist() for k in (3, 5, 2)]
    ids = torch.randint(1, VOCAB, (3, 7), generator=g)
    logp = completion_logprobs(model, prompts, ids)
    params = [p for p in model.parameters() if p.requires_grad]
    return logp.detach(), torch.autograd.grad((logp * torch.linspace(-1, 1, 7)).sum(), params)


def test_spread_picks_evenly_spaced_layers():
    from mathgrpo.models import spread

    assert spread(28, 0) == [] and spread(4, 2) == [0, 2] and spread(28, 7) == [0, 4, 8, 12, 16, 20, 24]
    assert spread(3, 5) == [0, 1, 2] and spread(5, -1) == []


@pytest.mark.parametrize("keep", [0, 2, 4])
def test_kept_layers_are_not_recomputed_and_gradients_are_unchanged(keep):
    from mathgrpo.models import enable_checkpointing

    model = _tiny_lora_model()
    want = _grads(model)  # no checkpointing
    enable_checkpointing(model, keep_layers=keep)
    calls = _mlp_calls(model)
    got = _grads(model)
    kept = {0: set(), 2: {0, 2}, 4: {0, 1, 2, 3}}[keep]
    assert calls == [1 if i in kept else 2 for i in range(4)]  # one forward, plus a replay where checkpointed
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-12)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_load_model_passes_keep_layers(monkeypatch):
    from mathgrpo import models

    tiny = _tiny_lora_model()
    monkeypatch.setattr(models, "load_base", lambda cfg, device, dtype: tiny.get_base_model())
    monkeypatch.setattr(models, "load_tokenizer", lambda cfg: None)
    monkeypatch.setattr(models, "add_lora", lambda model, cfg: tiny)
    cfg = ModelConfig(name_or_path="x", device="cpu", gradient_checkpointing=True, gradient_checkpointing_keep_layers=2)
    model, _ = models.load_model(cfg, trainable=True)
    flags = [layer.gradient_checkpointing for layer in model.base_model.model.model.layers]
    assert flags == [False, True, False, True]
