"""The entropy bonus and the sampler-trainer correction against direct computations (full logits, plain formulas),
and their wiring through policy_update (the engine's log-probs in Completions.logprobs)."""

from __future__ import annotations

import dataclasses
import json

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
    sampler = old + 0.1 * torch.randn(old.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    s = mismatch_stats(old, sampler, mask)  # computed in float32, as in the update
    d = (old - sampler)[mask]
    assert s["tokens"].item() == mask.sum().item()
    assert s["abs"].item() == pytest.approx(d.abs().sum().item(), rel=1e-5)
    assert s["abs_max"].item() == pytest.approx(d.abs().max().item(), rel=1e-5)
    assert s["ratio_min"].item() == pytest.approx(d.exp().min().item(), rel=1e-5)
    assert s["dev_sq"].item() == pytest.approx(((d.exp() - 1) ** 2).sum().item(), rel=1e-5)


def _model_and_rows(model_dir, n: int, width: int, seed: int):
    """The tiny model in fp32, training mode, and n completions of `width` random tokens after one prompt."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.train()
    g = torch.Generator().manual_seed(seed)
    return model, g, [[11, 12, 13]] * n, torch.randint(20, 900, (n, width), generator=g)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("mode", ["none", "token_truncate", "sequence_mask"])
def test_policy_update_applies_the_correction_and_logs_the_mismatch(tiny_model_dir, mode):
    """policy_update with the engine's log-probs: its gradient equals grpo_loss over the rollout with the weights
    computed directly from the training forward's log-probs, and the mismatch metrics are the direct ones."""
    from mathgrpo.models import Reference, completion_logprobs
    from mathgrpo.rollout import Completions
    from mathgrpo.update import policy_update

    n, width = 6, 5
    model, g, prompts, ids = _model_and_rows(tiny_model_dir, n, width, seed=3)
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


# --- adaptive entropy control (grpo.entropy_target; TRL's use_adaptive_entropy, Skywork-OR1) ----------------------


def _trl_rule(coef, target, delta, low, high, entropies):
    """TRL 1.16's adaptive entropy control written out (grpo_trainer.py `_compute_loss`): (the coefficient applied
    at each optimizer step, the coefficient after it) for a list of window-global step entropies."""
    last, applied, after = float("inf"), [], []
    for h in entropies:
        applied.append(coef if last <= target else 0.0)
        coef = min(coef + delta, high) if h <= target else max(coef - delta, low)
        last = h
        after.append(coef)
    return applied, after


def test_adaptive_entropy_control_follows_trls_rule_with_its_bounds_and_state():
    from mathgrpo.update import EntropyControl

    entropies = [0.5, 0.4, 0.3, 0.2, 0.9, 2.0, 2.5, 3.0, 1.5, 1.0, 0.95, 1.0, 4.0, 0.1]  # clamps at both bounds
    args = (0.02, 1.0, 0.01, 0.005, 0.04)  # coef, target, delta, min, max
    want_applied, want_after = _trl_rule(*args, entropies)
    ctrl, got_applied, got_after = EntropyControl(*args), [], []
    for i, h in enumerate(entropies):
        got_applied.append(ctrl.applied())
        ctrl.observe(h * (7 + i), 7 + i)  # a token sum and its count
        got_after.append(ctrl.coef)
        if i == 5:  # a checkpoint mid-way (trainer_state.json): a fresh controller loads it and goes on alike
            ctrl, saved = EntropyControl(*args), json.loads(json.dumps(ctrl.state_dict()))
            ctrl.load_state_dict(saved)
    assert got_applied[0] == 0.0  # no measurement yet: no bonus (TRL's inf start)
    assert got_applied == pytest.approx(want_applied) and got_after == pytest.approx(want_after)
    assert 0.04 in want_after and 0.005 in want_after  # both bounds were reached
    assert any(a == 0.0 for a in want_applied[1:]) and any(a > 0.0 for a in want_applied)


def _adaptive_reference(model, prompts, ids, mask, adv, steps, temp, q, ctrl_args, lr, passes):
    """policy_update's optimizer steps written out with full logits and SGD: dapo, beta 0, the old log-probs of the
    weights before the first step, the bonus over the policy term's tokens with TRL's adaptive coefficient
    (`_trl_rule`'s arithmetic), measured over the same tokens. Returns (the applied coefficients, each step's
    entropy)."""
    full = torch.cat([torch.tensor(prompts), ids], 1)
    p_len = len(prompts[0])

    def logp_entropy(rows):  # [R, T] each
        logits = model(full[rows]).logits[:, p_len - 1:-1].float() / temp
        logp = torch.log_softmax(logits, -1)
        return logp.gather(-1, ids[rows][..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)

    with torch.no_grad():
        old = logp_entropy(list(range(len(prompts))))[0]
    token_count = float(mask.sum()) / len(steps)  # TRL: the rollout's tokens / steps per generation
    coef, target, delta, low, high = ctrl_args
    last, applied, measured = float("inf"), [], []
    for _ in range(passes):
        for rows in steps:
            logp, ent = logp_entropy(rows)
            keep = mask[rows]
            if q < 1.0:
                keep = keep & (ent.detach() >= torch.quantile(ent.detach()[keep], 1 - q))
            ratio = torch.exp(logp - old[rows])
            a = adv[rows][:, None]
            policy = (-torch.min(ratio * a, ratio.clamp(0.8, 1.2) * a) * keep).sum() / token_count
            applied.append(coef if last <= target else 0.0)
            loss = policy - applied[-1] * (ent * keep).sum() / token_count
            model.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= lr * p.grad
            last = float((ent.detach() * keep).sum() / keep.sum())
            measured.append(last)
            coef = min(coef + delta, high) if last <= target else max(coef - delta, low)
    return applied, measured


@pytest.mark.parametrize("quantile", [1.0, 0.5])
@pytest.mark.usefixtures("one_thread")
def test_policy_update_applies_the_adaptive_coefficient_of_the_previous_step(tiny_model_dir, quantile):
    """grpo.entropy_target through policy_update, 2 passes x 3 mini-batches = 6 optimizer steps in one call, each
    step in 2 micro-batches: the weights after it equal those of the steps written out with full logits and TRL's
    rule (no bonus at the first step; then coef where the previous step's entropy over the policy term's tokens,
    summed over its micro-batches, was at or below the target); the controller ends in the same state."""
    from mathgrpo.models import Reference
    from mathgrpo.rollout import Completions
    from mathgrpo.update import EntropyControl, minibatch_rows, policy_update
    from transformers import AutoModelForCausalLM

    n, width, temp, lr, passes = 6, 5, 0.1, 3e-4, 2
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(20, 900, (n, 3), generator=g).tolist()
    ids = torch.randint(20, 900, (n, width), generator=g)
    mask = torch.arange(width)[None, :] < torch.tensor([5, 2, 4, 3, 5, 1])[:, None]
    adv = torch.tensor([1.0, -0.5, 0.3, -0.8, 0.6, -0.6])
    comp = Completions(prompts, ids, mask, [""] * n, torch.zeros(n, dtype=torch.bool))
    load = lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).train()  # noqa: E731
    torch.manual_seed(7)
    steps = minibatch_rows(n, 3)  # the rows policy_update draws after the same seed

    # a target between the steps' entropies at the start, so the bonus is on at some steps and off at others
    _, start = _adaptive_reference(load(), prompts, ids, mask, adv, steps, temp, quantile, (0, 0, 0, 0, 0), 0.0, 1)
    h = sorted(start)
    lo_h, hi_h = h[:2] if h[1] - h[0] > h[2] - h[1] else h[1:]  # the wider gap
    ctrl_args = (0.4, (lo_h + hi_h) / 2, 0.3, 0.1, 0.8)  # coef, target, delta, min, max

    ref_model = load()
    applied, measured = _adaptive_reference(ref_model, prompts, ids, mask, adv, steps, temp, quantile, ctrl_args, lr,
                                            passes)
    assert applied[0] == 0.0 and any(a > 0 for a in applied) and any(a == 0 for a in applied[1:])

    model = load()
    cfg = Config()
    cfg.grpo.beta, cfg.grpo.loss_type, cfg.grpo.mini_batches, cfg.grpo.num_iterations = 0.0, "dapo", 3, passes
    cfg.grpo.top_entropy_quantile = quantile
    cfg.grpo.entropy_coef, cfg.grpo.entropy_target, cfg.grpo.entropy_coef_delta = ctrl_args[:3]
    cfg.grpo.entropy_coef_min, cfg.grpo.entropy_coef_max = ctrl_args[3:]
    cfg.generation.temperature = temp
    cfg.trainer.max_tokens_per_microbatch, cfg.trainer.max_grad_norm = 3 + width, 0.0  # one row per micro-batch
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    ctrl = EntropyControl.from_config(cfg)
    torch.manual_seed(7)
    m = policy_update(model, opt, sched, Reference(model, 0.0, lora=False), comp, adv, cfg, entropy_control=ctrl)
    moved = max((p0 - p1).abs().max().item() for p0, p1 in zip(load().parameters(), ref_model.parameters()))
    gap = max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref_model.parameters()))
    assert gap <= 1e-3 * moved  # (float32 sums in another order: ~1e-4 of the move; a wrong coefficient: > 1e-2)
    assert ctrl.last_entropy == pytest.approx(measured[-1], rel=1e-5)
    after = _trl_rule(*ctrl_args, measured)[1]
    assert ctrl.coef == pytest.approx(after[-1])
    assert m["entropy_coef"] == pytest.approx(sum(after) / len(after))  # the coefficient after each step, averaged


@pytest.mark.usefixtures("one_thread")
def test_the_reference_moves_toward_the_policy_every_ref_sync_steps(tiny_model_dir, monkeypatch):
    """grpo.ref_sync_steps (TRL's sync_ref_model), full fine-tuning: over 2 passes x 2 mini-batches (4 optimizer
    steps) with ref_sync_steps=2 the reference is mixed after steps 2 and 4 with the policy of those steps, as
    r <- alpha p + (1 - alpha) r."""
    from mathgrpo.models import Reference
    from mathgrpo.rollout import Completions
    from mathgrpo.update import policy_update

    n, width = 8, 5
    model, g, prompts, ids = _model_and_rows(tiny_model_dir, n, width, seed=5)
    mask = torch.ones(n, width, dtype=torch.bool)
    adv = torch.randn(n, generator=g)
    cfg = Config()
    cfg.model.lora = False
    cfg.grpo.beta, cfg.grpo.loss_type, cfg.grpo.mini_batches, cfg.grpo.num_iterations = 0.04, "dapo", 2, 2
    cfg.grpo.ref_sync_steps, cfg.grpo.ref_sync_alpha = 2, 0.6
    cfg.trainer.max_grad_norm = 0.0
    comp = Completions(prompts, ids, mask, [""] * n, torch.zeros(n, dtype=torch.bool))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    ref = Reference(model, cfg.grpo.beta, lora=False)
    want = [p.detach().clone() for p in ref.copy.parameters()]  # r0: the starting weights
    calls = []
    real = Reference.sync

    def spy(self, m, alpha):
        calls.append(sched.last_epoch)
        for i, p in enumerate(m.parameters()):  # r <- alpha p + (1 - alpha) r, with the policy of this step
            want[i] = alpha * p.detach() + (1 - alpha) * want[i]
        real(self, m, alpha)

    monkeypatch.setattr(Reference, "sync", spy)
    m = policy_update(model, opt, sched, ref, comp, adv, cfg)
    assert calls == [2, 4] and m["kl"] > 0
    for r, w, p in zip(ref.copy.parameters(), want, model.parameters()):
        torch.testing.assert_close(r, w, rtol=1e-6, atol=1e-7)
    moved = [not torch.allclose(r, p) for r, p in zip(ref.copy.parameters(), model.parameters())]
    assert any(moved)  # a mix, not a copy
