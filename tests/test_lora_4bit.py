"""LoRA over a bitsandbytes NF4 base (the notebook's QLoRA): `models.fuse_lora_add` gives peft's 4-bit LoRA
layers its one-GEMM forward, with the same log-probs and gradients as peft's own forward. CPU: bitsandbytes'
4-bit layers run there (its default backend); skipped where bitsandbytes is not installed (CI)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_lora_b

bnb = pytest.importorskip("bitsandbytes")

VOCAB = 97


def _tiny_nf4_lora_model(seed: int = 0):
    """Tiny Qwen2 (fp32) whose seven projections are bitsandbytes NF4 layers, then peft LoRA as the trainer adds it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mathgrpo.config import ModelConfig
    from mathgrpo.models import add_lora

    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=False,
                      attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                          compute_dtype=torch.float32, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True)._quantize("cpu")
                    if lin.bias is not None:
                        q.bias = lin.bias
                    setattr(parent, name, q)
    model.is_loaded_in_4bit = True  # what transformers sets on a 4-bit model; peft picks its 4-bit LoRA layers by it
    return random_lora_b(add_lora(model, ModelConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0)))


def _completions(n_rows: int = 4, width: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, VOCAB, (int(k),), generator=g).tolist() for k in torch.randint(1, 6, (n_rows,), generator=g)]
    return prompts, torch.randint(1, VOCAB, (n_rows, width), generator=g)


def test_fused_lora_add_on_an_nf4_base_equals_peft_forward_and_backward():
    from peft.tuners.lora.bnb import Linear4bit as Lora4bit

    from mathgrpo.models import completion_logprobs, fuse_lora_add

    model = _tiny_nf4_lora_model()
    prompts, ids = _completions()
    params = [p for p in model.parameters() if p.requires_grad]
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    assert type(layer) is Lora4bit  # the 4-bit LoRA class, not plain Linear: the path under test

    def run():
        logp = completion_logprobs(model, prompts, ids)
        with torch.no_grad(), model.disable_adapter():
            ref = completion_logprobs(model, prompts, ids)
        return logp, ref, torch.autograd.grad(logp.sum(), params)

    want = run()
    assert fuse_lora_add(model) == 14  # 7 projections x 2 layers, every one of them 4-bit
    assert "forward" in vars(layer)
    got = run()
    assert fuse_lora_add(model, on=False) == 14 and "forward" not in vars(layer)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)  # fp32: addmm vs matmul + scale + add
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)  # adapters off: the base layer alone
    assert (got[0] - got[1]).abs().max() > 1e-2  # the adapters change the policy: the comparison means something
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused_add", [True, False])
def test_load_model_fuses_lora_add_on_4bit_layers_as_configured(monkeypatch, fused_add):
    # the wiring: model.lora_fused_add (default true) reaches peft's 4-bit LoRA layers through load_model
    from mathgrpo import models
    from mathgrpo.config import ModelConfig

    nf4 = _tiny_nf4_lora_model()
    monkeypatch.setattr(models, "load_base", lambda cfg, device, dtype: nf4.get_base_model())
    monkeypatch.setattr(models, "load_tokenizer", lambda cfg: None)
    monkeypatch.setattr(models, "add_lora", lambda model, cfg: nf4)
    cfg = ModelConfig(name_or_path="x", device="cpu")
    assert cfg.lora_fused_add  # the default
    cfg.lora_fused_add = fused_add
    model, _ = models.load_model(cfg, trainable=True)
    layer = model.base_model.model.model.layers[1].self_attn.k_proj
    assert ("forward" in vars(layer)) == fused_add
