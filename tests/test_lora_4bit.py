"""LoRA over a bitsandbytes NF4 base (the notebook's QLoRA): `models.fuse_lora_add` gives peft's 4-bit LoRA
layers its one-GEMM forward or (the default) `qlora.NF4LoRA`, one autograd node per projection, with the same
log-probs and gradients as peft's own forward. CPU: bitsandbytes' 4-bit layers run there (its default backend);
skipped where bitsandbytes is not installed (CI)."""

from __future__ import annotations

import pytest
import torch
from helpers import random_lora_b

bnb = pytest.importorskip("bitsandbytes")

VOCAB = 97


def _tiny_nf4_lora_model(seed: int = 0, layers: int = 2, dropout: float = 0.0, device: str = "cpu",
                         dtype: torch.dtype = torch.float32):
    """Tiny Qwen2 whose seven projections are bitsandbytes NF4 layers, then peft LoRA as the trainer adds it
    (fp32 on CPU; on CUDA in dtype, the notebook's bf16, its compute dtype too)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mathgrpo.config import ModelConfig
    from mathgrpo.models import add_lora

    torch.manual_seed(seed)
    cfg = Qwen2Config(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=False,
                      attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg).to(device, dtype)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                          compute_dtype=dtype, quant_type="nf4", device=device)
                    q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True)._quantize(device)
                    if lin.bias is not None:
                        q.bias = lin.bias
                    setattr(parent, name, q)
    model.is_loaded_in_4bit = True  # what transformers sets on a 4-bit model; peft picks its 4-bit LoRA layers by it
    return random_lora_b(add_lora(model, ModelConfig(lora_r=4, lora_alpha=8, lora_dropout=dropout)))


def _completions(n_rows: int = 4, width: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, VOCAB, (int(k),), generator=g).tolist() for k in torch.randint(1, 6, (n_rows,), generator=g)]
    return prompts, torch.randint(1, VOCAB, (n_rows, width), generator=g)


@pytest.mark.parametrize("qlora", [False, True], ids=["addmm", "nf4-function"])
def test_fused_lora_add_on_an_nf4_base_equals_peft_forward_and_backward(qlora):
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
    assert fuse_lora_add(model, qlora=qlora) == 14  # 7 projections x 2 layers, every one of them 4-bit
    assert "forward" in vars(layer)
    got = run()
    assert _nf4_nodes(model, prompts, ids) == (14 if qlora else 0)
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
    prompts, ids = _completions()
    assert _nf4_nodes(model, prompts, ids) == (14 if fused_add else 0)  # one NF4LoRA node per 4-bit projection


def _nf4_nodes(model, prompts, ids) -> int:
    """How many NF4LoRA nodes the policy's log-prob forward records (the path actually taken, not only installed).
    Counted at NF4LoRA.forward, not by walking the graph: torch 2.11 refuses `next_functions` on some nodes."""
    from unittest import mock

    from mathgrpo import qlora
    from mathgrpo.models import completion_logprobs

    calls, real = [], qlora.NF4LoRA.forward

    def counted(ctx, *args):
        calls.append(1)
        return real(ctx, *args)

    with mock.patch.object(qlora.NF4LoRA, "forward", staticmethod(counted)):
        assert completion_logprobs(model, prompts, ids).requires_grad
    return len(calls)


def _layer_grads(layer, x, params, autocast: bool = False):
    import contextlib

    x = x.detach().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        y = layer(x)
    g = torch.linspace(-1, 1, y.numel(), device=x.device).view(y.shape)  # a non-uniform upstream gradient
    return (y, *torch.autograd.grad((y.float() * g).sum(), [x, *params]))


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_nf4_function_equals_peft_per_layer_including_the_input_gradient(dropout):
    # one projection alone: output, grad of its input, of LoRA A and of LoRA B, against peft's 4-bit forward;
    # with dropout the same RNG draws (one mask per call, taken in the same order) give the same mask
    from mathgrpo.models import fuse_lora_add

    model = _tiny_nf4_lora_model(dropout=dropout)
    model.train()
    for name in ("q_proj", "down_proj"):  # q_proj has a (frozen) bias, down_proj none
        layer = model.base_model.model.model.layers[1].get_submodule(("self_attn." if name == "q_proj" else "mlp.") + name)
        params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(2))
        fuse_lora_add(model, on=False)
        torch.manual_seed(7)
        want = _layer_grads(layer, x, params)
        fuse_lora_add(model)
        torch.manual_seed(7)
        got = _layer_grads(layer, x, params)
        assert got[0].grad_fn.name() == "NF4LoRABackward"
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert got[3].abs().max() > 1e-3 and got[2].abs().max() > 1e-3  # LoRA gradients that are not zero


def test_nf4_function_under_bf16_autocast_stays_close_to_fp32():
    # the dtype branch the GPU update takes (autocast bf16): the compute dtype is autocast's, the LoRA
    # gradients come back in fp32 (the adapters' dtype)
    from mathgrpo.models import fuse_lora_add

    model = _tiny_nf4_lora_model()
    model.train()
    fuse_lora_add(model)
    layer = model.base_model.model.model.layers[0].mlp.gate_proj
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    x = torch.randn(4, 6, layer.in_features, generator=torch.Generator().manual_seed(3))
    want = _layer_grads(layer, x, params)
    got = _layer_grads(layer, x, params, autocast=True)
    assert got[0].dtype == torch.bfloat16 and got[0].grad_fn.name() == "NF4LoRABackward"
    assert got[2].dtype == got[3].dtype == torch.float32
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b, rtol=0.05, atol=0.05 * b.abs().max().item())


def test_nf4_function_covers_only_what_it_computes():
    # None (the caller's addmm / peft path) for adapters off with grad, several active adapters, a trainable
    # base bias, mixed dtypes outside autocast; the base alone without grad equals bitsandbytes' layer exactly
    from mathgrpo.qlora import nf4_lora_forward

    model = _tiny_nf4_lora_model()
    layer = model.base_model.model.model.layers[0].self_attn.k_proj
    x = torch.randn(2, 3, layer.in_features)
    assert nf4_lora_forward(layer, x) is not None
    assert nf4_lora_forward(layer, x.double()) is None
    with model.disable_adapter():
        assert nf4_lora_forward(layer, x) is None  # grad enabled: peft's path
        with torch.no_grad():
            torch.testing.assert_close(nf4_lora_forward(layer, x), layer.base_layer(x), rtol=0, atol=0)
    layer.base_layer.bias.requires_grad_(True)
    assert nf4_lora_forward(layer, x) is None
    layer.base_layer.bias.requires_grad_(False)
    from peft import LoraConfig

    layer.update_layer("second", 4, 8, LoraConfig(r=4, lora_alpha=8))
    layer.set_adapter(["default", "second"])
    assert nf4_lora_forward(layer, x) is None


def test_kept_absmax_equals_bitsandbytes_dequantization():
    # the double-quantised scales dequantised once and kept: W identical to bitsandbytes' own dequantize_4bit
    from bitsandbytes.functional import dequantize_4bit

    from mathgrpo.qlora import absmax_fp32, dequantize

    w = _tiny_nf4_lora_model().base_model.model.model.layers[0].mlp.up_proj.base_layer.weight
    assert w.quant_state.nested  # compress_statistics=True: the path with the cache
    torch.testing.assert_close(dequantize(w.data, w.quant_state, torch.float32), dequantize_4bit(w.data, w.quant_state),
                               rtol=0, atol=0)
    assert absmax_fp32(w.quant_state) is absmax_fp32(w.quant_state)  # computed once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nf4_function_on_cuda_bf16_matches_peft():
    # the GPU's own path: bf16 model and compute dtype, bf16 autocast, fp32 adapters (as the update runs);
    # a no-grad call of decode size keeps bitsandbytes' fused kernel (None), a larger one takes the function
    from mathgrpo.models import fuse_lora_add
    from mathgrpo.qlora import BNB_FUSED_MAX_ROWS, nf4_lora_forward

    model = _tiny_nf4_lora_model(device="cuda", dtype=torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    x = torch.randn(4, 600, layer.in_features, device="cuda", dtype=torch.bfloat16)
    fuse_lora_add(model, on=False)
    want = _layer_grads(layer, x, params, autocast=True)
    fuse_lora_add(model)
    got = _layer_grads(layer, x, params, autocast=True)
    assert got[0].grad_fn.name() == "NF4LoRABackward"
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=0.02, atol=0.02 * b.abs().max().item())
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert nf4_lora_forward(layer, x[:1, :BNB_FUSED_MAX_ROWS]) is None
        assert nf4_lora_forward(layer, x) is not None

