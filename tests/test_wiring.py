"""Tests that fail when the update is wired wrong, not only when it crashes: each checks the trainer's numbers against
an independent computation (tests/naive_grpo.py: full logits, plain formulas, a base model loaded on its own).

Mistakes they were checked against (by breaking the code on purpose): the KL reference being the live policy, the
old log-probs dropped at num_iterations=2, no clipping, the update's log-probs at temperature 1 instead of the
sampling temperature, advantages grouped across prompts or misaligned with their rows.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import tiny_overrides
from mathgrpo import advantages as A
from mathgrpo import sampling as S
from mathgrpo import trainer as T
from mathgrpo import update as U
from mathgrpo.config import load_config
from mathgrpo.distributed import SINGLE
from mathgrpo.modelinfo import FRESH_ADAPTER
from mathgrpo.models import Reference, load_model
from mathgrpo.rollout import Completions
from naive_grpo import clipped_fraction, naive_logps, naive_loss

REWARD = str(Path(__file__).parent / "fixtures" / "user_rewards.py") + ":distinct_chars"
G, PROMPTS, WIDTH, TEMP = 4, 2, 8, 0.7
N = G * PROMPTS

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def _cfg(model_dir, out, **extra):
    opts = {"generation.temperature": TEMP, "model.lora_dropout": 0.0, "trainer.max_grad_norm": 0.0,
            "trainer.lr_scheduler": "constant", "trainer.max_tokens_per_microbatch": 40, **extra}
    return load_config(None, tiny_overrides(model_dir, out, **opts), base={})


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    """The bare base model, loaded on its own: the reference a fresh adapter's KL must be measured against."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def _rollout(seed=1):
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(10, 1000, (int(torch.randint(3, 7, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(PROMPTS)]
    lengths = torch.randint(1, WIDTH + 1, (N,), generator=gen)  # [N]
    mask = torch.arange(WIDTH)[None, :] < lengths[:, None]  # [N, T]
    ids = torch.randint(10, 1000, (N, WIDTH), generator=gen) * mask  # [N, T]
    adv = A.group_advantages(torch.randn(N, generator=gen), G)
    return Completions([p for p in prompts for _ in range(G)], ids, mask, [""] * N, lengths == WIDTH), adv


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_second_iteration_equals_a_naive_clipped_update(tiny_model_dir, base_model, tmp_path):
    """mu=2, a large learning rate: the second iteration's gradient equals the naive objective's, with the old
    log-probs of the starting weights, clipping (which it really hits), the KL to the base model and log-probs at the
    sampling temperature; its logged KL and clip ratios equal the naive ones."""
    comp, adv = _rollout()
    cfg2 = _cfg(tiny_model_dir, tmp_path, **{"grpo.num_iterations": 2, "grpo.beta": 0.04, "trainer.learning_rate": 0.05})
    cfg1 = _cfg(tiny_model_dir, tmp_path, **{"grpo.num_iterations": 1, "grpo.beta": 0.04, "trainer.learning_rate": 0.05})
    model, _ = load_model(cfg2.model, trainable=True)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        old = naive_logps(model, comp.prompt_ids, comp.completion_ids, TEMP)  # [N, T] the rollout's policy
        ref = naive_logps(base_model, comp.prompt_ids, comp.completion_ids, TEMP)

    def update(cfg):
        model.load_state_dict(start)
        opt, sched = T.make_optimizer(model, cfg)
        return T.policy_update(model, opt, sched, Reference(model, cfg.grpo.beta, True), comp, adv, cfg, SINGLE)

    update(cfg1)  # the first iteration alone: the weights the second iteration starts from
    model.zero_grad(set_to_none=True)
    logp = naive_logps(model, comp.prompt_ids, comp.completion_ids, TEMP)
    naive_loss(logp, old, ref, adv, comp.completion_mask, beta=0.04).backward()
    want = {n: p.grad.clone() for n, p in _trainable(model).items()}
    mask = comp.completion_mask
    clipped = clipped_fraction(logp.detach(), old, adv, mask)
    kl2 = ((torch.exp(ref - logp) - (ref - logp) - 1) * torch.exp(logp - old))[mask].mean().item()
    assert clipped > 0.05  # the second iteration really clips

    metrics = update(cfg2)
    got = {n: p.grad for n, p in _trainable(model).items()}
    for n in want:
        scale = want[n].abs().max().item()
        assert scale > 0 and (got[n] - want[n]).abs().max().item() < 1e-5 * scale, n  # measured: 2.8e-6
    # logged: the mean over both iterations, token-weighted; the first iteration has ratio 1, KL 0, nothing clipped
    assert metrics["clip_ratio/region"] == pytest.approx(clipped / 2, rel=1e-6)
    assert metrics["kl"] == pytest.approx(kl2 / 2, rel=1e-5)  # measured: 3e-6 (fp32, chunked vs full logits)
    assert metrics["num_tokens"] == mask.sum().item()


@pytest.mark.integration
def test_the_loop_groups_advantages_by_prompt_and_logs_the_kl_to_the_base_model(tiny_model_dir, base_model, tmp_path,
                                                                             monkeypatch):
    """Through `train`: each step's advantages are its rewards normalised within groups of rows that share a prompt,
    in row order; the logged KL, after some updates, equals a recomputation against the base model loaded apart."""
    real = U.policy_update  # the update stage calls it (update.update_stage)
    seen = []

    def spy(model, optimizer, scheduler, ref, comp, adv, cfg, world=SINGLE, **kw):
        with torch.no_grad():
            logp = naive_logps(model, comp.prompt_ids, comp.completion_ids, TEMP)
            base = naive_logps(base_model, comp.prompt_ids, comp.completion_ids, TEMP)
        d = base - logp
        kl = (torch.exp(d) - d - 1)[comp.completion_mask.bool()].mean().item()
        metrics = real(model, optimizer, scheduler, ref, comp, adv, cfg, world, **kw)
        seen.append((comp, adv.clone(), kl, metrics))
        return metrics

    monkeypatch.setattr(U, "policy_update", spy)
    cfg = _cfg(tiny_model_dir, tmp_path, **{"grpo.beta": 0.04, "trainer.learning_rate": 0.02, "trainer.max_steps": 3,
                                            "rewards.functions": f"['{REWARD}']", "trainer.log_completions_steps": 0})
    T.train(cfg, quiet=True)
    assert len(seen) == 3
    for step, (comp, adv, kl, metrics) in enumerate(seen, 1):
        for i in range(0, len(comp.prompt_ids), G):  # a group is G consecutive rows of one prompt
            assert all(comp.prompt_ids[j] == comp.prompt_ids[i] for j in range(i, i + G))
            r = [len(set(t)) / 10.0 for t in comp.texts[i:i + G]]  # the reward, from the completions
            want = [0.0] * G if len(set(r)) == 1 else \
                [(x - statistics.mean(r)) / (statistics.stdev(r) + 1e-4) for x in r]
            torch.testing.assert_close(adv[i:i + G], torch.tensor(want), atol=1e-5, rtol=1e-5)
        assert metrics["kl"] == pytest.approx(kl, rel=1e-5, abs=1e-9)  # measured: 2.5e-6
        if step == 1:
            assert kl == 0.0  # a fresh adapter: the policy is the base model
    assert seen[-1][2] > 1e-4  # later steps have moved away from it
    assert any(a.abs().sum() > 0 for _, a, _, _ in seen)


class _Ranks:
    """Stands in for a World of `size` ranks whose rows are `parts` (gather_objects concatenates in rank order)."""

    def __init__(self, rank, parts):
        self.rank, self.size, self.parts = rank, len(parts), parts

    def gather_objects(self, items):
        torch.testing.assert_close(items[0], self.parts[self.rank], equal_nan=True)
        return list(self.parts)


@pytest.mark.parametrize("scale", ["batch", "group"])
def test_rank_advantages_use_the_global_batch(scale):
    """With several ranks, scale_rewards=batch divides by the std of every rank's rewards (TRL), and an unscorable
    completion (every reward None) gets advantage 0 and stays out of its group's statistics."""
    gen = torch.Generator().manual_seed(0)
    per = [torch.rand(8, 2, generator=gen) * torch.tensor([1.0, 5.0 * r + 1]) for r in range(2)]  # rank 1 spreads more
    per[1][5] = float("nan")
    totals = [p.nan_to_num(0.0).sum(1) for p in per]
    parts = [A.unscorable_as_nan(p, t) for p, t in zip(per, totals)]
    everyone = A.group_advantages(torch.cat(parts), 4, scale)
    for r in range(2):
        got = T.rank_advantages(_Ranks(r, parts), per[r].numpy(), totals[r].numpy(), 4, scale)
        torch.testing.assert_close(got, everyone[8 * r:8 * (r + 1)])
    own = A.group_advantages(parts[0], 4, scale)
    assert (scale == "group") == torch.allclose(own, everyone[:8])  # only "batch" needs the other rank
    assert T.rank_advantages(_Ranks(1, parts), per[1].numpy(), totals[1].numpy(), 4, scale)[5] == 0.0


def test_rank_advantages_normalize_then_sum_over_the_global_batch():
    """grpo.reward_aggregation=normalize_then_sum: each rank gets its rows of GDPO's advantages over every rank's
    per-function rewards (the batch normalisation needs them all)."""
    gen = torch.Generator().manual_seed(1)
    per = [torch.rand(8, 2, generator=gen) * torch.tensor([1.0, 5.0 * r + 1]) for r in range(2)]
    weights = np.array([1.0, 0.3], dtype=np.float32)
    everyone = A.normalized_sum_advantages(torch.cat(per), torch.from_numpy(weights), 4)
    for r in range(2):
        got = T.rank_advantages(_Ranks(r, per), per[r].numpy(), per[r].sum(1).numpy(), 4, "group",
                                "normalize_then_sum", weights)
        torch.testing.assert_close(got, everyone[8 * r:8 * (r + 1)])
    assert not torch.allclose(A.normalized_sum_advantages(per[0], torch.from_numpy(weights), 4), everyone[:8])


def test_train_hands_the_reward_weights_to_normalize_then_sum(tiny_model_dir, tmp_path, monkeypatch):
    """Through `train`: with reward_aggregation=normalize_then_sum the update gets GDPO's advantages of the step's
    per-function rewards and the configured weights."""
    import mathgrpo.update as U

    calls, updates = [], []
    real = A.normalized_sum_advantages
    monkeypatch.setattr(S, "normalized_sum_advantages",
                        lambda per, w, g: calls.append((per.clone(), w.clone(), real(per, w, g))) or calls[-1][2])
    real_update = U.policy_update
    monkeypatch.setattr(U, "policy_update", lambda *a, **k: updates.append(a[5].clone()) or real_update(*a, **k))
    cfg = _cfg(tiny_model_dir, tmp_path, **{"grpo.reward_aggregation": "normalize_then_sum", "trainer.max_steps": 2,
                                            "rewards.functions": "[accuracy, format]", "rewards.weights": "[1.0, 0.25]"})
    T.train(cfg, quiet=True)
    assert len(calls) == 2 and len(updates) == 2
    for (per, w, adv), got in zip(calls, updates):
        assert per.shape[1] == 2 and w.tolist() == [1.0, 0.25]
        torch.testing.assert_close(got, adv)


def test_the_reference_of_an_adapted_model_is_its_starting_adapter(tiny_model_dir, base_model, tmp_path):
    cfg = _cfg(tiny_model_dir, tmp_path)
    model, _ = load_model(cfg.model, trainable=True)
    comp, _ = _rollout()
    logps = lambda m: naive_logps(m, comp.prompt_ids, comp.completion_ids, TEMP)  # noqa: E731
    assert Reference(model, 0.04, True).adapter is None  # fresh adapter (B = 0): switching it off is exact
    with torch.no_grad():
        for n, p in _trainable(model).items():
            p.add_(torch.randn_like(p) * 0.3)
        start = logps(model)
        assert Reference(model, 0.04, True).adapter is None  # made in this run: the base, whatever B holds (TRL)
        delattr(model, FRESH_ADAPTER)  # as a trained PeftModel handed to the front door
        ref = Reference(model, 0.04, True)
        for p in _trainable(model).values():  # training moves the adapter
            p.add_(torch.randn_like(p) * 0.3)
        live = logps(model)
        with ref.context(model) as rm:
            torch.testing.assert_close(logps(rm), start)
        torch.testing.assert_close(logps(model), live)  # the live adapter is back
        assert (live - start).abs().max() > 1e-3 and (start - logps(base_model)).abs().max() > 1e-3
