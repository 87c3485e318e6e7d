"""The entropy bonus and the sampler-trainer correction against direct computations (full logits, plain formulas),
and their wiring through policy_update (the engine's log-probs in Completions.logprobs)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mathgrpo.config import Config
from mathgrpo.correction import mismatch_stats, sampler_weights
from mathgrpo.logprobs import chunked_token_logprobs
from mathgrpo.loss import LossParams, grpo_loss, high_entropy_mask


def _head(seed=0, n=3, t=5, h=8, v=50):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, t, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    ids = torch.randint(0, v, (n, t), generator=g)
    return hidden, weight, ids


@pytest.mark.parametrize("chunk", [2, 64])
def test_entropy_gradient_of_the_chunked_pass_equals_full_logits(chunk):
    hidden, weight, ids = _head()
    u, w = torch.randn(ids.shape, dtype=torch.float64), torch.randn(ids.shape, dtype=torch.float64)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = chunked_token_logprobs(h1, w1, ids, chunk_size=chunk, temperature=0.7, with_entropy="grad")
    ((logp * u).sum() + (ent * w).sum()).backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    full = torch.log_softmax(h2 @ w2.t() / 0.7, -1)  # [B, T, V]
    want_logp = full.gather(-1, ids[..., None])[..., 0]
    want_ent = -(full.exp() * full).sum(-1)
    ((want_logp * u).sum() + (want_ent * w).sum()).backward()
    torch.testing.assert_close(ent, want_ent)
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)
    _, plain = chunked_token_logprobs(hidden, weight, ids, chunk_size=chunk, with_entropy=True)
    assert not plain.requires_grad  # the logged entropy stays out of the graph


def _batch(seed=0, n=4, t=6):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    old = logp - (torch.rand(n, t, generator=g, dtype=torch.float64) - 0.5)
    adv = torch.tensor([1.3, -0.7, 0.4, -1.1], dtype=torch.float64)[:n]
    mask = torch.arange(t)[None, :] < torch.tensor([6, 3, 5, 1])[:n, None]
    ent = torch.rand(n, t, generator=g, dtype=torch.float64) * 4
    return logp, old, adv, mask, ent


@pytest.mark.parametrize("quantile", [1.0, 0.5])
def test_entropy_bonus_is_the_token_mean_entropy_of_the_policy_term_tokens(quantile):
    logp, old, adv, mask, ent = _batch()
    p = LossParams(loss_type="dapo", beta=0.0, top_entropy_quantile=quantile)
    base, _ = grpo_loss(logp, old, None, adv, mask, p, entropy=ent)
    e = ent.clone().requires_grad_()
    loss, _ = grpo_loss(logp, old, None, adv, mask, dataclasses.replace(p, entropy_coef=0.01), entropy=e,
                        token_count=40.0)
    kept = mask & high_entropy_mask(ent, mask, quantile)
    base40, _ = grpo_loss(logp, old, None, adv, mask, p, entropy=ent, token_count=40.0)
    want = base40 - 0.01 * (ent * kept).sum() / 40.0
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    loss.backward()
    torch.testing.assert_close(e.grad, -0.01 * kept.double() / 40.0, rtol=1e-6, atol=1e-9)  # pushes entropy up
    assert base.item() != loss.item()
    with pytest.raises(ValueError, match="entropy_coef=0.01 needs the entropy with its gradient"):
        grpo_loss(logp, old, None, adv, mask, dataclasses.replace(p, entropy_coef=0.01), entropy=ent)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_sampler_weights_are_trls_vllm_correction(mode):
    logp, old, adv, mask, _ = _batch(1)
    sampler = old - torch.tensor([[1.5, -0.2, 0.0, 0.3, -2.0, 0.1]] * 4, dtype=torch.float64)  # ratios 0.13 .. 4.5
    got = sampler_weights(old, sampler, mask.double(), mode, cap=3.0, floor=0.2)
    diff = (old - sampler) * mask
    ratio = diff.exp() if mode.startswith("token") else diff.sum(-1, keepdim=True).exp()
    if mode.endswith("truncate"):
        want = ratio.clamp(0.2, 3.0)
    else:
        want = torch.where((ratio < 0.2) | (ratio > 3.0), torch.zeros_like(ratio), ratio)
    torch.testing.assert_close(got, want)
    assert sampler_weights(old, sampler, mask.double(), "none") is None
    with pytest.raises(ValueError, match="sampler_weights: mode: unknown 'vllm'"):
        sampler_weights(old, sampler, mask.double(), "vllm")
    # the weight multiplies the policy term, not the KL term
    ref = logp - 0.3
    w = sampler_weights(old, sampler, mask.double(), mode, cap=3.0, floor=0.2)
    p = LossParams(loss_type="grpo", beta=0.0)
    x = logp.clone().requires_grad_()
    got_loss, _ = grpo_loss(x, old, None, adv, mask, p, sampling_weight=w)
    y = logp.clone().requires_grad_()
    ratio_pg = torch.exp((y - old) * mask)
    term = -torch.min(ratio_pg * adv[:, None], ratio_pg.clamp(0.8, 1.2) * adv[:, None]) * w * mask
    want_loss = (term.sum(-1) / mask.sum(-1)).mean()
    assert got_loss.item() == pytest.approx(want_loss.item(), abs=1e-6)
    kl_only = grpo_loss(logp, old, ref, torch.zeros(4, dtype=torch.float64), mask, LossParams(beta=0.1),
                        sampling_weight=w)[0]
    assert kl_only.item() == pytest.approx(grpo_loss(logp, old, ref, torch.zeros(4, dtype=torch.float64), mask,
                                                     LossParams(beta=0.1))[0].item(), abs=1e-6)


def test_mismatch_stats_are_token_sums_under_the_mask():
    logp, old, _, mask, _ = _batch(2)
    sampler = old + 0.1 * torch.randn(old.shape, dtype=torch.float64)
    s = mismatch_stats(old, sampler, mask)
    d = (old - sampler)[mask]
    assert s["tokens"].item() == mask.sum().item()
    assert s["abs"].item() == pytest.approx(d.abs().sum().item())
    assert s["abs_max"].item() == pytest.approx(d.abs().max().item())
    assert s["ratio_min"].item() == pytest.approx(d.exp().min().item())
    assert s["dev_sq"].item() == pytest.approx(((d.exp() - 1) ** 2).sum().item())


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("mode", ["none", "token_truncate", "sequence_mask"])
def test_policy_update_applies_the_correction_and_logs_the_mismatch(tiny_model_dir, mode):
    """policy_update with the engine's log-probs: its gradient equals grpo_loss over the rollout with the weights
    computed directly from the training forward's log-probs, and the mismatch metrics are the direct ones."""
    from mathgrpo.models import Reference, completion_logprobs
    from mathgrpo.rollout import Completions
    from mathgrpo.update import policy_update
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    model.train()
    n, width = 6, 5
    g = torch.Generator().manual_seed(3)
    prompts = [[11, 12, 13]] * n
    ids = torch.randint(20, 900, (n, width), generator=g)
    mask = torch.arange(width)[None, :] < torch.tensor([5, 2, 4, 5, 1, 3])[:, None]
    adv = torch.tensor([1.0, -0.5, 0.3, -1.2, 0.8, -0.4])
    with torch.no_grad():
        logp = completion_logprobs(model, prompts, ids)
    noise = torch.tensor([0.0, 1.5, -1.4, 0.05, 0.0, -0.02])[:, None] + 0.01 * torch.randn(n, width, generator=g)
    engine = (logp - noise).masked_fill(~mask, 0.0)  # rows 1 and 2 far off: the cap and the mask act
    cfg = Config()
    cfg.grpo.beta, cfg.grpo.loss_type, cfg.grpo.sampler_correction = 0.0, "dapo", mode
    cfg.trainer.max_tokens_per_microbatch, cfg.trainer.max_grad_norm = 2 * (3 + width), 0.0
    comp = Completions(prompts, ids, mask, [""] * n, torch.zeros(n, dtype=torch.bool), logprobs=engine)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    m = policy_update(model, opt, sched, Reference(model, 0.0, lora=False), comp, adv, cfg)
    got = [p.grad.clone() for p in model.parameters()]

    model.zero_grad(set_to_none=True)
    x = completion_logprobs(model, prompts, ids)
    w = sampler_weights(x.detach(), engine, mask.float(), mode, 3.0, None)
    loss, _ = grpo_loss(x, None, None, adv, mask, LossParams(loss_type="dapo", beta=0.0), sampling_weight=w)
    loss.backward()
    for a, b in zip(got, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert m["loss"] == pytest.approx(loss.item(), rel=1e-5)
    d = (logp - engine)[mask]
    assert m["sampler/logp_diff"] == pytest.approx(d.abs().mean().item(), rel=1e-4)
    assert m["sampler/ratio_max"] == pytest.approx(d.exp().max().item(), rel=1e-4)
    assert m["sampler/ratio_min"] == pytest.approx(d.exp().min().item(), rel=1e-4)
    assert m["sampler/ratio_std"] == pytest.approx(d.exp().std(unbiased=False).item(), rel=1e-3)
    assert m["sampler/ratio_mean"] == pytest.approx(d.exp().mean().item(), rel=1e-5)
    if mode != "none":  # the weights change the gradient
        plain, _ = grpo_loss(x.detach().requires_grad_(), None, None, adv, mask, LossParams(loss_type="dapo", beta=0))
        assert abs(plain.item() - loss.item()) > 1e-3


@pytest.mark.usefixtures("one_thread")
def test_policy_update_adds_the_entropy_bonus_gradient_of_the_full_logits(tiny_model_dir):
    """grpo.entropy_coef through policy_update (micro-batches, the chunked pass's entropy gradient): the gradient
    moves by exactly -coef x the gradient of the step's token-mean entropy, computed here from full logits."""
    from mathgrpo.models import Reference
    from mathgrpo.rollout import Completions
    from mathgrpo.update import policy_update
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    model.train()
    n, width, temp = 4, 5, 0.8
    g = torch.Generator().manual_seed(5)
    prompts = [[11, 12, 13]] * n
    ids = torch.randint(20, 900, (n, width), generator=g)
    mask = torch.arange(width)[None, :] < torch.tensor([5, 2, 4, 3])[:, None]
    adv = torch.tensor([1.0, -0.5, 0.3, -0.8])
    comp = Completions(prompts, ids, mask, [""] * n, torch.zeros(n, dtype=torch.bool))

    def grads(coef: float) -> list[torch.Tensor]:
        cfg = Config()
        cfg.grpo.beta, cfg.grpo.loss_type, cfg.grpo.entropy_coef = 0.0, "grpo", coef
        cfg.generation.temperature = temp
        cfg.trainer.max_tokens_per_microbatch, cfg.trainer.max_grad_norm = 2 * (3 + width), 0.0
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
        policy_update(model, opt, sched, Reference(model, 0.0, lora=False), comp, adv, cfg)
        return [p.grad.clone() for p in model.parameters()]

    plain, bonus = grads(0.0), grads(0.05)
    model.zero_grad(set_to_none=True)
    full = torch.cat([torch.tensor(prompts), ids], 1)
    logits = model(full).logits[:, 2:-1].float() / temp  # [N, T, V]: the positions predicting the completion
    logp = torch.log_softmax(logits, -1)
    ent = -(logp.exp() * logp).sum(-1)  # [N, T]
    ((ent * mask).sum() / mask.sum()).backward()
    for a, b, p in zip(plain, bonus, model.parameters()):  # b - a cancels in float32: compare to each tensor's scale
        want = -0.05 * p.grad
        scale = max(a.abs().max().item(), want.abs().max().item())
        assert (b - a - want).abs().max().item() <= 1e-5 * scale
    assert max((b - a).abs().max().item() for a, b in zip(plain, bonus)) > 1e-6
