"""fp16 end to end where a GPU has no bf16 (compute capability < 8: T4, V100, P100): the update under fp16 autocast
with LoRA weights and Adam state in fp32 and a loss scaler (update.make_loss_scaler), against the fp32 update.
Runs on CPU (torch's CPU autocast takes float16); the same code path runs on a GPU."""

from __future__ import annotations

import pytest
import torch
from helpers import random_lora_b

from mathgrpo import metrics as M
from mathgrpo.config import Config, ModelConfig
from mathgrpo.update import loss_scaler, make_optimizer, policy_update
from test_packing import VOCAB, _completions

# fp16 rounds at ~5e-4 relative (10-bit mantissa) in every matmul and attention; on this model the fp16 update's loss
# is within 7e-5 of the fp32 one and its LoRA gradients within 6.3e-3 (relative norm, the worst tensor): the bounds
# leave about 3x room
LOSS_RTOL, GRAD_RTOL = 1e-3, 2e-2


def _model(base_dtype: torch.dtype, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mathgrpo.models import add_lora

    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=False,
                      attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg).to(base_dtype)
    return add_lora(model, ModelConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0)).train()


def _cfg() -> Config:
    cfg = Config()
    cfg.grpo.beta, cfg.grpo.num_generations = 0.5, 3
    cfg.generation.max_new_tokens = 11
    cfg.trainer.max_grad_norm = 0.0  # no clipping: the raw gradients are compared
    cfg.trainer.learning_rate = 1e-3
    cfg.trainer.logprob_chunk_size = 4
    return cfg


def _update(model, cfg, hook=None):
    from mathgrpo.advantages import group_advantages
    from mathgrpo.models import Reference

    ref = Reference(model, cfg.grpo.beta, lora=True)  # the adapters off: the KL term depends on the weights
    torch.manual_seed(1)
    random_lora_b(model, std=0.2)
    opt, sched = make_optimizer(model, cfg)
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0, 0.3]), 3)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    before = [p.detach().clone() for _, p in trainable]
    handle = trainable[0][1].register_hook(hook) if hook else None
    m = policy_update(model, opt, sched, ref, _completions(), adv, cfg)
    if handle:
        handle.remove()
    return m, opt, [p.grad.clone() for _, p in trainable], before, [p for _, p in trainable]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_fp16_update_matches_fp32():
    """Same LoRA init over an fp32 and an fp16 copy of the base: the fp16 update (autocast fp16, scaled loss) gives
    the fp32 update's loss within LOSS_RTOL and every LoRA gradient within GRAD_RTOL (relative norm); its adapters
    and Adam state stay fp32."""
    cfg = _cfg()
    m32, opt32, g32, _, _ = _update(_model(torch.float32), cfg)
    model16 = _model(torch.float16)
    m16, opt16, g16, _, params = _update(model16, cfg)
    assert loss_scaler(opt32) is None and loss_scaler(opt16) is not None
    assert M.SKIPPED_STEPS not in m32 and m16[M.SKIPPED_STEPS] == 0 and m16[M.LOSS_SCALE] == 65536.0
    assert abs(m16[M.LOSS] - m32[M.LOSS]) <= LOSS_RTOL * abs(m32[M.LOSS]), (m16[M.LOSS], m32[M.LOSS])
    # the gradient norm is taken on the unscaled gradients (clipping sees the true norm)
    assert abs(m16[M.GRAD_NORM] - m32[M.GRAD_NORM]) <= GRAD_RTOL * m32[M.GRAD_NORM], (m16[M.GRAD_NORM], m32[M.GRAD_NORM])
    errs = [_rel(a, b) for a, b in zip(g16, g32)]
    assert max(errs) < GRAD_RTOL, max(errs)
    assert all(p.dtype == torch.float32 for p in params)
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt16.state.values())
    assert {p.dtype for n, p in model16.named_parameters() if not p.requires_grad} == {torch.float16}


def test_an_inf_gradient_skips_the_step_and_halves_the_scale():
    """An inf in one gradient (injected by a hook) makes the scaler skip the optimizer step: no weight moves, the
    step is counted in metrics.SKIPPED_STEPS and the scale halves; the next update steps again."""
    model, cfg = _model(torch.float16), _cfg()
    m, opt, _, before, params = _update(model, cfg, hook=lambda g: g * float("inf"))
    assert m[M.SKIPPED_STEPS] == 1 and m[M.LOSS_SCALE] == 32768.0
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    m2, _, _, before2, params2 = _update(model, cfg)
    assert m2[M.SKIPPED_STEPS] == 0 and not all(torch.equal(p, b) for p, b in zip(params2, before2))


def test_full_fine_tuning_of_an_fp16_model_is_refused():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=64, vocab_size=VOCAB)).half()
    with pytest.raises(ValueError, match="trainable parameters are float16.*model.dtype=float32"):
        make_optimizer(model, _cfg())
