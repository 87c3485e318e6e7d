"""The `fast` engine's Triton decode kernels (rollout/fast_kernels.py, fast_matmul.py, fast_draw.py) against the
reference path, and the kernel plan that picks them (fast_plan.py).

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
from mathgrpo.rollout.fast_plan import plan_for
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
    assert FastRollout(model, tok, plan=plan_for(DEV, attention="sdpa")).attention == "sdpa"
    monkeypatch.setattr(K, "triton", None)  # torch alone: the reference path, and a clear error when forced
    assert FastRollout(model, tok).attention == "sdpa"
    with pytest.raises(ValueError, match="attention='triton' needs Triton"):
        plan_for(DEV, attention="triton")
    with pytest.raises(ValueError, match="attention must be"):
        plan_for(DEV, attention="flash")
    with pytest.raises(ValueError, match="table needs the triton attention path"):
        plan_for(DEV, attention="sdpa", matmul="table")
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
    eng = FastRollout(model.to(opts.get("dtype", torch.float32)), tok, plan=plan_for(DEV, attention="triton"), **opts)
    out = eng.generate(PROMPTS, n=2, sampling=GREEDY)
    if "dtype" in opts:  # fp16 weights: compare with the reference path at the same precision
        ref = FastRollout(model, tok, plan=plan_for(DEV, "torch"), **opts).generate(PROMPTS, n=2, sampling=GREEDY)
        assert rows_of(out) == rows_of(ref)
        return
    assert rows_of(out) == [hf_greedy(model, p, 12) for p in PROMPTS for _ in range(2)]
    if DEV == "cuda":
        assert eng.captures == 1  # one graph for every length of the generation


@needs_kernels
@pytest.mark.parametrize("merge", ["copy", "none"])
def test_lora_logprobs_on_kernels(merge):
    pm, tok = _lora(tiny_model("qwen2", DEV), seed=3), char_tokenizer()
    out = FastRollout(pm, tok, lora_merge=merge, plan=plan_for(DEV, attention="triton")).generate(
        PROMPTS[:2], 2, SamplingConfig(max_new_tokens=8, seed=0))
    for i, prompt in enumerate(out.prompt_ids):
        n = int(out.lengths[i])
        ids = torch.tensor([prompt + out.completion_ids[i, :n].tolist()], device=DEV)
        with torch.no_grad():
            logp = torch.log_softmax(pm(ids).logits[0, len(prompt) - 1:-1].float(), -1)  # [n, V]
        want = logp.gather(1, ids[0, len(prompt):, None])[:, 0].cpu()
        torch.testing.assert_close(out.logprobs[i, :n], want, atol=2e-4, rtol=1e-4)


# ----- fast_matmul: the skinny-matmul kernel and the engine's table -----------------------------------------

from mathgrpo.rollout import fast_matmul as FM  # noqa: E402
from mathgrpo.rollout.fast_forward import glu_weights  # noqa: E402

C = FM.Config
# W as the left operand or x; split-K 1, 3 and 4 (uneven slices and an empty one when K is not a multiple)
CONFIGS = [C(True, 32, 64, 1, 4, 2), C(False, 32, 64, 3, 4, 3), C(True, 16, 32, 4, 4, 2), C(False, 64, 32, 1, 4, 2)]


def _rand(g, *shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(DEV, dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,Kd", [(1, 64, 256), (5, 40, 200), (16, 96, 128), (33, 64, 192)])
def test_skinny_matmul_matches_reference(dtype, M, N, Kd):
    """Both forms of the kernel against float64 torch: plain + bias, SwiGLU."""
    g = torch.Generator().manual_seed(M * N)
    x, w, w2 = _rand(g, M, Kd, dtype=dtype, scale=3.0), _rand(g, N, Kd, dtype=dtype, scale=0.1), _rand(
        g, N, Kd, dtype=dtype, scale=0.1)
    b = _rand(g, N, dtype=dtype)
    xd, wd, w2d = x.double(), w.double(), w2.double()
    cases = {
        "plain": (lambda c: FM.launch(x, w, b, c), F.linear(xd, wd, b.double())),
        "glu": (lambda c: FM.launch(x, w, None, c, w2=w2), F.silu(F.linear(xd, wd)) * F.linear(xd, w2d)),
    }
    for cfg in CONFIGS * 2:  # twice: the split-K arrival counters must be back at zero after every launch
        for name, (run, want) in cases.items():
            got = run(cfg)
            assert got.shape == (M, N) and got.dtype == dtype
            assert _rel(got, want) < TOL[dtype], (name, cfg)
    assert int(K._COUNTERS[x.device].abs().sum()) == 0
    with pytest.raises(ValueError, match="same shape and strides"):
        FM.launch(x, w, None, CONFIGS[0], w2=w2[:, :-1])


def test_table_lookup_and_fallbacks():
    """One table decides: exact (kind, N, K, row bucket) entries, cuBLAS for anything else (and for fp32)."""
    assert [FM.bucket(m) for m in (1, 2, 8, 9, 16, 17, 33, 64, 65)] == [1, 8, 8, 16, 16, 32, 64, 64, 0]
    cfg = C(True, 64, 128, 1, 4, 4)
    table = {("mm", 96, 128, 8): cfg}
    assert FM.choose("mm", 5, 96, 128, table) == cfg and FM.choose("mm", 9, 96, 128, table) is None
    assert FM.choose("mm", 5, 96, 256, table) is None and FM.choose("glu", 5, 96, 128, table) is None
    x, w = torch.randn(5, 128), torch.randn(96, 128)
    assert not FM.usable(x, w)  # fp32 takes cuBLAS (and on CPU without the interpreter nothing runs)
    torch.testing.assert_close(FM.linear(x, w, table=table), F.linear(x, w))
    assert FM.glu(x, w, w, table=table) is None


def test_glu_weights():
    """Which gate/up pairs take the SwiGLU epilogue: LoRA pairs, per-use dequantisation, non-SiLU fall back."""
    from mathgrpo.rollout.fast_weights import extract

    w = extract(tiny_model("qwen2"))
    gate, up = glu_weights(w.layers[0], w.act)
    assert gate.shape == w.layers[0].gate_up[0].shape  # separate tensors as they are
    wn = extract(_lora(tiny_model("qwen2"), seed=1), lora_merge="none")
    assert glu_weights(wn.layers[0], wn.act) is None
    wf = extract(tiny_model("qwen2"), fuse=True)
    gate, up = glu_weights(wf.layers[0], wf.act)  # halves of the fused owned copy
    assert gate.shape == up.shape and up.data_ptr() > gate.data_ptr()
    assert glu_weights(wf.layers[0], torch.nn.GELU()) is None  # SwiGLU only


def _tiny_table(w) -> dict:
    """fast_matmul.TABLE-style entries for the tiny model's shapes at <= 8 rows and 32 (cuBLAS at 16)."""
    L, t = w.layers[0], {}
    gate = glu_weights(L, w.act)[0]
    for b in (1, 8, 32):
        t.update({("mm", *m.shape, b): CONFIGS[b % 3] for m in (*L.qkv, L.o, L.down)})
        t[("glu", *gate.shape, b)] = CONFIGS[3]
    return t


def test_matmul_path_selection():
    model, tok = tiny_model("qwen3"), char_tokenizer()
    assert FastRollout(model, tok, plan=plan_for("cpu", attention="sdpa")).describe()["matmuls"] == \
        "cuBLAS + reference ops"


@needs_kernels
@pytest.mark.parametrize("matmul", ["table", "cublas"])
def test_engine_matmul_paths_match_reference_path(monkeypatch, matmul):
    """Sampled tokens and log-probs of the engine on each matmul path (a table's kernels at 8 and 24 rows, the
    latter from its 32-row bucket; cuBLAS everywhere) against the SDPA / cuBLAS reference path, and which kernel forms
    actually ran."""
    model, tok = tiny_model("qwen3", DEV), char_tokenizer()
    s = SamplingConfig(max_new_tokens=6, seed=4)
    monkeypatch.setattr(FM, "DTYPES", (torch.float32, torch.float16, torch.bfloat16))  # the tiny model is fp32
    ran, launch = [], FM.launch

    def counted(x, w, b, cfg, w2=None, out=None, prefetch=0):
        ran.append((x.shape[0], "glu" if w2 is not None else "mm"))
        return launch(x, w, b, cfg, w2, out, prefetch)

    monkeypatch.setattr(FM, "launch", counted)
    probe = FastRollout(model, tok, fuse_weights=True, plan=plan_for(DEV, "torch"))
    table = _tiny_table(probe.w)
    plan = plan_for(DEV, attention="triton", sampler="torch", matmul=matmul, table=table if matmul == "table" else {})
    eng = FastRollout(model, tok, fuse_weights=True, max_batch=24, plan=plan)
    d = eng.describe()["matmuls"]
    if matmul == "cublas":
        assert d == "cuBLAS + reference ops"
    else:
        assert d["qkv"]["<=8 rows"].startswith("triton") and d["qkv"]["<=16 rows"] == "cuBLAS"
        assert d["gate_up"]["<=8 rows"].startswith("matmul + SwiGLU, triton") and d["o"][">64 rows"] == "cuBLAS"
    ref = FastRollout(model, tok, plan=plan_for(DEV, "torch"))
    for n, rows in ((2, 8), (6, 24)) if matmul == "table" else ((2, 8),):  # decode batches of 8 and 24 rows
        ran.clear()
        out, want = eng.generate(PROMPTS, n, s), ref.generate(PROMPTS, n, s)
        assert rows_of(out) == rows_of(want)
        torch.testing.assert_close(out.logprobs, want.logprobs, atol=1e-4, rtol=1e-4)
        expect = set() if matmul == "cublas" else {(rows, "mm"), (rows, "glu")}
        assert {(m, k) for m, k in ran if m == rows} == expect and all(m == rows for m, _ in ran), (n, set(ran))
    assert all(int(c.abs().sum()) == 0 for c in K._COUNTERS.values())  # every arrival counter reset


# ----- programmatic dependent launch ----------------------------------------------------------------------------

def test_pdl_selection():
    model, tok = tiny_model("qwen2", DEV), char_tokenizer()
    can = K.supports_pdl(torch.device(DEV))
    d = FastRollout(model, tok).describe()  # PDL belongs to the tuned set (MATHGRPO_KERNELS=conservative: none)
    assert d["pdl"] == (can and d["attention"] == "triton" and d["kernels"] == "tuned")
    assert plan_for(DEV, attention="sdpa").pdl is False
    if not can:
        with pytest.raises(ValueError, match="pdl=True needs"):
            plan_for(DEV, pdl=True)


@pytest.mark.skipif(not (DEV == "cuda" and K.supports_pdl(torch.device(DEV))), reason="needs a Hopper-class GPU")
def test_pdl_matches_serial_launches():
    """Under CUDA graphs, kernels launched with PDL (each waiting on griddepcontrol before touching memory) give
    the very tokens and log-probs of plain serial launches, on the table's kernels."""
    model, tok = tiny_model("qwen2", DEV), char_tokenizer()
    s = SamplingConfig(max_new_tokens=24, seed=7)
    outs = [FastRollout(model.to(torch.bfloat16), tok, fuse_weights=True, plan=plan_for(DEV, "auto", pdl=p))
            .generate(PROMPTS, 4, s) for p in (False, True)]
    assert rows_of(outs[0]) == rows_of(outs[1])
    torch.testing.assert_close(outs[0].logprobs, outs[1].logprobs, atol=0, rtol=0)


# ----- fast_draw: the one-launch token draw -----------------------------------------------------------------

from mathgrpo.rollout import fast_draw  # noqa: E402


@needs_kernels
def test_draw_follows_the_softmax_and_returns_its_logprobs():
    """Many rows of the same logits, drawn at temperature 0.7 over 3 vocabulary chunks (the last one partial, one
    all -inf): token frequencies match softmax(x / T), each log-prob is log_softmax(x / T) at the token, a seed
    reproduces the draws; greedy gives the first argmax (a tie) and the raw logits' log-prob."""
    g = torch.Generator().manual_seed(0)
    V, n, T = 40, 3000 if DEV == "cuda" else 800, 0.7  # the interpreter runs 3 programs a row, one at a time
    x = torch.randn(V, generator=g) * 2
    x[16:32] = float("-inf")  # the second chunk holds no candidate at all
    logits = x.expand(n, V).contiguous().to(DEV)
    gen = torch.Generator(DEV).manual_seed(3)
    tok, lp = fast_draw.draw(logits, T, gen, chunk=16)
    want = torch.log_softmax(x / T, -1)
    freq = torch.bincount(tok.cpu(), minlength=V).float() / n
    p = want.exp()
    assert bool(((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-3).all())  # within 4 sigma, every token
    assert not bool(freq[16:32].any())
    torch.testing.assert_close(lp.cpu(), want[tok.cpu()], atol=1e-5, rtol=1e-5)
    again, _ = fast_draw.draw(logits, T, torch.Generator(DEV).manual_seed(3), chunk=16)
    assert torch.equal(tok, again)
    y = torch.randn(4, V, generator=g)
    y[:, 5] = y[:, 37] = y.max() + 1  # a tie across chunks: the first index wins, as torch.argmax
    gt, glp = fast_draw.draw(y.to(DEV), 0, None, chunk=16)
    assert gt.tolist() == [5] * 4
    torch.testing.assert_close(glp.cpu(), torch.log_softmax(y, -1)[:, 5], atol=1e-5, rtol=1e-5)


@needs_kernels
def test_engine_draws_with_the_kernel():
    """sampler='triton': greedy equals HF generate; sampled tokens' log-probs equal the model's forward."""
    model, tok = tiny_model("qwen2", DEV), char_tokenizer()
    calls, real = [], fast_draw.draw
    eng = FastRollout(model, tok, plan=plan_for(DEV, attention="triton", sampler="triton"))
    eng._draw = lambda *a, **k: calls.append(1) or real(*a, **k)
    assert eng.describe()["sampler"] == "triton"
    out = eng.generate(PROMPTS, n=1, sampling=GREEDY)
    assert calls and rows_of(out) == [hf_greedy(model, p, 12) for p in PROMPTS]
    out = eng.generate(PROMPTS[:2], 2, SamplingConfig(max_new_tokens=8, seed=0, temperature=0.8))
    for i, prompt in enumerate(out.prompt_ids):
        n = int(out.lengths[i])
        ids = torch.tensor([prompt + out.completion_ids[i, :n].tolist()], device=DEV)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1:-1].float() / 0.8, -1)  # [n, V]
        torch.testing.assert_close(out.logprobs[i, :n], logp.gather(1, ids[0, len(prompt):, None])[:, 0].cpu(),
                                   atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="sampler must be"):
        plan_for(DEV, sampler="gumbel")
