"""The fused lm_head log-probs (lmhead.py) against the plain chunked path (logprobs._ChunkedTokenLogprobs): values,
entropy, gradients to hidden / W / b, and the GRPO loss and its gradient for every loss type.

On CPU the Triton kernels run under Triton's interpreter: TRITON_INTERPRET=1 must be set before Triton is first
imported (torch._dynamo imports it early), so `test_interpreted_checks_in_a_subprocess` runs this file's
interpreted tests in a fresh process with it set (skipped where Triton is absent). The CUDA test (bf16, the 1.5B
model's vocabulary) runs on a GPU machine only."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from mathgrpo import lmhead
from mathgrpo.logprobs import _ChunkedTokenLogprobs, chunked_token_logprobs
from mathgrpo.loss import LOSS_TYPES, grpo_loss

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.integration
def test_interpreted_checks_in_a_subprocess():
    if INTERPRETED or torch.cuda.is_available():
        pytest.skip("this process runs the interpreted checks itself (or has a GPU: the CUDA test runs instead)")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "not subprocess and not cuda"], env=env, capture_output=True, text=True, timeout=900)
    tail = run.stdout[-3000:]
    assert run.returncode == 0, tail
    assert "11 passed" in tail and "skipped" not in tail, tail


@pytest.fixture
def interpreted(monkeypatch):
    if not INTERPRETED:
        pytest.skip("runs under TRITON_INTERPRET=1 (test_interpreted_checks_in_a_subprocess)")
    monkeypatch.setattr(lmhead, "BLOCK_FWD", 64)  # several vocab tiles (and a ragged last one) at V = 300
    monkeypatch.setattr(lmhead, "BLOCK_BWD", 32)
    lmhead._kernels.cache_clear()
    yield
    lmhead._kernels.cache_clear()


def _inputs(seed: int, device="cpu", dtype=torch.float32, n_rows=2, width=7, hidden=16, vocab=300, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n_rows, width, hidden, generator=g) * 2).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).to(device, dtype).requires_grad_()
    b = (torch.randn(vocab, generator=g)).to(device, dtype).requires_grad_() if bias else None
    ids = torch.randint(0, vocab, (n_rows, width), generator=g).to(device)
    return h, w, b, ids


def _both(h, w, b, ids, chunk, temp, entropy):
    fused = lmhead.fused_token_logprobs(h, w, b, ids, chunk, temp, entropy)
    plain = _ChunkedTokenLogprobs.apply(h, w, b, ids, chunk, temp, entropy)
    return fused, plain


def _grads(out, inputs, upstream):
    return torch.autograd.grad((out * upstream).sum(), [t for t in inputs if t is not None])


@pytest.mark.parametrize("temp,entropy,chunk", [(1.0, True, 5), (0.7, False, 3), (1.3, True, 100)])
def test_fused_matches_plain_interpreted(interpreted, temp, entropy, chunk):
    h, w, b, ids = _inputs(int(temp * 10) + chunk)
    assert lmhead.enabled(h, w)
    (lf, ef), (lp, ep) = _both(h, w, b, ids, chunk, temp, entropy)
    torch.testing.assert_close(lf, lp, rtol=1e-5, atol=1e-5)
    if entropy:
        torch.testing.assert_close(ef, ep, rtol=1e-5, atol=1e-5)
        assert (ef > 0).all()
    up = torch.randn(lf.shape, generator=torch.Generator().manual_seed(1))
    for gf, gp in zip(_grads(lf, (h, w, b), up), _grads(lp, (h, w, b), up)):
        torch.testing.assert_close(gf, gp, rtol=1e-5, atol=1e-5)


def test_fused_is_what_chunked_token_logprobs_runs(interpreted, monkeypatch):
    h, w, b, ids = _inputs(3, bias=False)
    calls = []
    monkeypatch.setattr(lmhead, "fused_token_logprobs", lambda *a: calls.append(1) or _ChunkedTokenLogprobs.apply(*a))
    chunked_token_logprobs(h, w, ids)
    assert calls == [1]
    lmhead.set_fused(False)
    try:
        chunked_token_logprobs(h, w, ids)
    finally:
        lmhead.set_fused(True)
    assert calls == [1]
    assert not lmhead.enabled(h.double(), w.double())  # fp64 references keep the plain path


@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_loss_and_gradient_equal_for_every_loss_type(interpreted, loss_type):
    h, w, b, ids = _inputs(11, n_rows=4, width=6, bias=False)
    g = torch.Generator().manual_seed(5)
    mask = (torch.rand(4, 6, generator=g) > 0.2).float()
    adv = torch.randn(4, generator=g)
    kw = dict(loss_type=loss_type, beta=0.04, max_completion_length=6, epsilon_high=5.0 if loss_type == "cispo" else None)
    results = []
    for fused in (True, False):
        lmhead.set_fused(fused)
        try:
            logp, ent = chunked_token_logprobs(h, w, ids, chunk_size=4, temperature=0.9, with_entropy=True)
        finally:
            lmhead.set_fused(True)
        old = logp.detach() + 0.05 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(2))
        ref = logp.detach() - 0.1
        loss, metrics = grpo_loss(logp, old, ref, adv, mask, entropy=ent, **kw)
        results.append((loss, torch.autograd.grad(loss, [h, w]), metrics))
    (lf, gf, mf), (lp, gp, mp) = results
    torch.testing.assert_close(lf, lp, rtol=1e-5, atol=1e-6)
    for a, c in zip(gf, gp):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)
    assert mf.keys() == mp.keys() and all(abs(mf[k] - mp[k]) <= 1e-4 * (1 + abs(mp[k])) for k in mf)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only (the GPU machine)")
@pytest.mark.parametrize("temp", [1.0, 0.6])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])  # fp16: cards without bf16 (T4, V100)
def test_fused_matches_plain_cuda(temp, dtype):
    h, w, b, ids = _inputs(7, device="cuda", dtype=dtype, n_rows=3, width=700, hidden=256, vocab=151936,
                           bias=False)
    (lf, ef), (lp, ep) = _both(h, w, None, ids, 512, temp, True)
    torch.testing.assert_close(lf, lp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ef, ep, rtol=1e-4, atol=1e-3)
    up = torch.randn(lf.shape, device="cuda")
    (gf,), (gp,) = _grads(lf, (h,), up), _grads(lp, (h,), up)
    assert ((gf.float() - gp.float()).norm() / gp.float().norm()).item() < 1e-2
