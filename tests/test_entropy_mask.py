"""Entropy from the chunked log-prob pass and TRL's top_entropy_quantile, against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mathgrpo.logprobs import chunked_token_logprobs
from mathgrpo.loss import grpo_loss, high_entropy_mask, kl_k3


def naive_entropy(hidden, weight, temperature, bias=None):  # [B, T]: from the full [B, T, V] logits
    z = (hidden.double() @ weight.double().t() + (0 if bias is None else bias.double())) / temperature
    return -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_chunked_entropy_matches_full_logits_and_leaves_logprobs_and_grads_alone(chunk):
    torch.manual_seed(chunk)
    B, T, H, V, temp = 3, 29, 16, 101, 0.7
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    bias = torch.randn(V)
    ids = torch.randint(0, V, (B, T))
    upstream = torch.randn(B, T)
    logp, ent = chunked_token_logprobs(hidden, weight, ids, chunk_size=chunk, temperature=temp, lm_head_bias=bias,
                                       with_entropy=True)
    assert ent.shape == (B, T) and not ent.requires_grad
    torch.testing.assert_close(ent.double(), naive_entropy(hidden.detach(), weight.detach(), temp, bias),
                               rtol=1e-5, atol=1e-5)
    (logp * upstream).sum().backward()
    g_h, g_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = chunked_token_logprobs(hidden, weight, ids, chunk_size=chunk, temperature=temp, lm_head_bias=bias)
    (plain * upstream).sum().backward()
    assert torch.equal(logp, plain)
    assert torch.equal(g_h, hidden.grad) and torch.equal(g_w, weight.grad)


def trl_high_entropy_mask(entropies, mask, threshold):
    """TRL 1.16 GRPOTrainer.get_high_entropy_mask on one process, written with numpy."""
    e, m = entropies.double().numpy(), mask.numpy().astype(bool)
    thr = np.quantile(e[m], threshold)  # numpy's default is linear interpolation, as torch.quantile
    return torch.from_numpy(((e * m) >= thr) & m)


@pytest.mark.parametrize("q", [0.0, 0.2, 0.5, 1.0])
def test_high_entropy_mask_is_trls_quantile_rule(q):
    g = torch.Generator().manual_seed(3)
    ent = torch.rand(4, 9, generator=g) * 3
    mask = torch.arange(9)[None, :] < torch.tensor([9, 4, 1, 6])[:, None]
    got = high_entropy_mask(ent, mask, q)
    assert torch.equal(got, trl_high_entropy_mask(ent, mask, 1 - q))
    n = int(mask.sum())
    assert int(got.sum()) == (1 if q == 0.0 else n if q == 1.0 else int(got.sum()))
    assert int(got.sum()) == pytest.approx(max(1, q * n), abs=1.01)  # about the top q share
    assert not got[~mask].any()
    assert not high_entropy_mask(ent, torch.zeros_like(mask), q).any()
    with pytest.raises(ValueError, match="top_quantile"):
        high_entropy_mask(ent, mask, 1.5)


def test_grpo_loss_with_top_entropy_quantile_matches_the_masked_objective():
    g = torch.Generator().manual_seed(5)
    n, t = 4, 7
    logp = -torch.rand(n, t, generator=g) * 3
    old = logp - (torch.rand(n, t, generator=g) - 0.5) * 0.6
    ref = logp - (torch.rand(n, t, generator=g) - 0.5)
    adv = torch.tensor([1.2, -0.8, 0.4, -1.0])
    mask = torch.arange(t)[None, :] < torch.tensor([7, 3, 5, 2])[:, None]
    ent = torch.rand(n, t, generator=g) * 2
    beta, q = 0.04, 0.3
    x = logp.clone().requires_grad_()
    loss, metrics = grpo_loss(x, old, ref, adv, mask, loss_type="grpo", beta=beta, entropy=ent,
                              top_entropy_quantile=q)
    loss.backward()
    # direct: the clipped term only on the top-q tokens, the KL on every token, per-sequence means over all tokens
    y = logp.clone().requires_grad_()
    keep = trl_high_entropy_mask(ent, mask, 1 - q).float()
    ratio = torch.exp(y - old)
    pg = -torch.min(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None]) * keep
    per_token = (pg + beta * kl_k3(y, ref) * ratio) * mask  # KL with TRL 1.16's bias correction (the default)
    want = (per_token.sum(1) / mask.sum(1)).mean()
    want.backward()
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    torch.testing.assert_close(x.grad, y.grad, atol=1e-6, rtol=1e-5)
    assert 0 < keep.sum() < mask.sum()
    assert metrics["entropy_sum"] / metrics["num_tokens"] == pytest.approx(float(ent[mask].mean()), rel=1e-6)
    # quantile 1.0 is the plain loss (entropy only logged)
    plain, _ = grpo_loss(logp, old, ref, adv, mask, loss_type="grpo", beta=beta)
    full, m = grpo_loss(logp, old, ref, adv, mask, loss_type="grpo", beta=beta, entropy=ent)
    assert full.item() == plain.item() and "entropy_sum" in m
    with pytest.raises(ValueError, match="needs the per-token entropy"):
        grpo_loss(logp, old, ref, adv, mask, beta=beta, top_entropy_quantile=0.5)
