"""Tests of the `fast` rollout engine against transformers' own generate/forward on tiny random models.

CPU runs the engine eagerly (no CUDA graphs); with a GPU present the same tests also run on CUDA with
graphs on (`pytest tests/test_rollout_fast.py` on the device machine).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

from mathgrpo.rollout.base import SamplingConfig
from mathgrpo.rollout.fast import FastRollout
from mathgrpo.rollout.fast_plan import plan_for
from mathgrpo.rollout.fast_sampling import compiled_pick, pick, sample

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
EOS = 1
PROMPTS = [[5, 9, 14, 3, 22], [7, 7], [30, 2, 11, 40, 41, 42, 8, 19], [12]]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """64 tokens: <pad>=0, <eos>=1, then a-z, A-Z, 0-9 one character each (decoding concatenates)."""
    chars = [chr(c) for c in range(97, 123)] + [chr(c) for c in range(65, 91)] + [str(d) for d in range(10)]
    vocab = {"<pad>": 0, "<eos>": EOS, **{c: i + 2 for i, c in enumerate(chars)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    t.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>")


def tiny_model(kind: str = "llama", device: str = "cpu", seed: int = 0, window: int | None = 64):
    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, max_position_embeddings=256, eos_token_id=EOS, pad_token_id=0,
                  bos_token_id=None, tie_word_embeddings=False)
    if kind == "llama":
        m = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(**common))  # q/k/v biases
        with torch.no_grad():
            for layer in m.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0, 0.5)  # zero-initialised otherwise: make them matter
    elif kind == "mistral":
        m = MistralForCausalLM(MistralConfig(sliding_window=window, **common))
    else:
        m = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **common))  # per-head q/k norms
    with torch.no_grad():
        m.lm_head.weight.mul_(8)  # peakier logits: fewer near-ties in greedy comparisons
    m.generation_config.eos_token_id = EOS
    m.generation_config.pad_token_id = 0
    return m.float().eval().to(device)


def hf_greedy(model, prompt: list[int], max_new: int, eos: list[int] | None = (EOS,), **kw) -> list[int]:
    """transformers' greedy continuation of one unpadded prompt, cut after the first EOS (kw: e.g. its
    repetition_penalty)."""
    dev = next(model.parameters()).device
    ids = torch.tensor([prompt], device=dev)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                         eos_token_id=list(eos) if eos else None, pad_token_id=0, temperature=None, top_p=None,
                         top_k=None, **kw)[0, len(prompt):].tolist()
    ends = [j for j, t in enumerate(out) if eos and t in eos]
    return out[:ends[0] + 1] if ends else out


def rows_of(c) -> list[list[int]]:
    return [ids[m.bool()].tolist() for ids, m in zip(c.completion_ids, c.completion_mask)]


GREEDY = SamplingConfig(max_new_tokens=12, temperature=0.0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls: threads only add overhead (and contention on shared CI machines)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,opts", [
    ("llama", {}),
    ("qwen2", {"kv_bucket": 5, "max_batch": 3}),  # stale cache columns masked; rows split into batches
    ("qwen3", {"fuse_weights": True, "check_every": 3}),  # owned fused q/k/v and gate/up
    ("qwen2", {"fuse_weights": True, "dtype": torch.float32}),
    ("mistral", {}),  # sliding window (64) longer than the sequences: full attention
])
def test_greedy_matches_hf_generate(kind, opts, device):
    model, tok = tiny_model(kind, device), char_tokenizer()
    plan = plan_for(device, kv_bucket=opts.pop("kv_bucket")) if "kv_bucket" in opts else None
    eng = FastRollout(model, tok, plan=plan, **opts)
    out = eng.generate(PROMPTS, n=2, sampling=GREEDY)
    want = [hf_greedy(model, p, 12) for p in PROMPTS for _ in range(2)]
    assert rows_of(out) == want
    assert out.truncated.tolist() == [len(w) == 12 and w[-1] != EOS for w in want]
    assert out.texts == [tok.decode(w, skip_special_tokens=True) for w in want]
    assert out.prompt_ids == [p for p in PROMPTS for _ in range(2)]
    assert (eng.owned_weight_bytes > 0) == bool(opts.get("fuse_weights"))  # plain model: no weight copy


@pytest.mark.parametrize("device", DEVICES)
def test_eos_stops_rows_and_pads(device):
    model, tok = tiny_model("llama", device), char_tokenizer()
    free = [hf_greedy(model, p, 10, eos=None) for p in PROMPTS]
    stop_tok = free[0][3]
    model.generation_config.eos_token_id = stop_tok
    out = FastRollout(model, tok).generate(PROMPTS, n=1, sampling=SamplingConfig(max_new_tokens=10, temperature=0))
    want = [hf_greedy(model, p, 10, eos=[stop_tok, EOS]) for p in PROMPTS]  # the tokenizer's EOS counts too
    assert rows_of(out) == want
    assert len(want[0]) <= 4 and not out.truncated[0]
    assert (out.completion_ids[~out.completion_mask.bool()] == tok.pad_token_id).all()
    # ignore_eos: full length for everyone, all truncated
    forced = FastRollout(model, tok).generate(PROMPTS, n=1, sampling=SamplingConfig(
        max_new_tokens=10, temperature=0, ignore_eos=True))
    assert rows_of(forced) == free and forced.truncated.all() and (forced.lengths == 10).all()


@pytest.mark.parametrize("check_every", [1, 4, 1000])
def test_stop_strings_cut_text_and_tokens(check_every):
    model, tok = tiny_model("qwen2"), char_tokenizer()
    sampling = SamplingConfig(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    free = FastRollout(model, tok).generate(PROMPTS[:2], n=1, sampling=sampling)
    stop = free.texts[0][5:7]
    sampling.stop_strings = [stop]
    out = FastRollout(model, tok, check_every=check_every).generate(PROMPTS[:2], n=1, sampling=sampling)
    for r in range(2):
        full, ids = free.texts[r], rows_of(free)[r]
        k = full.find(stop)
        if k < 0:
            assert out.texts[r] == full and out.truncated[r]
            continue
        assert out.texts[r] == full[:k + len(stop)] and not out.truncated[r]
        n_tok = min(j for j in range(1, len(ids) + 1) if stop in tok.decode(ids[:j]))
        assert rows_of(out)[r] == ids[:n_tok]


@pytest.mark.parametrize("device", DEVICES)
def test_repetition_penalty_matches_hf_generate(device):
    """transformers' repetition penalty (prompt and completion tokens): the engine's greedy rows equal generate's
    with the same penalty, over a compaction (rows finishing early leave the batch), and differ from plain greedy."""
    model, tok = tiny_model("llama", device), char_tokenizer()
    free = [hf_greedy(model, p, 16, eos=None) for p in PROMPTS]
    model.generation_config.eos_token_id = free[1][5]  # some rows end early: the batch is compacted under them
    want = [hf_greedy(model, p, 16, eos=[free[1][5], EOS], repetition_penalty=1.8) for p in PROMPTS for _ in range(2)]
    eng = FastRollout(model, tok, check_every=2)
    out = eng.generate(PROMPTS, n=2, sampling=SamplingConfig(max_new_tokens=16, temperature=0.0,
                                                               repetition_penalty=1.8))
    assert rows_of(out) == want and eng.compactions > 0
    assert want[::2] != [hf_greedy(model, p, 16, eos=[free[1][5], EOS]) for p in PROMPTS]  # the penalty acted


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature,top_k,penalty", [(0.0, 0, 1.0), (0.7, 0, 1.0), (0.7, 20, 1.0), (0.7, 0, 1.5)])
def test_logprobs_match_hf_forward(temperature, top_k, penalty, device):
    """The engine's log-probs are the policy's at the temperature, before top-k and the repetition penalty."""
    model, tok = tiny_model("qwen2", device), char_tokenizer()
    s = SamplingConfig(max_new_tokens=9, temperature=temperature, top_k=top_k, seed=3, repetition_penalty=penalty)
    out = FastRollout(model, tok).generate(PROMPTS, n=2, sampling=s)
    for r, (p, ids) in enumerate(zip(out.prompt_ids, rows_of(out))):
        seq = torch.tensor([p + ids], device=device)
        logits = model(seq).logits[0, len(p) - 1:-1].float()  # predicts ids
        ref = torch.log_softmax(logits / (temperature or 1.0), -1).gather(-1, seq[0, len(p):, None])[:, 0]
        got = out.logprobs[r, :len(ids)]
        torch.testing.assert_close(got, ref.cpu(), atol=2e-4, rtol=1e-4)
        assert (out.logprobs[r, len(ids):] == 0).all()


def test_seeded_sampling_is_reproducible():
    model, tok = tiny_model("llama"), char_tokenizer()
    eng = FastRollout(model, tok)
    s = SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=11)
    a, b = eng.generate(PROMPTS, 3, s), eng.generate(PROMPTS, 3, s)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    s.seed = 12
    assert not torch.equal(eng.generate(PROMPTS, 3, s).completion_ids, a.completion_ids)


@pytest.mark.parametrize("device", DEVICES)
def test_release_between_calls_keeps_results(device):
    """Freeing the KV cache for an update (and everything, with graphs=True) changes nothing sampled; on CUDA,
    graphs are re-captured only when the cache comes back at another address."""
    model, tok = tiny_model("llama", device), char_tokenizer()
    eng = FastRollout(model, tok)
    s = SamplingConfig(max_new_tokens=10, temperature=1.0, seed=5)
    first = eng.generate(PROMPTS, 2, s)
    kv, captured = eng.kv_cache_bytes, eng.captures
    eng.release()
    assert eng.kv_cache_bytes == 0
    again = eng.generate(PROMPTS, 2, s)  # the cache most likely returns to the same blocks: graphs reused
    assert torch.equal(first.completion_ids, again.completion_ids) and torch.equal(first.logprobs, again.logprobs)
    eng.release()
    # an "update" holds the freed blocks (best fit: same sizes), so the cache comes back at a new address
    taken = [torch.empty(kv // 2, dtype=torch.uint8, device=device) for _ in range(2)]
    moved = eng.generate(PROMPTS, 2, s)
    del taken
    assert torch.equal(first.completion_ids, moved.completion_ids)
    if device == "cuda":
        assert eng.captures > captured > 0  # re-captured at the new address (into a new graph pool)
    eng.release(graphs=True)
    assert torch.equal(eng.generate(PROMPTS, 2, s).completion_ids, first.completion_ids)


def _reference_probs(logits: torch.Tensor, t: float, k: int, p: float) -> torch.Tensor:
    """Plain temperature -> top-k -> top-p filtering, token by token."""
    probs = torch.softmax(logits.double() / t, -1)
    order = sorted(range(len(probs)), key=lambda i: -float(probs[i]))
    keep = set(order[:k] if k else order)
    kept = [i for i in order if i in keep]
    sub = probs[kept] / probs[kept].sum()
    mass, nucleus = 0.0, []
    for i, q in zip(kept, sub.tolist()):
        if mass >= p:
            break
        nucleus.append(i)
        mass += q
    out = torch.zeros_like(probs)
    out[nucleus] = probs[nucleus]
    return out / out.sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("t,k,p,min_p", [(0.7, 0, 1.0, 0.0), (1.0, 3, 1.0, 0.0), (1.3, 0, 0.8, 0.0),
                                         (1.0, 5, 0.6, 0.0), (1.0, 0, 1.0, 0.2), (0.7, 6, 0.9, 0.2)])
def test_sampler_distribution(t, k, p, min_p, device):
    torch.manual_seed(0)
    logits = (torch.randn(8) * 1.5).to(device)
    n = 60000
    g = torch.Generator(device).manual_seed(1)
    pick_fn = compiled_pick() if device == "cuda" else pick  # the engine compiles it on CUDA
    tok, lp = sample(logits.expand(n, 8), SamplingConfig(temperature=t, top_k=k, top_p=p, min_p=min_p), g, pick_fn)
    freq = torch.bincount(tok, minlength=8).double().cpu() / n
    ref = _reference_probs(logits.cpu(), t, k, p)
    if min_p:  # then min-p: tokens below min_p x the top kept probability go
        ref = torch.where(ref < min_p * ref.max(), torch.zeros_like(ref), ref)
        ref = ref / ref.sum()
        assert (ref == 0).sum() > (_reference_probs(logits.cpu(), t, k, p) == 0).sum()  # min-p drops something
    assert (freq[ref == 0] == 0).all()
    assert (freq - ref).abs().max() < 0.01
    torch.testing.assert_close(lp, torch.log_softmax(logits / t, -1)[tok])


def _lora(model, seed: int):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    _randomise_lora(pm, seed)
    return pm.eval()


def _randomise_lora(pm, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("merge", ["copy", "in_place", "none"])
def test_lora_generation_and_sync(device, merge):
    pm, tok = _lora(tiny_model("qwen2", device), seed=1), char_tokenizer()
    eng = FastRollout(pm, tok, lora_merge=merge)
    bases = {n: m.weight.detach().clone() for n, m in pm.named_modules() if n.endswith("base_layer")}
    adapted = sum(w.numel() * w.element_size() for w in bases.values())
    # copy: a copy of every adapted weight; none: only the low-rank pairs; in_place: nothing on the device
    assert (eng.owned_weight_bytes > adapted) == (merge == "copy")
    assert (eng.owned_weight_bytes == 0) == (merge == "in_place")
    before = eng.generate(PROMPTS, 1, GREEDY)
    for n, m in pm.named_modules():  # in_place: the base weights are back, bit for bit
        if n.endswith("base_layer"):
            assert torch.equal(m.weight, bases[n]), n
    assert rows_of(before) == [hf_greedy(pm, p, 12) for p in PROMPTS]
    _randomise_lora(pm, seed=2)  # an "optimizer step" on the adapter
    eng.sync_weights(pm)
    after = eng.generate(PROMPTS, 1, GREEDY)
    assert rows_of(after) == [hf_greedy(pm, p, 12) for p in PROMPTS]
    assert rows_of(after) != rows_of(before)
    with pm.disable_adapter():  # the base-model evaluation: the deltas must vanish from generation
        eng.sync_weights(pm)
        assert rows_of(eng.generate(PROMPTS, 1, GREEDY)) == [hf_greedy(pm, p, 12) for p in PROMPTS]
    eng.sync_weights(pm)
    assert rows_of(eng.generate(PROMPTS, 1, GREEDY)) == rows_of(after)


@pytest.mark.parametrize("merge", ["copy", "in_place", "none"])
def test_lora_logprobs_match_peft_forward(merge):
    """Sampled log-probs equal the peft model's own (unmerged) forward at every position, merged or not."""
    pm, tok = _lora(tiny_model("llama"), seed=3), char_tokenizer()
    out = FastRollout(pm, tok, lora_merge=merge).generate(PROMPTS[:2], 2, SamplingConfig(max_new_tokens=8, seed=0))
    for i, prompt in enumerate(out.prompt_ids):
        n = int(out.lengths[i])
        ids = torch.tensor([prompt + out.completion_ids[i, :n].tolist()])
        with torch.no_grad():
            logp = torch.log_softmax(pm(ids).logits[0, len(prompt) - 1:-1].float(), -1)  # [n, V]
        want = logp.gather(1, out.completion_ids[i, :n, None])[:, 0]
        torch.testing.assert_close(out.logprobs[i, :n], want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
                    reason="needs CUDA and bitsandbytes")
@pytest.mark.parametrize("merge", ["copy", "in_place", "none"])
def test_lora_on_4bit_base(tmp_path, merge):
    from transformers import BitsAndBytesConfig

    tiny_model("llama").save_pretrained(tmp_path)
    q = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, device_map={"": 0}, quantization_config=
                                         BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_compute_dtype=torch.float32))
    assert type(q.model.layers[0].mlp.up_proj.weight).__name__ == "Params4bit"
    pm, tok = _lora(q, seed=1), char_tokenizer()
    eng = FastRollout(pm, tok, lora_merge=merge)  # copy: a dequantised fp32 copy; else dequantised at every use
    dense = sum(m.out_features * m.in_features * 4 for n, m in pm.named_modules() if n.endswith("base_layer"))
    assert (eng.owned_weight_bytes >= dense) == (merge == "copy")
    assert rows_of(eng.generate(PROMPTS, 1, GREEDY)) == [hf_greedy(pm, p, 12) for p in PROMPTS]
    _randomise_lora(pm, seed=2)
    eng.sync_weights(pm)
    assert rows_of(eng.generate(PROMPTS, 1, GREEDY)) == [hf_greedy(pm, p, 12) for p in PROMPTS]


def test_plain_model_weights_are_shared_and_resynced():
    model, tok = tiny_model("llama"), char_tokenizer()
    eng = FastRollout(model, tok)
    with torch.no_grad():  # in place, as an optimizer step: seen without a copy
        model.model.layers[0].mlp.down_proj.weight.mul_(-3)
    assert rows_of(eng.generate(PROMPTS, 1, GREEDY)) == [hf_greedy(model, p, 12) for p in PROMPTS]
    layer = model.model.layers[1].self_attn  # a new tensor object: sync_weights must notice
    layer.q_proj.weight = torch.nn.Parameter(torch.randn_like(layer.q_proj.weight))
    eng.sync_weights(model)
    assert rows_of(eng.generate(PROMPTS, 1, GREEDY)) == [hf_greedy(model, p, 12) for p in PROMPTS]


def test_bad_input_errors():
    tok = char_tokenizer()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        FastRollout(gpt2, tok)
    eng = FastRollout(tiny_model("llama"), tok, max_seq_len=20)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        eng.generate([[3], []], 1, GREEDY)
    with pytest.raises(ValueError, match="prompt 0 has a token id outside"):
        eng.generate([[3, 64]], 1, GREEDY)
    with pytest.raises(ValueError, match="max_seq_len"):
        eng.generate([[3] * 10], 1, GREEDY)
    with pytest.raises(ValueError, match="top_p"):
        eng.generate([[3]], 1, SamplingConfig(top_p=0.0))
    with pytest.raises(ValueError, match="sliding window"):
        FastRollout(tiny_model("mistral", window=8), tok).generate([[3] * 4], 1, GREEDY)


def test_describe_names_the_path_and_weight_plan():
    tok = char_tokenizer()
    d = FastRollout(tiny_model("qwen2"), tok).describe()
    assert d["attention"] == "sdpa" and not d["cuda_graphs"]  # CPU: the reference path, eagerly
    assert d["matmuls"] == "cuBLAS + reference ops"  # fast_matmul's kernels run on the triton path only
    assert d["kernels"] == "torch" and d["plan"].startswith("kernels torch on CPU") and d["fallbacks"] == []
    assert d["weights"]["qkv"] == "model's own tensors (separate matmuls)" and d["weights"]["o"] == "model's own tensors"
    assert FastRollout(tiny_model("qwen2"), tok, fuse_weights=True).describe()["weights"]["gate_up"] == "owned fused copy"
    pm = _lora(tiny_model("qwen2"), seed=0)
    plans = {m: FastRollout(pm, tok, lora_merge=m).describe()["weights"] for m in ("copy", "in_place", "none")}
    assert plans["copy"]["qkv"] == "owned fused copy (LoRA merged)" and plans["copy"]["down"] == "owned copy (LoRA merged)"
    assert plans["in_place"]["qkv"] == "model's own tensors + deltas added in place while sampling"
    assert plans["none"]["gate_up"] == "model's own tensors + low-rank LoRA matmuls"
    assert plans["none"]["lm_head"] == "model's own tensors"
    cast = FastRollout(tiny_model("llama"), tok, dtype=torch.float16).describe()["weights"]
    assert cast["qkv"] == "owned fused copy (cast)" and cast["embed"] == "owned copy (cast)"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("merge", ["copy", "none"])
def test_released_weights_come_back_for_the_next_rollout(device, merge):
    """release(weights=True) frees the owned (merged) copy for an update; sync_weights, or a generate without it,
    re-allocates and refills it: the same tokens as an engine that never released, after an adapter change too.
    On CUDA a copy that comes back elsewhere re-captures the graphs instead of replaying stale addresses."""
    pm, tok = _lora(tiny_model("qwen2", device), seed=1), char_tokenizer()
    eng = FastRollout(pm, tok, lora_merge=merge)
    held = eng.owned_weight_bytes
    before = eng.generate(PROMPTS, 1, GREEDY)
    eng.release(weights=True)
    assert held > 0 and eng.owned_weight_bytes == 0
    taken = torch.empty(held, dtype=torch.uint8, device=device)  # the "update" holds the freed blocks
    _randomise_lora(pm, seed=2)
    eng.sync_weights(pm)
    assert eng.owned_weight_bytes == held
    captures = eng.captures
    after = eng.generate(PROMPTS, 1, GREEDY)
    assert rows_of(after) == [hf_greedy(pm, p, 12) for p in PROMPTS] and rows_of(after) != rows_of(before)
    if device == "cuda":
        assert eng.captures > captures  # the copy moved (its old blocks are taken): fresh graphs
    del taken
    eng.release(weights=True)
    _randomise_lora(pm, seed=3)  # no sync_weights: generate refills from the model as it is now
    eng.sync_weights(pm)
    assert rows_of(eng.generate(PROMPTS, 1, GREEDY)) == [hf_greedy(pm, p, 12) for p in PROMPTS]
    eng.release(weights=True)
    again = eng.generate(PROMPTS, 1, GREEDY)  # released, then generate without a sync: refilled before use
    assert rows_of(again) == [hf_greedy(pm, p, 12) for p in PROMPTS]


def _stop_token_for(model, prompts, n_new: int) -> int:
    """A token that ends the greedy continuations at the most different steps (or never): rows finish unevenly."""
    free = [hf_greedy(model, p, n_new, eos=None) for p in prompts]
    ends = lambda t: {row.index(t) if t in row else n_new for row in free}  # noqa: E731
    return max({t for row in free for t in row}, key=lambda t: len(ends(t)))


@pytest.mark.parametrize("device", DEVICES)
def test_finished_rows_leave_the_batch(device):
    """compact=True drops finished rows mid-batch (their K/V moved to the front): greedy output equals HF
    generate row for row and equals the engine that keeps every row to the end; the batch did shrink."""
    model, tok = tiny_model("llama", device), char_tokenizer()
    prompts = PROMPTS + [[3, 4, 5], [40, 41], [9, 8, 7, 6, 5, 4], [20, 21, 22]]
    stop = _stop_token_for(model, prompts, 20)
    model.generation_config.eos_token_id = stop
    s = SamplingConfig(max_new_tokens=20, temperature=0)
    want = [hf_greedy(model, p, 20, eos=[stop, EOS]) for p in prompts for _ in range(3)]
    assert len({len(w) for w in want}) > 2  # rows finish at several different steps
    eng = FastRollout(model, tok, check_every=1)
    out = eng.generate(prompts, n=3, sampling=s)
    assert eng.compactions > 0
    assert rows_of(out) == want
    keep_all = FastRollout(model, tok, check_every=1, compact=False)
    ref = keep_all.generate(prompts, n=3, sampling=s)
    assert keep_all.compactions == 0
    assert torch.equal(out.completion_ids, ref.completion_ids) and torch.equal(out.completion_mask, ref.completion_mask)
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=0, atol=1e-5)


def test_compacted_sampling_logprobs_match_the_forward():
    """Sampled rows that survive several compactions still get the log-probs of their own context."""
    model, tok = tiny_model("llama"), char_tokenizer()
    model.generation_config.eos_token_id = _stop_token_for(model, PROMPTS, 16)
    eng = FastRollout(model, tok, check_every=1)
    out = eng.generate(PROMPTS, n=4, sampling=SamplingConfig(max_new_tokens=16, temperature=1.0, seed=3))
    assert eng.compactions > 0 and len(set(out.lengths.tolist())) > 1
    for r, (p, ids, m) in enumerate(zip(out.prompt_ids, out.completion_ids, out.completion_mask)):
        c = ids[m.bool()]
        full = torch.tensor([p + c.tolist()])
        with torch.no_grad():
            logits = model(full).logits[0, len(p) - 1:-1].float()
        want = logits.log_softmax(-1).gather(-1, c[:, None])[:, 0]
        torch.testing.assert_close(out.logprobs[r, :len(c)], want, rtol=0, atol=1e-4)


def test_auto_backend_takes_the_fast_engine_where_it_can_read_the_model(capsys):
    """generation.backend=auto: the fast engine on CPU too (a supported family), hf with a reason for one it
    cannot read (GPT-2), and the same tokens as fast named explicitly."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mathgrpo.config import GenerationConfig
    from mathgrpo.rollout import make_rollout
    from mathgrpo.rollout.hf import HFRollout

    tok = char_tokenizer()
    model = tiny_model("qwen2")
    auto = make_rollout(GenerationConfig(backend="auto"), model, tok)
    assert isinstance(auto, FastRollout)
    fast = make_rollout(GenerationConfig(backend="fast"), model, tok)
    assert rows_of(auto.generate(PROMPTS, 2, GREEDY)) == rows_of(fast.generate(PROMPTS, 2, GREEDY))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    capsys.readouterr()
    assert isinstance(make_rollout(GenerationConfig(backend="auto"), gpt2, tok), HFRollout)
    out = capsys.readouterr()
    assert "model_type 'gpt2' is not supported" in out.out + out.err
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        make_rollout(GenerationConfig(backend="fast"), gpt2, tok)
