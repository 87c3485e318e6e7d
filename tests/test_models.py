"""models.py on CPU with a tiny random model: LoRA target errors, NF4 guard, the adapter-off reference,
and `completion_logprobs` (forward and gradient) against a plain full-logits computation per row."""

from __future__ import annotations

import pytest
import torch

from mathgrpo.config import ModelConfig
from mathgrpo.models import (
    ModelError,
    Reference,
    backbone_and_head,
    completion_logprobs,
    linear_layer_names,
    load_model,
)


def _cfg(path: str, **kw) -> ModelConfig:
    base = dict(name_or_path=path, device="cpu", dtype="float32", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def _perturb_lora(model, seed: int = 0) -> None:
    # peft initialises lora_B to zero (adapter == identity); random B makes "adapter off" observable.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _naive_logprobs(model, prompts, completions, temperature=1.0):
    """Per row, no padding at all: full logits of prompt + completion, fp32 log_softmax, pick."""
    rows = []
    for p, c in zip(prompts, completions):
        ids = torch.tensor([p + c.tolist()])
        logits = model(input_ids=ids).logits[0].float() / temperature  # [L, V]
        lp = torch.log_softmax(logits[len(p) - 1 : -1], dim=-1)  # [T, V]
        rows.append(lp.gather(1, c[:, None]).squeeze(1))
    return torch.stack(rows)  # [B, T]


def _ragged_batch(vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    lens = [3, 7, 1, 5]
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]
    completions = torch.randint(0, vocab, (len(lens), 6), generator=g)  # [B, T]
    return prompts, completions


def test_unknown_lora_target_lists_the_models_linear_layers(tiny_model_dir):
    base, _ = load_model(_cfg(tiny_model_dir, lora=False))
    expected = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)})
    assert linear_layer_names(base) == expected
    with pytest.raises(ModelError) as err:
        load_model(_cfg(tiny_model_dir, lora_target_modules=["q_proj", "qkv_proj", "w1"]), trainable=True)
    msg = str(err.value)
    assert "qkv_proj, w1" in msg and "lora_target_modules" in msg
    for name in expected:
        assert name in msg


def test_nf4_on_cpu_is_a_clear_error(tiny_model_dir):
    with pytest.raises(ModelError, match="nf4 needs a CUDA GPU"):
        load_model(_cfg(tiny_model_dir, quantization="nf4"), trainable=True)


def test_adapter_off_reference_equals_the_base_model(tiny_qwen_dir):
    model, _ = load_model(_cfg(tiny_qwen_dir), trainable=True)
    base, _ = load_model(_cfg(tiny_qwen_dir, lora=False))
    reference = Reference(model, beta=0.04, lora=True)  # at the start: a fresh adapter, the base model
    _perturb_lora(model)  # training moves the adapter
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    want = base(input_ids=ids).logits
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with reference.context(model) as ref:
            got = ref(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert not torch.allclose(adapted, want, atol=1e-3)  # the adapter does change the model...
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # ...and switching it off restores the base
    torch.testing.assert_close(after, adapted)  # and the context switches it back on


def test_fresh_adapter_with_nonzero_b_takes_the_base_as_reference(tiny_qwen_dir):
    """As TRL 1.16: adapters made from a config in this run (peft_config / model.lora) have the base model as KL
    reference whatever their init (init_lora_weights=False: B != 0); a PeftModel handed in keeps its start."""
    from peft import LoraConfig, get_peft_model

    from mathgrpo.trl_compat.model import _add_adapters

    base, _ = load_model(_cfg(tiny_qwen_dir, lora=False))
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    lcfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    with torch.no_grad():
        want_base = base(input_ids=ids).logits
    torch.manual_seed(0)
    fresh = _add_adapters(load_model(_cfg(tiny_qwen_dir, lora=False))[0], LoraConfig(**lcfg))
    torch.manual_seed(0)
    handed = get_peft_model(load_model(_cfg(tiny_qwen_dir, lora=False))[0], LoraConfig(**lcfg))
    for model, base_expected in ((fresh, True), (handed, False)):
        with torch.no_grad():
            start = model(input_ids=ids).logits
        assert not torch.allclose(start, want_base, atol=1e-3)  # the adapter changes the model from the start
        reference = Reference(model, beta=0.04, lora=True)
        _perturb_lora(model, seed=1)  # training moves it
        with torch.no_grad(), reference.context(model) as ref:
            got = ref(input_ids=ids).logits
        torch.testing.assert_close(got, want_base if base_expected else start, rtol=0, atol=1e-5)


def test_full_finetune_reference_is_a_frozen_copy(tiny_model_dir):
    model, _ = load_model(_cfg(tiny_model_dir, lora=False), trainable=True)
    ref = Reference(model, beta=0.04, lora=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    with ref.context(model) as rm:
        assert rm is not model
        assert not any(p.requires_grad for p in rm.parameters())
        assert not torch.equal(next(rm.parameters()), next(model.parameters()))


@pytest.mark.parametrize("chunk,temperature,ckpt", [(1024, 1.0, False), (5, 0.7, True)])
def test_completion_logprobs_match_naive_full_forward(tiny_qwen_dir, chunk, temperature, ckpt):
    model, _ = load_model(_cfg(tiny_qwen_dir, gradient_checkpointing=ckpt), trainable=True)
    _perturb_lora(model)
    prompts, comps = _ragged_batch(model.config.vocab_size)
    got = completion_logprobs(model, prompts, comps, chunk_size=chunk, temperature=temperature)
    want = _naive_logprobs(model, prompts, comps, temperature)
    assert got.dtype == torch.float32 and got.shape == comps.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    # Gradients w.r.t. the LoRA weights agree too (what the update actually uses).
    w = torch.randn(comps.shape, generator=torch.Generator().manual_seed(3))
    params = [p for p in model.parameters() if p.requires_grad]
    g_got = torch.autograd.grad((got * w).sum(), params)
    g_want = torch.autograd.grad((want * w).sum(), params)
    for a, b in zip(g_got, g_want):
        # atol 5e-5: float32 sums in another order (chunks of 5, checkpoint recompute); a wiring error is >= 1e-2
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5)


def test_completion_logprobs_bad_input(tiny_model_dir):
    model, _ = load_model(_cfg(tiny_model_dir), trainable=True)
    with pytest.raises(ValueError, match="2 prompts for 3 completion rows"):
        completion_logprobs(model, [[1], [2]], torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        completion_logprobs(model, [[1], []], torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ModelError, match="lm_head"):
        backbone_and_head(torch.nn.Linear(2, 2))


def test_lora_inputs_stay_bf16_under_autocast(tiny_qwen_dir):
    model, _ = load_model(_cfg(tiny_qwen_dir, dtype="bfloat16"), trainable=True)
    seen = []
    lora_a = next(m for n, m in model.named_modules() if n.endswith("q_proj.lora_A.default"))
    lora_a.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    assert lora_a.weight.dtype == torch.float32  # fp32 adapters (and optimizer state)
    ids = torch.tensor([[5, 17, 99]])
    model(input_ids=ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids)
    # Without autocast peft casts to the adapter dtype; under autocast the bf16 input is passed as is.
    assert seen == [torch.float32, torch.bfloat16]


def test_fused_kernels_on_a_cpu_model_are_a_clear_error(tiny_model_dir):
    with pytest.raises(ModelError, match="fuse_kernels: liger-kernel's Triton kernels need a CUDA model"):
        load_model(ModelConfig(name_or_path=tiny_model_dir, device="cpu", fuse_kernels=True), trainable=True)


def test_loading_leaves_the_random_state_alone(tiny_model_dir, tmp_path):
    """load_base draws no numbers from the global generators: transformers does for a tied weight missing from the
    file (the GGUF's cached copy is written that way by _PlainWeights; the first conversion draws none), and the
    LoRA init and sampling after loading must be the same whichever path ran."""
    from transformers import AutoModelForCausalLM

    from mathgrpo.loading import _PlainWeights, load_base

    _PlainWeights(AutoModelForCausalLM.from_pretrained(tiny_model_dir)).save_pretrained(tmp_path / "cached")
    for folder in (tiny_model_dir, tmp_path / "cached"):
        torch.manual_seed(0)
        want = torch.rand(4)
        torch.manual_seed(0)
        model = load_base(ModelConfig(name_or_path=str(folder), lora=False), torch.device("cpu"), torch.float32)
        assert torch.equal(torch.rand(4), want), folder
        assert torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)
