"""Tests for mathgrpo.loss against plain reference implementations (python loops, naive full logits)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from mathgrpo.advantages import (ADVANTAGE_SCALINGS, group_advantages, normalized_sum_advantages, unscorable_as_nan,
                                 zero_std_fraction)
from mathgrpo.logprobs import chunked_token_logprobs
from mathgrpo.loss import (
    LOSS_TYPES,
    LossParams,
    bnpo_row_norms,
    effective_mask,
    grpo_loss,
    kl_k3,
    token_means,
)

LOSS_TYPE_NAMES = sorted(LOSS_TYPES)

# ----------------------------------------------------------------------------- advantages


def ref_advantages(rewards: list[float], g: int, scale: str, eps: float) -> list[float]:
    out = []
    batch_std = statistics.stdev([r for r in rewards if not math.isnan(r)])
    for p in range(len(rewards) // g):
        grp = rewards[p * g : (p + 1) * g]
        scored = [r for r in grp if not math.isnan(r)]  # an unscorable completion (NaN) joins no statistic
        mu = statistics.mean(scored)
        for r in grp:
            if math.isnan(r):
                out.append(0.0)
            elif scale == "group":
                out.append((r - mu) / (statistics.stdev(scored) + eps))
            elif scale == "batch":
                out.append((r - mu) / (batch_std + eps))
            else:
                out.append(r - mu)
    return out


@pytest.mark.parametrize("scale", sorted(ADVANTAGE_SCALINGS))
def test_group_advantages_match_reference(scale):
    torch.manual_seed(0)
    rewards = torch.randint(0, 3, (12,)).float() + torch.rand(12) * (torch.rand(12) > 0.5)
    rewards[4:8] = 1.0  # a flat group: zero advantage, no division blow-up
    rewards[9] = float("nan")  # every reward returned None for this completion
    got = group_advantages(rewards, 4, scale_rewards=scale, eps=1e-4)
    want = ref_advantages(rewards.tolist(), 4, scale, 1e-4)
    assert got.shape == (12,)
    torch.testing.assert_close(got, torch.tensor(want), atol=2e-7, rtol=2e-7)
    assert torch.all(got[4:8] == 0) and got[9] == 0


def test_unscorable_completion_is_left_out_as_trl_does():
    # TRL 1.16 on rewards [1, 0, None, 1]: [0.577, -1.155, 0, 0.577] (the None row in no statistic)
    per = torch.tensor([[1.0], [0.0], [float("nan")], [1.0]])
    total = torch.nan_to_num(per.sum(1), nan=0.0)  # RewardSet's nansum gives the None row 0
    adv = group_advantages(unscorable_as_nan(per, total), 4)
    sd = statistics.stdev([1.0, 0.0, 1.0]) + 1e-4
    torch.testing.assert_close(adv, torch.tensor([1 / 3 / sd, -2 / 3 / sd, 0.0, 1 / 3 / sd]), atol=1e-7, rtol=1e-6)
    wrong = group_advantages(total, 4)  # the None row counted as 0 shifts every advantage of its group
    assert (wrong - adv).abs().max() > 0.1


def ref_normalized_sum(per: list[list[float]], weights: list[float], g: int, eps: float) -> list[float]:
    """TRL 1.16's normalize_then_sum, written out: per function and group (r - mean) / (stdev + eps) over the scored
    values (a group with < 2 of them: NaN, which the weighted sum skips), the weighted sum, then over the batch."""
    n, r = len(per), len(weights)
    z = [[float("nan")] * r for _ in range(n)]
    for p in range(n // g):
        for k in range(r):
            col = [per[i][k] for i in range(p * g, (p + 1) * g)]
            scored = [x for x in col if not math.isnan(x)]
            for j, x in enumerate(col):
                if not math.isnan(x) and len(scored) > 1:
                    z[p * g + j][k] = (x - statistics.mean(scored)) / (statistics.stdev(scored) + eps)
    total = [sum(w * v for w, v in zip(weights, row) if not math.isnan(v)) for row in z]
    scorable = [i for i in range(n) if not all(math.isnan(x) for x in per[i])]
    mu, sd = statistics.mean(total[i] for i in scorable), statistics.stdev(total[i] for i in scorable)
    return [(total[i] - mu) / (sd + eps) if i in scorable else 0.0 for i in range(n)]


def test_normalized_sum_advantages_match_trls_formula():
    """GDPO (normalize_then_sum): a 0/1 accuracy next to a dense reward of 50x the scale keeps its weight, unlike
    the plain weighted sum; None rewards and an unscorable row as TRL treats them."""
    gen = torch.Generator().manual_seed(4)
    per = torch.stack([torch.randint(0, 2, (12,), generator=gen).float(),
                       torch.rand(12, generator=gen) * 50], 1)  # [N, 2]: accuracy 0/1, a dense reward
    per[3, 1] = float("nan")  # one function returned None
    per[9] = float("nan")  # every function returned None: unscorable
    per[4:8, 0] = 1.0  # a group where the accuracy is flat: only the dense reward moves it
    weights = torch.tensor([1.0, 0.5])
    got = normalized_sum_advantages(per, weights, 4)
    want = ref_normalized_sum(per.tolist(), weights.tolist(), 4, 1e-4)
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-5, rtol=1e-5)
    assert got[9] == 0
    summed = group_advantages(unscorable_as_nan(per, (per * weights).nansum(1)), 4)
    acc = per[:, 0].nan_to_num(0).reshape(3, 4)
    acc = (acc - acc.mean(1, keepdim=True)).reshape(-1)  # [N] the accuracy within its group

    def corr(a, b):
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()

    assert corr(got, acc) > 0.7 and corr(summed, acc) < 0.0  # measured: 0.77 and -0.35: the sum drowns accuracy
    with pytest.raises(ValueError, match="one column per weight"):
        normalized_sum_advantages(per, torch.ones(3), 4)


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(8), 4, scale_rewards="nope")
    with pytest.raises(ValueError, match="rows \\[2\\]"):
        group_advantages(torch.tensor([0.0, 1.0, float("inf"), 1.0]), 2)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 1)


def test_zero_std_fraction():
    rewards = torch.tensor([1.0, 1, 1, 0, 1, 0, 2, 2, 2])
    groups = [rewards[i : i + 3].tolist() for i in range(0, 9, 3)]
    want = sum(len(set(g)) == 1 for g in groups) / len(groups)
    assert zero_std_fraction(rewards, 3) == pytest.approx(want)
    rewards[3] = float("nan")  # the group [nan, 1, 0] still varies; [nan, 1, 1] would not
    assert zero_std_fraction(rewards, 3) == pytest.approx(want)
    rewards[5] = 1.0
    assert zero_std_fraction(rewards, 3) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- log-probs


def naive_token_logprobs(hidden, weight, ids, temperature=1.0, bias=None):
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, ids[..., None]).squeeze(-1)


@pytest.mark.parametrize("chunk", [1, 7, 1024])
@pytest.mark.parametrize("use_bias", [False, True])
def test_chunked_logprobs_match_naive(chunk, use_bias):
    torch.manual_seed(chunk)
    B, T, H, V, temp = 3, 37, 16, 101, 0.7
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    bias = torch.randn(V, requires_grad=True) if use_bias else None
    ids = torch.randint(0, V, (B, T))
    upstream = torch.randn(B, T)

    got = chunked_token_logprobs(hidden, weight, ids, chunk_size=chunk, temperature=temp, lm_head_bias=bias)
    (got * upstream).sum().backward()
    grads = [hidden.grad.clone(), weight.grad.clone()] + ([bias.grad.clone()] if use_bias else [])
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    want = naive_token_logprobs(hidden, weight, ids, temp, bias)
    (want * upstream).sum().backward()
    grads_ref = [hidden.grad, weight.grad] + ([bias.grad] if use_bias else [])

    assert got.shape == (B, T) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, grads_ref):
        assert torch.allclose(g, r, atol=1e-5, rtol=1e-5)


def test_chunked_logprobs_frozen_head_and_gradcheck():
    torch.manual_seed(1)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(11, 8)  # frozen lm_head (LoRA)
    ids = torch.randint(0, 11, (2, 5))
    chunked_token_logprobs(hidden, weight, ids, chunk_size=3).sum().backward()
    assert weight.grad is None
    g = hidden.grad.clone()
    hidden.grad = None
    naive_token_logprobs(hidden, weight, ids).sum().backward()
    assert torch.allclose(g, hidden.grad, atol=1e-5)

    args = [torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True),
            torch.randn(7, 4, dtype=torch.float64, requires_grad=True)]
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 7, (2, 3))
    assert torch.autograd.gradcheck(
        lambda h, w, b: chunked_token_logprobs(h, w, ids, chunk_size=2, temperature=0.7, lm_head_bias=b),
        (*args, bias),
    )


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_chunked_logprobs_bf16_close_to_fp32(weight_dtype):
    torch.manual_seed(2)
    hidden = torch.randn(3, 37, 16)
    weight = torch.randn(101, 16) / 4
    ids = torch.randint(0, 101, (3, 37))
    want = naive_token_logprobs(hidden, weight, ids)
    h16 = hidden.bfloat16().requires_grad_()
    got = chunked_token_logprobs(h16, weight.to(weight_dtype), ids, chunk_size=7)
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 0.05
    got.sum().backward()
    assert h16.grad.dtype == torch.bfloat16
    hidden.requires_grad_()
    naive_token_logprobs(hidden, weight, ids).sum().backward()
    assert (h16.grad.float() - hidden.grad).abs().max() < 0.05


def test_chunked_logprobs_bad_input():
    with pytest.raises(ValueError, match="ids outside"):
        chunked_token_logprobs(torch.randn(1, 2, 4), torch.randn(5, 4), torch.tensor([[0, -100]]))
    with pytest.raises(ValueError, match="do not fit"):
        chunked_token_logprobs(torch.randn(1, 2, 4), torch.randn(5, 3), torch.tensor([[0, 1]]))


# ----------------------------------------------------------------------------- loss


def test_kl_k3_reference_and_nonnegative():
    torch.manual_seed(0)
    logp, ref = -torch.rand(4, 6) * 5, -torch.rand(4, 6) * 5
    got = kl_k3(logp, ref)
    for i in range(4):
        for t in range(6):
            d = ref[i, t].item() - logp[i, t].item()
            assert got[i, t].item() == pytest.approx(math.exp(d) - d - 1, abs=1e-5)
    assert (got >= 0).all()


def ref_grpo_loss(logp, old, ref, adv, mask, loss_type, eps_low, eps_high, beta, max_len,
                  seq_count=None, token_count=None, bias_correction=True, tau=(1.0, 1.05)):
    """Loops over rows and tokens; each loss type's objective written out case by case (TRL 1.16's formulas)."""
    n, t_len = mask.shape
    row_sums, row_lens = [], []
    for i in range(n):
        a = float(adv[i])
        row, k = logp.new_zeros(()), 0
        for t in range(t_len):
            if not mask[i][t]:
                continue
            r = torch.exp(logp[i, t] - old[i, t])
            if loss_type == "cispo":  # stop-gradient weight min(r, eps_high) on log p
                obj = min(r.item(), eps_high) * a * logp[i, t]
            elif loss_type == "sapo":  # a sigmoid gate around r = 1, temperature by the advantage's sign
                tp = tau[0] if a > 0 else tau[1]
                obj = torch.sigmoid(tp * (r - 1)) * 4 / tp * a
            elif a > 0:
                obj = r * a if r.item() <= 1 + eps_high else torch.tensor((1 + eps_high) * a)
            elif a < 0:
                obj = r * a if r.item() >= 1 - eps_low else torch.tensor((1 - eps_low) * a)
            else:
                obj = r * 0.0
            term = -obj
            if beta:
                d = ref[i, t] - logp[i, t]
                term = term + beta * (torch.exp(d) - d - 1) * (r if bias_correction else 1.0)
            row, k = row + term, k + 1
        row_sums.append(row)
        row_lens.append(k)
    seqs = n if seq_count is None else seq_count
    toks = sum(row_lens) if token_count is None else token_count
    if loss_type in ("grpo", "sapo"):
        return sum(s / max(k, 1) for s, k in zip(row_sums, row_lens)) / seqs
    if loss_type == "luspo":  # per-sequence token sums, averaged over sequences
        return sum(row_sums) / seqs
    if loss_type in ("bnpo", "dapo", "cispo"):
        return sum(row_sums) / max(toks, 1)
    if loss_type == "dr_grpo":
        return sum(row_sums) / (seqs * max_len)
    raise AssertionError(loss_type)


def make_batch(seed=0, n=4, t=6):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=g) * 3
    old = logp - (torch.rand(n, t, generator=g) - 0.5) * 1.2  # ratios ~0.55..1.8: both clip bounds hit
    ref = logp - (torch.rand(n, t, generator=g) - 0.5)
    adv = torch.tensor([1.3, -0.7, 0.0, -1.1])[:n]
    lens = [6, 3, 5, 1][:n]
    mask = torch.zeros(n, t, dtype=torch.bool)
    for i, k in enumerate(lens):
        mask[i, :k] = True
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", LOSS_TYPE_NAMES)
@pytest.mark.parametrize("beta,bias_correction", [(0.0, True), (0.04, True), (0.04, False)])
def test_grpo_loss_matches_reference(loss_type, beta, bias_correction):
    logp, old, ref, adv, mask = make_batch()
    eps_high = 1.3 if loss_type == "cispo" else 0.28  # cispo's epsilon_high is the ratio cap itself
    kw = dict(epsilon_low=0.2, epsilon_high=eps_high, beta=beta, max_completion_length=6,
              use_bias_correction_kl=bias_correction)
    x = logp.clone().requires_grad_()
    loss, metrics = grpo_loss(x, old, ref if beta else None, adv, mask, loss_type=loss_type, **kw)
    loss.backward()
    y = logp.clone().requires_grad_()
    want = ref_grpo_loss(y, old, ref, adv, mask, loss_type, 0.2, eps_high, beta, 6, bias_correction=bias_correction)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    torch.testing.assert_close(x.grad, y.grad, atol=1e-6, rtol=1e-6)
    assert (x.grad[~mask] == 0).all()

    # Clip metrics against a loop over tokens (TRL's definition: clipping that removes the gradient; cispo:
    # the tokens whose weight the cap lowers).
    low = high = 0
    for i in range(4):
        for t in range(6):
            if mask[i, t]:
                r = math.exp(logp[i, t] - old[i, t])
                low += r < 0.8 and adv[i] < 0 and loss_type != "cispo"
                high += r > (1.3 if loss_type == "cispo" else 1.28) and adv[i] > 0
    n_tok = mask.sum().item()
    assert high > 0 and (low > 0 or loss_type == "cispo")  # the batch really exercises the bounds
    means = token_means(metrics)
    assert means["clip_ratio/low"] == pytest.approx(low / n_tok)
    assert means["clip_ratio/high"] == pytest.approx(high / n_tok)
    assert means["clip_ratio/region"] == pytest.approx((low + high) / n_tok)
    assert metrics["num_tokens"] == n_tok
    if beta:
        ratio = torch.exp(logp - old) if bias_correction else 1.0
        want_kl = (kl_k3(logp, ref) * ratio)[mask].mean().item()  # TRL logs the KL term as it enters the loss
        assert means["kl"] == pytest.approx(want_kl, rel=1e-5)
    else:
        assert "kl" not in means
    assert all(isinstance(v, float) for v in metrics.values())


def test_bias_correction_changes_only_the_kl_gradient_on_policy():
    # ratio == 1 in value, but d(kl * ratio)/d logp = d kl + kl: the gradient differs even on-policy (TRL's default)
    logp, _, ref, adv, mask = make_batch(7)
    grads = []
    for corr in (True, False):
        x = logp.clone().requires_grad_()
        loss, _ = grpo_loss(x, None, ref, adv, mask, loss_type="dapo", beta=0.04, use_bias_correction_kl=corr)
        loss.backward()
        grads.append((loss.item(), x.grad))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-7)  # same value
    kl = kl_k3(logp, ref) * mask
    torch.testing.assert_close(grads[0][1] - grads[1][1], 0.04 * kl / mask.sum(), atol=1e-7, rtol=1e-5)


def test_every_trl_loss_type_is_defined_and_params_and_keywords_are_one_call():
    assert set(LOSS_TYPES) >= {"grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"}
    logp, old, ref, adv, mask = make_batch()
    by_keywords = grpo_loss(logp, old, ref, adv, mask, loss_type="dapo", beta=0.1, epsilon_high=0.28)[0]
    by_params = grpo_loss(logp, old, ref, adv, mask, LossParams(loss_type="dapo", beta=0.1, epsilon_high=0.28))[0]
    assert by_keywords.item() == by_params.item()
    with pytest.raises(TypeError, match="not both"):
        grpo_loss(logp, old, ref, adv, mask, LossParams(), beta=0.1)
    with pytest.raises(TypeError, match="unexpected keyword"):
        grpo_loss(logp, old, ref, adv, mask, epsilon_hi=0.3)


@pytest.mark.parametrize("loss_type", LOSS_TYPE_NAMES)
def test_logp_old_none_means_ratio_one(loss_type):
    logp, _, ref, adv, mask = make_batch(1)
    x = logp.clone().requires_grad_()
    loss, metrics = grpo_loss(x, None, ref, adv, mask, loss_type=loss_type, beta=0.0, max_completion_length=6)
    loss.backward()
    y = logp.clone().requires_grad_()
    ref_grpo_loss(y, logp, ref, adv, mask, loss_type, 0.2, 0.2, 0.0, 6).backward()
    assert torch.allclose(x.grad, y.grad, atol=1e-6)
    assert x.grad.abs().sum() > 0  # gradient flows although the ratio is exactly 1
    assert token_means(metrics)["ratio/mean"] == pytest.approx(1.0)
    assert metrics["clip_ratio/region_sum"] == 0.0 or loss_type == "cispo"  # cispo caps at epsilon_high=0.2 < 1


def test_beta_needs_reference_and_dr_grpo_needs_length():
    logp, old, ref, adv, mask = make_batch()
    with pytest.raises(ValueError, match="logp_ref"):
        grpo_loss(logp, old, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logp, old, ref, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logp, old, ref, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, old, ref, adv[:3], mask)


@pytest.mark.parametrize("loss_type", LOSS_TYPE_NAMES)
def test_mask_truncated_zeroes_rows(loss_type):
    logp, old, ref, adv, mask = make_batch(2)
    truncated = torch.tensor([True, False, False, True])
    x = logp.clone().requires_grad_()
    loss, metrics = grpo_loss(x, old, ref, adv, mask, loss_type=loss_type, max_completion_length=6,
                              truncated=truncated, mask_truncated=True)
    loss.backward()
    assert (x.grad[truncated] == 0).all()
    kept = mask & ~truncated[:, None]
    y = logp.clone().requires_grad_()
    want = ref_grpo_loss(y, old, ref, adv, kept, loss_type, 0.2, 0.2, 0.04, 6)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    assert torch.allclose(x.grad, y.grad, atol=1e-6)
    assert metrics["num_tokens"] == kept.sum().item()
    # Without the flag the truncated rows still train.
    z = logp.clone().requires_grad_()
    grpo_loss(z, old, ref, adv, mask, loss_type=loss_type, max_completion_length=6, truncated=truncated)[0].backward()
    assert z.grad[0].abs().sum() > 0


@pytest.mark.parametrize("loss_type", LOSS_TYPE_NAMES)
def test_micro_batch_accumulation_equals_full_batch(loss_type):
    logp, old, ref, adv, mask = make_batch(3)
    truncated = torch.tensor([False, False, True, False])
    kw = dict(loss_type=loss_type, epsilon_high=0.28, max_completion_length=6, truncated=truncated, mask_truncated=True)
    x = logp.clone().requires_grad_()
    full, _ = grpo_loss(x, old, ref, adv, mask, **kw)
    full.backward()

    y = logp.clone().requires_grad_()
    eff = effective_mask(mask, truncated, True)
    token_count, row_norm = eff.sum().item(), bnpo_row_norms(eff)
    total = 0.0
    for rows in (slice(0, 1), slice(1, 4)):
        width = int(mask[rows].sum(-1).max())  # each micro-batch padded only to its own longest row
        cols = slice(0, width)
        part, _ = grpo_loss(y[rows, cols], old[rows, cols], ref[rows, cols], adv[rows], mask[rows, cols],
                            seq_count=4, token_count=token_count, row_norm=row_norm[rows],
                            **{**kw, "truncated": truncated[rows]})
        part.backward()
        total += part.item()
    assert total == pytest.approx(full.item(), abs=1e-6)
    assert torch.allclose(x.grad, y.grad, atol=1e-6)


def test_sequence_level_importance_sampling():
    logp, old, _, adv, mask = make_batch(4)
    x = logp.clone().requires_grad_()
    loss, _ = grpo_loss(x, old, None, adv, mask, beta=0.0, importance_sampling_level="sequence")
    loss.backward()
    y = logp.clone().requires_grad_()
    want = 0.0
    for i in range(4):
        toks = [t for t in range(6) if mask[i, t]]
        s = torch.exp(sum(y[i, t] - old[i, t] for t in toks) / len(toks))
        a = float(adv[i])
        obj = torch.minimum(s * a, s.clamp(0.8, 1.2) * a)
        want = want + (-obj * len(toks)) / len(toks) / 4  # every token carries the sequence loss
    want.backward()
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    assert torch.allclose(x.grad, y.grad, atol=1e-6)


def test_bnpo_is_the_mean_of_its_batches_token_means():
    # TRL 1.16: each micro-batch of per_device_train_batch_size rows is a token mean, averaged over the K steps
    logp, old, ref, adv, mask = make_batch(5)
    norms = bnpo_row_norms(mask, batch_rows=2)  # batches rows {0, 1} (9 tokens) and {2, 3} (6 tokens), K = 2
    torch.testing.assert_close(norms, torch.tensor([18.0, 18.0, 12.0, 12.0]))
    got, _ = grpo_loss(logp, old, ref, adv, mask, loss_type="bnpo", row_norm=norms)
    halves = [grpo_loss(logp[r], old[r], ref[r], adv[r], mask[r], loss_type="bnpo")[0] for r in (slice(0, 2), slice(2, 4))]
    assert got.item() == pytest.approx(sum(h.item() for h in halves) / 2, abs=1e-7)
    dapo, _ = grpo_loss(logp, old, ref, adv, mask, loss_type="dapo")
    assert abs(got.item() - dapo.item()) > 1e-3  # unequal batches: bnpo is not dapo
    one = grpo_loss(logp, old, ref, adv, mask, loss_type="bnpo", row_norm=bnpo_row_norms(mask))[0]
    assert one.item() == pytest.approx(dapo.item(), abs=1e-7)  # one batch: the same as dapo


def test_padding_garbage_does_not_leak():
    logp, old, ref, adv, mask = make_batch(6)
    logp[~mask] = -1e4  # e.g. log-probs of pad tokens: exp of differences would overflow
    ref[~mask] = 50.0
    old[~mask] = -3e4
    x = logp.clone().requires_grad_()
    loss, metrics = grpo_loss(x, old, ref, adv, mask, loss_type="dapo")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert all(math.isfinite(v) for v in metrics.values())
