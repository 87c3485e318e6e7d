"""Questions about a loaded model, answered in one place: where its body and head are, the autocast context of
its update, and (for the modules above: models, packing, fsdp, rollout) what kind of model or layer it is.

Below models.py and packing.py in the layering (docs/architecture.md), so both can ask without importing
each other; imports nothing of mathgrpo.
"""

from __future__ import annotations

import contextlib

import torch


class ModelError(ValueError):
    """A model, adapter or LoRA setting that cannot be used; the message says which and why."""


def context_length(model) -> int | None:
    """The model's context (config.max_position_embeddings), None when its config does not say."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def check_context(model, max_new_tokens: int, key: str, longest_prompt: int = 1) -> None:
    """ModelError when a prompt plus `max_new_tokens` completion tokens cannot fit the model's context: positions
    past max_position_embeddings were never trained, so such completions would be sampled and trained on silently."""
    n = context_length(model)
    if n is not None and longest_prompt + max_new_tokens > n:
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        raise ModelError(f"{key}={max_new_tokens} does not fit the model's context: {name} has "
                         f"max_position_embeddings={n}, and the prompt ({longest_prompt} tokens at least) and the "
                         f"completion must fit in it together; set {key} to at most {n - longest_prompt}")


def backbone_and_head(model):
    """(transformer body returning hidden states, lm_head) for chunked log-probs without full logits."""
    base = base_model(model)
    body = getattr(base, base.base_model_prefix, None) if hasattr(base, "base_model_prefix") else None
    if body is None or not hasattr(base, "lm_head"):
        raise ModelError(f"{type(base).__name__}: expected a causal LM with a `{getattr(base, 'base_model_prefix', 'model')}` "
                         f"body and an `lm_head`")
    return body, base.lm_head


def compute_dtype(model) -> torch.dtype:
    """The dtype the update's matmuls run in: the lm_head's (bf16 / fp16 under autocast, else fp32)."""
    return backbone_and_head(model)[1].weight.dtype


def compute_context(model):
    """Autocast to the model's half dtype (bf16/fp16) for the update's forward; a no-op for fp32 models.
    Keeps LoRA's fp32 adapters (and their Adam state) while every matmul runs on tensor cores; the
    log-softmax runs in fp32 inside `logprobs.chunked_token_logprobs` regardless."""
    _, head = backbone_and_head(model)
    dtype = head.weight.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        return contextlib.nullcontext()
    return torch.autocast(head.weight.device.type, dtype=dtype)


# The attribute `fsdp.shard_model` sets on a sharded model: its own log-prob pass, which FSDP2 gathers the root
# group around. `models.completion_logprobs` calls it when present, so models.py never imports fsdp.py.
SHARDED_LOGPROBS = "sharded_logprobs"


# --- what kind of model or layer ----------------------------------------------------------------------------

def base_model(model):
    """The transformers model under a peft wrapper (the model itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_peft(model) -> bool:
    """A peft model (adapters attached): saved as an adapter folder, its reference is the adapter switched off."""
    return hasattr(model, "peft_config")


# Set on a peft model whose adapters this run created from a config (models.add_lora, the TRL door's peft_config):
# its KL reference is the base model whatever the adapters' initialisation, as in TRL; an adapter handed in (loaded
# or built by the caller) is its own starting point (models.Reference).
FRESH_ADAPTER = "mathgrpo_fresh_adapter"


def mark_fresh_adapter(model):
    setattr(model, FRESH_ADAPTER, True)
    return model


def is_fresh_adapter(model) -> bool:
    return getattr(model, FRESH_ADAPTER, False) is True


def is_lora_layer(module) -> bool:
    """A peft LoRA layer wrapping a base layer (Linear, Linear4bit, ...)."""
    return hasattr(module, "lora_A") and hasattr(module, "get_base_layer")


def fusable_lora_classes() -> tuple[type, ...]:
    """peft's LoRA layer classes that `models.fuse_lora_add` may give its one-GEMM forward: both compute
    base_layer(x) + lora_B(lora_A(dropout(x))) * scaling for plain LoRA, over an nn.Linear (`Linear`) or a
    bitsandbytes 4-bit base (`Linear4bit`, which also clones the base output first). 8-bit: not measured, left out."""
    from peft.tuners.lora import Linear

    try:  # peft defines its bitsandbytes layers only where bitsandbytes imports
        from peft.tuners.lora.bnb import Linear4bit
    except (ImportError, AttributeError):
        return (Linear,)
    return Linear, Linear4bit


QUANTIZED_LINEARS = ("Linear4bit", "Linear8bitLt")  # bitsandbytes' layer classes, named: bitsandbytes is optional


def is_quantized_linear(module) -> bool:
    """A bitsandbytes 4-bit / 8-bit linear layer (a base layer LoRA can adapt, whose weight is not a plain tensor)."""
    return type(module).__name__ in QUANTIZED_LINEARS


def is_quantized(model) -> bool:
    """A model loaded with bitsandbytes 4-bit or 8-bit weights (transformers' flags): no merged copy can be made."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
