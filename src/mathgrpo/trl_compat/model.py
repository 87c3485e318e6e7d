"""The model a TRL script hands over (a hub id / folder / .gguf path, a loaded model, or a PeftModel) made ready
for mathgrpo's engine, through mathgrpo.models wherever that decides the same thing.

One TRL-parity difference from mathgrpo.models, on purpose: a k-bit (bitsandbytes) base that gets fresh adapters
from `peft_config` goes through peft's `prepare_model_for_kbit_training` first (norms, embeddings and lm_head
upcast to fp32), as TRL does, where `models.add_lora` skips it to save memory. Input gradients are decided as
models.py decides them: checkpointing is non-reentrant (`models.enable_checkpointing`), so no
`enable_input_require_grads` is needed.
"""

from __future__ import annotations

from ..modelinfo import is_quantized_linear, mark_fresh_adapter
from .options import env, warn


def prepare_model(model, tok, args, peft_config, quantization_config):
    """(model, tokenizer) ready to train: loaded if named, with the tokenizer's pad id, adapters from peft_config
    (or full fine-tuning without it), dropout off if args.disable_dropout, checkpointing if asked, train mode."""
    from ..loading import prepare_tokenizer
    from ..models import enable_checkpointing, lora_inputs_follow_autocast

    if isinstance(model, str):
        model, loaded_tok = _load(model, args, quantization_config)
        tok = tok if tok is not None else loaded_tok
    elif tok is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model.config._name_or_path, trust_remote_code=args.trust_remote_code)
    tok = prepare_tokenizer(tok)
    _unmark_gguf(model)
    _set_pad_token(model, tok.pad_token_id)
    model = _make_trainable(model, peft_config)
    if is_peft(model):
        lora_inputs_follow_autocast(model)
    if args.disable_dropout:
        _disable_dropout(model)
    if args.gradient_checkpointing:
        enable_checkpointing(model)
    model.train()
    return model, tok


def _load(name: str, args, quantization_config):
    """A model named by a hub id, folder or .gguf path, loaded frozen by mathgrpo.models (adapters come later)."""
    import torch

    from ..config import ModelConfig
    from ..models import load_model

    mik = dict(args.model_init_kwargs or {})
    if quantization_config is not None:
        mik["quantization_config"] = quantization_config
    q = mik.pop("quantization_config", None)
    dtype = str(mik.pop("dtype", mik.pop("torch_dtype", "auto"))).replace("torch.", "")
    attn = mik.pop("attn_implementation", "sdpa")
    mik.pop("trust_remote_code", None)
    if mik:
        warn(f"model_init_kwargs {sorted(mik)}: not supported by mathgrpo's model loader (ignored)")
    device = f"cuda:{env('LOCAL_RANK', 0)}" if args.world_size > 1 and torch.cuda.is_available() else "auto"
    mcfg = ModelConfig(name_or_path=name, dtype=dtype, attn_implementation=attn, lora=False, device=device,
                       trust_remote_code=args.trust_remote_code,
                       quantization="nf4" if q is not None and getattr(q, "load_in_4bit", False) else None)
    return load_model(mcfg)


def _set_pad_token(model, pad_token_id: int) -> None:
    model.config.pad_token_id = pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = pad_token_id


def _make_trainable(model, peft_config):
    """Fresh adapters from peft_config; else a PeftModel's own adapters (PeftModel.from_pretrained loads them
    frozen); else every weight (full fine-tuning, as TRL)."""
    if peft_config is not None:
        return _add_adapters(model, peft_config)
    if not is_peft(model):
        model.requires_grad_(True)
    elif not any(p.requires_grad for p in model.parameters()):
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    return model


def _add_adapters(model, peft_config):
    from peft import get_peft_model, prepare_model_for_kbit_training

    if is_peft(model):
        raise ValueError("GRPOTrainer: the model already carries peft adapters; pass peft_config=None to train "
                         "them, or pass the base model")
    targets = getattr(peft_config, "target_modules", None)
    if isinstance(targets, (list, set, tuple)):
        check_peft_targets(model, sorted(targets))
    if is_kbit(model):  # TRL parity (see the module docstring); checkpointing is enabled afterwards, non-reentrant
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return mark_fresh_adapter(get_peft_model(model, peft_config))  # its KL reference: the base, as TRL's


def _disable_dropout(model) -> None:
    """As TRL: every dropout module of the policy (LoRA's included) at p = 0."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def check_peft_targets(model, targets: list[str]) -> None:
    """peft's rule for a list of target_modules: names matching no layer are allowed while one matches (scripts
    written for several architectures list e.g. `dense` beside `q_proj`); a warning names both. None matching is
    an error listing the model's linear layers. (The native config, model.lora_target_modules, stays strict.)"""
    from ..models import ModelError, match_lora_targets, validate_lora_targets

    found, missing = match_lora_targets(model, targets)
    if not found:
        try:
            validate_lora_targets(model, targets)
        except ModelError as e:
            raise ValueError(str(e).replace("model.lora_target_modules", "peft_config.target_modules")) from None
    if missing:
        warn(f"peft_config.target_modules: {', '.join(missing)} match no layer of this model "
             f"({type(model).__name__}) and are skipped, as peft does; LoRA goes on {', '.join(found)}")


def record_lora(mcfg, model, disable_dropout: bool) -> None:
    """The prepared model's LoRA settings into the translated config's model section (mathgrpo's records)."""
    from ..models import match_lora_targets

    mcfg.lora = is_peft(model)
    if not mcfg.lora:
        return
    lc = model.peft_config[model.active_adapter]
    targets = lc.target_modules
    mcfg.lora_r, mcfg.lora_alpha = lc.r, lc.lora_alpha
    mcfg.lora_dropout = 0.0 if disable_dropout else lc.lora_dropout
    # peft resolves "all-linear" into module paths; the short names select the same layers
    mcfg.lora_target_modules = [targets] if isinstance(targets, str) else \
        match_lora_targets(model, sorted({name.rsplit(".", 1)[-1] for name in targets}))[0]


def is_peft(model) -> bool:
    """Deliberately peft's own class, not `modelinfo.is_peft`: TRL 1.16 asks accelerate's `is_peft_model`, an
    isinstance of `PeftModel`, so a transformers model carrying an adapter through its PEFT integration (it has a
    `peft_config` too) is no peft model to TRL, and the door treats it as TRL does."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def is_kbit(model) -> bool:
    return any(is_quantized_linear(m) for m in model.modules())


def _unmark_gguf(model) -> None:
    """A model loaded from a GGUF file keeps transformers' GGUF quantizer attached even when its weights were
    dequantised into plain Linear layers (as on CPU): the marker alone makes transformers refuse to train or save
    it (TRL refuses it too). mathgrpo trains the dequantised weights, so the marker goes; weights still packed in
    GGUF blocks (transformers' `kernels` path) are refused with the way out."""
    q = getattr(model, "hf_quantizer", None)
    if type(q).__name__ != "GgufHfQuantizer":
        return
    if any(not p.is_floating_point() for p in model.parameters()):
        raise ValueError("the model holds GGUF-packed weights, which cannot be trained: load it with "
                         "quantization_config=GgufConfig(dequantize=True), or pass the .gguf path as model=")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
