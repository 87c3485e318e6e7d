"""The `fast` engine's Triton decode kernels (rollout/fast_kernels.py) against the reference path.

They run on a GPU, or on CPU under Triton's interpreter:
    TRITON_INTERPRET=1 PYTHONPATH=src pytest tests/test_rollout_kernels.py
(bfloat16 only on the GPU: the interpreter's bf16 dot is wrong). Without either, the kernel tests skip and
only the path selection is checked; CPU CI covers the engine's logic on the reference path
(tests/test_rollout_fast.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mathgrpo.rollout import fast_kernels as K
from mathgrpo.rollout.base import SamplingConfig
from mathgrpo.rollout.fast import FastRollout
from mathgrpo.rollout.fast_forward import _rope
from test_rollout_fast import GREEDY, PROMPTS, _lora, char_tokenizer, hf_greedy, rows_of, tiny_model

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(not K.available(torch.device(DEV)),
                                   reason="needs Triton on a GPU, or TRITON_INTERPRET=1 on CPU")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,KV,D", [(4, 2, 16), (12, 2, 128), (4, 4, 32)])
def test_attend_matches_sdpa(dtype, H, KV, D):
    g = torch.Generator().manual_seed(H * D)
    rows, cap, B = 6, 300, 5
    kc = torch.randn(rows, KV, cap, D, generator=g).to(DEV, dtype)
    vc = torch.randn(rows, KV, cap, D, generator=g).to(DEV, dtype)
    q = torch.randn(B, H, D, generator=g).to(DEV, dtype)
    pad = torch.tensor([0, 3, 64, 130, 250], device=DEV)  # inside a block, on a block edge, most of the row
    for col, splits, min_chunk in [(0, 1, 16), (63, 4, 16), (255, 2, 64), (270, 8, 32), (299, 1, 16), (299, 64, 16),
                                   (299, 8, 64)]:  # (299, 8, 64): 4 of the 8 splits in use
        col_t = torch.tensor([col], device=DEV)
        live = (pad <= col).nonzero()[:, 0]
        ref = torch.stack([F.scaled_dot_product_attention(
            q[b].double().reshape(KV, H // KV, D), kc[b, :, pad[b]:col + 1].double(),
            vc[b, :, pad[b]:col + 1].double(), scale=D ** -0.5).reshape(-1) for b in live.tolist()])
        out = K.attend(q, kc, vc, pad, col_t, D ** -0.5, splits, block_n=16, min_chunk=min_chunk)
        assert out.shape == (B, H * D) and out.dtype == dtype
        assert _rel(out[live], ref) < TOL[dtype], (col, splits)
        assert (out[pad > col] == 0).all()  # a row with no columns (an unused graph slot) gets zeros


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [False, True])
def test_rope_write_matches_reference(dtype, norm):
    g = torch.Generator().manual_seed(7)
    B, H, KV, D, cap = 3, 6, 2, 32, 20
    qkv = torch.randn(B, (H + 2 * KV) * D, generator=g).to(DEV, dtype)
    q, k, v = qkv.split([H * D, KV * D, KV * D], -1)  # row-strided views, as the fused projection gives them
    cos, sin = (torch.randn(50, D, generator=g).to(DEV, dtype) for _ in range(2))
    qn, kn = ((torch.rand(D, generator=g) + 0.5).to(DEV, dtype) if norm else None for _ in range(2))
    pos, col = torch.tensor([0, 17, 49], device=DEV), torch.tensor([11], device=DEV)
    kc = torch.randn(B + 1, KV, cap, D, generator=g).to(DEV, dtype)
    vc = torch.randn(B + 1, KV, cap, D, generator=g).to(DEV, dtype)
    kc0, vc0 = kc.clone(), vc.clone()
    qo = K.rope_write(q, k, v, cos, sin, pos, qn, kn, 1e-6, kc, vc, col, H, KV)
    qq, kk = q.unflatten(-1, (H, D)), k.unflatten(-1, (KV, D))
    if norm:  # HF Qwen3RMSNorm: normalise in fp32, round, scale
        qq = F.rms_norm(qq.float(), (D,), None, 1e-6).to(dtype) * qn
        kk = F.rms_norm(kk.float(), (D,), None, 1e-6).to(dtype) * kn
    c, s = cos[pos][:, None].float(), sin[pos][:, None].float()
    assert _rel(qo, _rope(qq.float(), c, s)) < TOL[dtype]
    assert _rel(kc[:B, :, 11], _rope(kk.float(), c, s)) < TOL[dtype]
    assert torch.equal(vc[:B, :, 11], v.unflatten(-1, (KV, D)))
    untouched = torch.ones(cap, dtype=torch.bool)
    untouched[11] = False
    assert torch.equal(kc[:, :, untouched], kc0[:, :, untouched]) and torch.equal(kc[B:], kc0[B:])
    assert torch.equal(vc[:, :, untouched], vc0[:, :, untouched]) and torch.equal(vc[B:], vc0[B:])


def test_splits_cover_the_gpu():
    assert K.splits_for(1, 2, torch.device("cpu")) == 16
    assert K.splits_for(256, 2, torch.device("cpu")) == 1
    assert all(K.splits_for(r, 2, torch.device("cpu")) & (K.splits_for(r, 2, torch.device("cpu")) - 1) == 0
               for r in range(1, 300))  # powers of two (the merge kernel's arange)


def test_path_selection(monkeypatch):
    model, tok = tiny_model("llama", DEV), char_tokenizer()
    assert FastRollout(model, tok).attention == ("triton" if DEV == "cuda" and K.triton else "sdpa")
    assert FastRollout(model, tok, attention="sdpa").attention == "sdpa"
    monkeypatch.setattr(K, "triton", None)  # torch alone: the reference path, and a clear error when forced
    assert FastRollout(model, tok).attention == "sdpa"
    with pytest.raises(ValueError, match="attention='triton' needs Triton"):
        FastRollout(model, tok, attention="triton")
    with pytest.raises(ValueError, match="attention must be"):
        FastRollout(model, tok, attention="flash")
    from mathgrpo.config import GenerationConfig
    from mathgrpo.rollout import make_rollout

    cfg = GenerationConfig(backend="fast", decode_attention="sdpa")
    assert make_rollout(cfg, model, tok).describe()["attention"] == "sdpa"  # the config key reaches the engine
    cfg.decode_attention = "triton"
    with pytest.raises(ValueError, match="attention='triton' needs Triton"):
        make_rollout(cfg, model, tok)


@needs_kernels
@pytest.mark.parametrize("kind,opts", [
    ("llama", {}),
    ("qwen2", {"max_batch": 3}),  # q/k/v biases; rows split into batches
    ("qwen3", {"fuse_weights": True}),  # per-head q/k norms in the kernel; fused q/k/v
    ("qwen2", {"dtype": torch.float16}),
])
def test_greedy_matches_hf_generate_on_kernels(kind, opts):
    model, tok = tiny_model(kind, DEV), char_tokenizer()
    eng = FastRollout(model.to(opts.get("dtype", torch.float32)), tok, attention="triton", **opts)
    out = eng.generate(PROMPTS, n=2, sampling=GREEDY)
    if "dtype" in opts:  # fp16 weights: compare with the reference path at the same precision
        ref = FastRollout(model, tok, attention="sdpa", **opts).generate(PROMPTS, n=2, sampling=GREEDY)
        assert rows_of(out) == rows_of(ref)
        return
    assert rows_of(out) == [hf_greedy(model, p, 12) for p in PROMPTS for _ in range(2)]
    if DEV == "cuda":
        assert eng.captures == 1  # one graph for every length of the generation


@needs_kernels
@pytest.mark.parametrize("merge", ["copy", "none"])
def test_lora_logprobs_on_kernels(merge):
    pm, tok = _lora(tiny_model("qwen2", DEV), seed=3), char_tokenizer()
    out = FastRollout(pm, tok, lora_merge=merge, attention="triton").generate(
        PROMPTS[:2], 2, SamplingConfig(max_new_tokens=8, seed=0))
    for i, prompt in enumerate(out.prompt_ids):
        n = int(out.lengths[i])
        ids = torch.tensor([prompt + out.completion_ids[i, :n].tolist()], device=DEV)
        with torch.no_grad():
            logp = torch.log_softmax(pm(ids).logits[0, len(prompt) - 1:-1].float(), -1)  # [n, V]
        want = logp.gather(1, ids[0, len(prompt):, None])[:, 0].cpu()
        torch.testing.assert_close(out.logprobs[i, :n], want, atol=2e-4, rtol=1e-4)
