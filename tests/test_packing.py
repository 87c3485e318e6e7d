"""Padding-free packing (packing.py): the same log-probs, loss and gradient as the padded update."""

from __future__ import annotations

import pytest
import torch
from helpers import random_lora_b

from mathgrpo.config import Config, ModelConfig
from mathgrpo.loss import LOSS_TYPES
from mathgrpo.packing import ATTN_NAME, pack_rows, packed_microbatches, set_packed_attention

VOCAB = 97


def _tiny_lora_model(attn: str = "sdpa", seed: int = 0, arch: str = "qwen2"):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from mathgrpo.models import add_lora

    torch.manual_seed(seed)
    config, cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    cfg = config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=False,
                 attn_implementation=attn)
    model = cls(cfg).double()  # fp64: differences are the layout's, not rounding
    return random_lora_b(add_lora(model, ModelConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0)))


def _completions(n_rows: int = 6, width: int = 11, seed: int = 1):
    from mathgrpo.rollout import Completions

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, VOCAB, (int(k),), generator=g).tolist() for k in torch.randint(1, 6, (n_rows,), generator=g)]
    lengths = [width, 1, 7, 3, width, 5][:n_rows]
    ids = torch.randint(1, VOCAB, (n_rows, width), generator=g)
    mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    ids = ids.masked_fill(~mask, 0)
    truncated = torch.tensor([n == width for n in lengths])
    return Completions(prompt_ids=prompts, completion_ids=ids, completion_mask=mask, texts=[""] * n_rows,
                       truncated=truncated)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_packed_logprobs_equal_the_padded_ones_with_gradients(arch):
    from mathgrpo.models import completion_logprobs

    model = _tiny_lora_model(arch=arch)
    comp = _completions()
    lengths = comp.completion_mask.sum(1).tolist()
    pad = completion_logprobs(model, comp.prompt_ids, comp.completion_ids, chunk_size=5)  # [B, T]
    g_pad = torch.autograd.grad((pad * comp.completion_mask).sum(), [p for p in model.parameters() if p.requires_grad])
    packed = completion_logprobs(model, comp.prompt_ids, comp.completion_ids, chunk_size=5, lengths=lengths)
    g_packed = torch.autograd.grad(packed.sum(), [p for p in model.parameters() if p.requires_grad])
    assert model.base_model.model.config._attn_implementation == ATTN_NAME
    m = comp.completion_mask
    torch.testing.assert_close(packed[m], pad[m], rtol=0, atol=1e-10)
    assert (packed[~m] == 0).all()
    for a, b in zip(g_packed, g_pad):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    set_packed_attention("rows")  # the varlen kernel is CUDA-only: the CPU always takes the per-row path
    torch.testing.assert_close(completion_logprobs(model, comp.prompt_ids, comp.completion_ids, chunk_size=5,
                                                   lengths=lengths), packed, rtol=0, atol=0)
    set_packed_attention("auto")
    # the unpacked path still runs plain sdpa after the switch (same values as before it)
    torch.testing.assert_close(completion_logprobs(model, comp.prompt_ids, comp.completion_ids, chunk_size=5), pad,
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("equal", [False, True])
def test_packed_attention_layouts_agree(equal):
    # dense batch (rows of one length), padded batch, varlen (per-row SDPA on CPU): the same values and gradients
    from mathgrpo.models import completion_logprobs
    from mathgrpo.packing import rows_layout

    model = _tiny_lora_model()
    comp = _completions()
    if equal:
        comp.prompt_ids = [p[:1] + [3] * 4 for p in comp.prompt_ids]  # 5 prompt tokens each
        comp.completion_mask[:] = True
    lengths = comp.completion_mask.sum(1).tolist()
    params = [p for p in model.parameters() if p.requires_grad]
    got = {}
    for mode in ("rows", "varlen", "padded", "auto"):
        set_packed_attention(mode, pad_ratio=100.0)
        try:
            lp = completion_logprobs(model, comp.prompt_ids, comp.completion_ids, chunk_size=5, lengths=lengths)
            got[mode] = (lp, torch.autograd.grad(lp.sum(), params))
        finally:
            set_packed_attention("auto")
    for mode in ("varlen", "padded", "auto"):
        torch.testing.assert_close(got[mode][0], got["rows"][0], rtol=0, atol=1e-12)
        for a, b in zip(got[mode][1], got["rows"][1]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    rows = [len(p) + n - 1 for p, n in zip(comp.prompt_ids, lengths)]
    set_packed_attention("padded")
    layout = rows_layout(tuple(rows), torch.device("cpu"))
    assert layout["mathgrpo_rows"] == (len(rows), max(rows)) and (("mathgrpo_pad" in layout) != equal)
    set_packed_attention("auto")  # pads only what costs <= PAD_RATIO x the rows' own attention FLOPs
    assert ("mathgrpo_rows" in rows_layout(tuple(rows), torch.device("cpu"))) == equal
    assert rows_layout((8, 8, 8), torch.device("cpu")) == {"mathgrpo_rows": (3, 8)}
    assert "mathgrpo_pad" in rows_layout((8, 7, 8), torch.device("cpu"))
    set_packed_attention("varlen")
    assert rows_layout((8, 8, 8), torch.device("cpu")) == {}
    set_packed_attention("auto")
    with pytest.raises(ValueError, match="set_packed_attention"):
        set_packed_attention("flex")


def _update(pack: bool, loss_type: str, iters: int, checkpointing: bool, budget: int = 24):
    from mathgrpo.advantages import group_advantages
    from mathgrpo.models import Reference, enable_checkpointing
    from mathgrpo.trainer import make_optimizer, policy_update

    model = _tiny_lora_model()
    if checkpointing:
        enable_checkpointing(model)
    model.train()
    cfg = Config()
    cfg.grpo.loss_type, cfg.grpo.beta, cfg.grpo.num_iterations, cfg.grpo.num_generations = loss_type, 0.1, iters, 3
    cfg.generation.max_new_tokens = 11
    cfg.trainer.max_tokens_per_microbatch, cfg.trainer.logprob_chunk_size, cfg.trainer.pack_sequences = budget, 4, pack
    cfg.trainer.learning_rate = 1e-2
    comp = _completions()
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0, 0.3]), 3)
    ref = Reference(model, cfg.grpo.beta, lora=True)
    opt, sched = make_optimizer(model, cfg)
    m = policy_update(model, opt, sched, ref, comp, adv, cfg)
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return m, grads


@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
@pytest.mark.integration
def test_packed_update_equals_padded_for_every_loss_type(loss_type):
    # grpo_loss computes in fp32 and the two layouts split the rows into different micro-batches, so the sums
    # agree to fp32 rounding (the per-micro-batch metric means, kl or num_tokens, are weighted by the split: not compared)
    m_pad, g_pad = _update(False, loss_type, 1, False)
    m_pack, g_pack = _update(True, loss_type, 1, False)
    for key in ("loss", "grad_norm"):
        assert m_pack[key] == pytest.approx(m_pad[key], rel=1e-6, abs=5e-8), key  # terms ~0.1 cancel
    assert m_pad["grad_norm"] > 0
    for a, b in zip(g_pack, g_pad):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.integration
def test_packed_update_with_checkpointing_and_two_iterations():
    # recomputation in the backward must see the packed attention again; the second iteration uses old log-probs
    m_pad, g_pad = _update(False, "dapo", 2, False)
    m_pack, g_pack = _update(True, "dapo", 2, True)
    assert m_pack["loss"] == pytest.approx(m_pad["loss"], rel=1e-6)
    for a, b in zip(g_pack, g_pad):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.integration
def test_update_reads_values_to_the_host_a_fixed_number_of_times(monkeypatch, pack):
    # Every read of a computed value (item, tolist, float, int of a float tensor; bool of any tensor) is a device
    # sync on a GPU. The update's reads must not grow with its micro-batches: they happen once per step (host
    # reads of int token ids, the checks of the host copy, cost no sync and are not counted).
    reads = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **k):
            if _name == "__bool__" or self.is_floating_point():
                reads.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    per_budget = {}
    for budget in (1000, 12):
        reads.clear()
        m, _ = _update(pack, "grpo", 2, False, budget=budget)
        per_budget[budget] = len(reads)
    lengths = [len(p) + n for p, n in zip(_completions().prompt_ids, [11, 1, 7, 3, 11, 5])]
    split = packed_microbatches if pack else __import__("mathgrpo.update", fromlist=["x"]).microbatches
    assert len(split(lengths, 1000)) == 1 and len(split(lengths, 12)) >= 4
    assert per_budget[12] == per_budget[1000], per_budget
    assert m["grad_norm"] > 0 and m["num_tokens"] > 0


def test_pack_rows_layout():
    p = pack_rows([[5, 6], [7]], torch.tensor([[1, 2, 3], [4, 0, 0]]), [3, 1], torch.device("cpu"))
    assert p.input_ids.tolist() == [[5, 6, 1, 2, 7]]  # the last completion token predicts nothing
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 0]]
    assert p.cu_seqlens.tolist() == [0, 4, 5] and p.max_len == 4
    assert p.predictors.tolist() == [1, 2, 3, 4] and p.targets.tolist() == [1, 2, 3, 4]
    assert p.out_index.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pack_rows([[5], []], torch.zeros(2, 3, dtype=torch.long), [1, 1], torch.device("cpu"))


def test_packed_microbatches_fill_the_budget():
    lengths = [10, 3, 7, 2, 8, 30, 1]
    groups = packed_microbatches(lengths, 12)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= 12 or len(g) == 1 for g in groups)
    assert [5] in groups  # longer than the budget: alone
    assert len(groups) == 4  # 30 | 10+2 | 8+3+1 | 7 (first fit, longest first)
    with pytest.raises(ValueError, match="budget"):
        packed_microbatches(lengths, 0)


def test_packing_refuses_a_non_sdpa_model():
    from mathgrpo.models import ModelError, completion_logprobs

    model = _tiny_lora_model(attn="eager")
    comp = _completions()
    with pytest.raises(ModelError, match="attn_implementation=sdpa"):
        completion_logprobs(model, comp.prompt_ids, comp.completion_ids, lengths=comp.completion_mask.sum(1).tolist())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: the varlen FlashAttention kernel")
def test_cuda_packed_bf16_matches_padded_and_uses_varlen():
    from mathgrpo.models import completion_logprobs
    from mathgrpo.packing import varlen_kernel

    model = _tiny_lora_model().to("cuda", torch.bfloat16)
    comp = _completions()
    lengths = comp.completion_mask.sum(1).tolist()
    with torch.no_grad():
        pad = completion_logprobs(model, comp.prompt_ids, comp.completion_ids, chunk_size=5)
        packed = completion_logprobs(model, comp.prompt_ids, comp.completion_ids, chunk_size=5, lengths=lengths)
    fn, _ = varlen_kernel()
    assert fn is not None, "torch.nn.attention.varlen unavailable or wrong: packing fell back to per-row SDPA"
    m = comp.completion_mask.cuda()
    torch.testing.assert_close(packed[m], pad[m], rtol=0, atol=0.05)  # bf16 kernels, different tilings
    from mathgrpo.models import fuse_lora_add

    fuse_lora_add(model)
    with torch.no_grad():
        fused = completion_logprobs(model, comp.prompt_ids, comp.completion_ids, chunk_size=5, lengths=lengths)
    torch.testing.assert_close(fused[m], pad[m], rtol=0, atol=0.05)


def test_fused_lora_add_equals_peft_forward_and_backward():
    from mathgrpo.models import completion_logprobs, fuse_lora_add

    model = _tiny_lora_model()
    comp = _completions()
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        logp = completion_logprobs(model, comp.prompt_ids, comp.completion_ids)
        with torch.no_grad(), model.disable_adapter():
            ref = completion_logprobs(model, comp.prompt_ids, comp.completion_ids)
        return logp, ref, torch.autograd.grad((logp * comp.completion_mask).sum(), params)

    want = run()
    assert fuse_lora_add(model) == 14  # 7 projections x 2 layers
    got = run()
    assert fuse_lora_add(model, on=False) == 14 and "forward" not in vars(model.base_model.model.model.layers[0].mlp.up_proj)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)  # adapters off: the base layer alone
    assert not torch.equal(got[0], got[1])
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pack", [False, True])
def test_update_names_an_out_of_vocabulary_id_before_any_forward(pack):
    # the log-prob passes check the ids on the host copy first: a clear error, not an embedding index failure
    from mathgrpo.models import Reference
    from mathgrpo.trainer import make_optimizer, policy_update

    model, comp, cfg = _tiny_lora_model(), _completions(), Config()
    cfg.grpo.beta, cfg.trainer.pack_sequences = 0.1, pack
    comp.completion_ids[2, 0] = VOCAB
    opt, sched = make_optimizer(model, cfg)
    with pytest.raises(ValueError, match=r"ids outside \[0, 97\)"):
        policy_update(model, opt, sched, Reference(model, 0.1, lora=True), comp, torch.zeros(6), cfg)
