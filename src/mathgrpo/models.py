"""The policy as trained: loaded (loading.py: hub id, local folder or GGUF file; optional NF4), LoRA via peft,
checkpointing, fused kernels and LoRA adds, the KL reference and the completion log-prob pass.

    model, tok = load_model(cfg.model, trainable=True)          # policy with LoRA adapters
    model, tok = load_model(cfg.model, adapter="runs/x")         # a trained adapter for evaluation
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from pathlib import Path

import torch

from .config import ModelConfig
from .files import step_dirs
from .memory_plan import value
from .loading import load_base, load_tokenizer, pick_device, pick_dtype, say
from .modelinfo import (SHARDED_LOGPROBS, ModelError, backbone_and_head, base_model,  # noqa: F401 (re-exported)
                        compute_context, fusable_lora_classes, is_fresh_adapter, is_quantized_linear,
                        mark_fresh_adapter)
from .packing import no_mask_kwargs, to_device
from .qlora import nf4_lora_forward

log = logging.getLogger(__name__)


# --- LoRA -----------------------------------------------------------------------------------------------

def linear_layer_names(model) -> list[str]:
    """Short names of the model's linear layers (`q_proj`, ...), the names LoRA targets refer to."""
    names = set()
    for full, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) or is_quantized_linear(mod):
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def match_lora_targets(model, targets: list[str]) -> tuple[list[str], list[str]]:
    """(targets naming a module of `model`, targets naming none), by peft's rule for a list of names: a module
    matches a name when its path is the name or ends with "." + name."""
    modules = [n for n, m in model.named_modules()]
    found = [t for t in targets if any(n == t or n.endswith("." + t) for n in modules)]
    return found, [t for t in targets if t not in found]


def validate_lora_targets(model, targets: list[str]) -> None:
    available = linear_layer_names(model)
    _, missing = match_lora_targets(model, targets)
    if missing:
        raise ModelError(f"model.lora_target_modules: {', '.join(missing)} match no layer of this model "
                         f"({type(model).__name__}); its linear layers are: {', '.join(available)}")


def add_lora(model, cfg: ModelConfig):
    """Fresh LoRA adapters (fp32, peft's default) on a frozen base. For an NF4 base we deliberately skip
    peft's `prepare_model_for_kbit_training`: it upcasts embeddings, norms and lm_head to fp32 (+1.9 GB on
    a 1.5B model, fp32 activations everywhere), which bf16 compute does not need."""
    from peft import LoraConfig, get_peft_model

    validate_lora_targets(model, cfg.lora_target_modules)
    model.requires_grad_(False)
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), task_type="CAUSAL_LM", bias="none",
                      layers_to_transform=_last_layers(model, cfg.lora_layers))
    with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = mark_fresh_adapter(get_peft_model(model, lcfg))
    lora_inputs_follow_autocast(model)
    return model


def _last_layers(model, n: int | None) -> list[int] | None:
    """Indices of the last n decoder layers. Adapting only those means nothing below them needs a gradient,
    so autograd neither stores their activations nor runs their backward: on a CPU this is most of the
    update's cost."""
    if n is None:
        return None
    total = model.config.num_hidden_layers
    if not 1 <= n <= total:
        raise ModelError(f"model.lora_layers: {n} is not between 1 and the model's {total} layers")
    return list(range(total - n, total))


class _CastUnlessAutocast:
    """Stands in for peft's per-layer `cast_input_dtype_enabled` flag: true (cast the bf16 input to the
    fp32 adapter dtype) except under autocast, where the adapter matmuls run in bf16 anyway and the fp32
    copy of every LoRA input would only cost memory traffic. Being evaluated at call time, it also holds
    during gradient-checkpoint recomputation, which torch replays under the forward's autocast state."""

    def __bool__(self) -> bool:
        return not (torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu"))


def lora_inputs_follow_autocast(model) -> int:
    """Install `_CastUnlessAutocast` on every peft LoRA layer; returns how many layers got it."""
    n = 0
    for mod in model.modules():
        if hasattr(mod, "cast_input_dtype_enabled"):
            mod.cast_input_dtype_enabled = _CastUnlessAutocast()
            n += 1
    return n


def load_model(cfg: ModelConfig, adapter: str | None = None, trainable: bool = False):
    """Returns (model, tokenizer). `trainable` adds fresh LoRA adapters (when cfg.lora) or unfreezes all."""
    device = pick_device(cfg)
    dtype = pick_dtype(cfg, device)
    tok = load_tokenizer(cfg)
    model = load_base(cfg, device, dtype)
    if adapter is not None:
        from peft import PeftModel

        path = resolve_adapter(adapter)
        say(f"loading LoRA adapter {path}")
        try:
            model = PeftModel.from_pretrained(model, path, is_trainable=trainable)
        except (RuntimeError, ValueError, KeyError) as e:
            raise ModelError(f"adapter {path} does not fit model {cfg.name_or_path}: {str(e)[:500]}") from None
        lora_inputs_follow_autocast(model)
    elif trainable and cfg.lora:
        model = add_lora(model, cfg)
    elif trainable:
        model.requires_grad_(True)
    if trainable and value(cfg.gradient_checkpointing, "model.gradient_checkpointing"):
        # Non-reentrant checkpointing needs no `enable_input_require_grads` (which would also make
        # backward compute a useless gradient for the embedding output).
        enable_checkpointing(model, keep_layers=cfg.gradient_checkpointing_keep_layers)
    if trainable and cfg.lora and cfg.lora_fused_add:
        fuse_lora_add(model)
    if cfg.fuse_kernels:
        fuse_kernels(model)
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model, tok


def enable_checkpointing(model, keep_layers: int = 0) -> None:
    """Non-reentrant activation checkpointing under either name: transformers 5 renamed the method (and its
    keyword, hence the positional argument); older releases only have `gradient_checkpointing_enable`.
    keep_layers: that many decoder layers, evenly spaced, keep their activations instead (no recompute)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    layers = backbone_and_head(model)[0].layers
    for i in spread(len(layers), keep_layers):
        layers[i].gradient_checkpointing = False  # transformers reads this flag per layer, at every forward


def spread(n: int, k: int) -> list[int]:
    """k of the indices 0..n-1, evenly spaced (k <= 0: none, k >= n: all)."""
    k = max(0, min(k, n))
    return [i * n // k for i in range(k)] if k else []


def resolve_adapter(path: str) -> str:
    """A run dir, a checkpoint dir, or a peft adapter folder -> the adapter folder."""
    p = Path(path)
    for cand in (p, p / "adapter", p / "final" / "adapter"):
        if (cand / "adapter_config.json").is_file():
            return str(cand)
    ckpts = step_dirs(p / "checkpoints")
    if ckpts and (ckpts[-1] / "adapter" / "adapter_config.json").is_file():
        return str(ckpts[-1] / "adapter")
    raise ModelError(f"no LoRA adapter found in {p} (looked for adapter_config.json in it, in adapter/ "
                     f"and in the last checkpoint)")


def fuse_kernels(model) -> None:
    """Swap RMSNorm, SwiGLU and RoPE of a Llama/Qwen2/Qwen3/Mistral policy for liger-kernel's fused Triton
    kernels (fewer memory passes in the update's forward, recompute and backward; the same math). CUDA
    only; LoRA-wrapped projections stay as they are, and the lm_head is untouched (we never build logits)."""
    base = base_model(model)
    if base.device.type != "cuda":
        raise ModelError("fuse_kernels: liger-kernel's Triton kernels need a CUDA model")
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        raise ModelError("fuse_kernels needs liger-kernel: pip install liger-kernel") from None
    _apply_liger_kernel_to_instance(model=base, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


def fuse_lora_add(model, on: bool = True, qlora: bool = True) -> int:
    """LoRA's delta as one GEMM that accumulates into the base layer's output, y = addmm(W x, A x, s B^T),
    instead of peft's `y + B(A x) * s` (a matmul, then a scale pass and an add pass over the whole output
    in the forward, and the scale's pass again in the backward: on the 1.5B update these elementwise passes
    over the 8,960-wide MLP outputs cost more than the LoRA matmuls). Same math; one adapter, plain LoRA
    (no DoRA/variants, no LoRA bias, no mixed-adapter batches) takes this path, anything else peft's own.
    Installed per layer (an instance `forward`); on=False removes it. Returns the number of layers. Also on
    peft's LoRA over a bitsandbytes 4-bit base (`Linear4bit`), whose forward adds a defensive copy of the base
    output besides those passes (addmm writes a new tensor: nothing is modified in place). There, with qlora
    (the default), the whole projection runs as one autograd node instead (`qlora.NF4LoRA`: fewer Python frames
    and nodes on a host-bound update), this addmm path then peft's covering what it does not."""
    import types

    n, classes = 0, fusable_lora_classes()
    for mod in model.modules():
        if type(mod) in classes:
            if on:
                nf4 = qlora and is_quantized_linear(mod.get_base_layer())  # 4-bit: 8-bit is not in `classes`
                mod.forward = types.MethodType(_qlora_forward if nf4 else _lora_addmm_forward, mod)
            else:
                mod.__dict__.pop("forward", None)
            n += 1
    return n


def _lora_addmm_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    names = [a for a in self.active_adapters if a in self.lora_A]
    if (args or kwargs or self.disable_adapters or self.merged or len(names) != 1
            or names[0] in getattr(self, "lora_variant", {}) or self.lora_B[names[0]].bias is not None):
        return type(self).forward(self, x, *args, **kwargs)
    a = names[0]
    result = self.base_layer(x)  # [..., out]
    lora_a, lora_b, scale = self.lora_A[a], self.lora_B[a], self.scaling[a]
    h = lora_a(self.lora_dropout[a](self._cast_input_dtype(x, lora_a.weight.dtype)))  # [..., r]
    if not torch.is_autocast_enabled(x.device.type) and not result.dtype == h.dtype == lora_b.weight.dtype:
        return (result + lora_b(h) * scale).to(result.dtype)  # mixed dtypes outside autocast: as peft
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), lora_b.weight.t(), alpha=scale)
    return out.view(result.shape)


def _qlora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    out = None if args or kwargs else nf4_lora_forward(self, x)
    return _lora_addmm_forward(self, x, *args, **kwargs) if out is None else out


# --- the pieces the loss needs ----------------------------------------------------------------------------

class Reference:
    """Log-probs under the KL reference, as TRL 1.16 chooses it: fresh LoRA adapters made from a config in this run
    (modelinfo.is_fresh_adapter; whatever their initialisation, a non-zero B included) -> the same model with
    adapters off, the base; an adapter handed in that already changes the model (a trained PeftModel) -> the same
    model with a frozen copy of its starting adapter weights swapped in (TRL's "ref" adapter); full FT -> a frozen
    copy (made from the unsharded policy; under FSDP2 the trainer then shards the copy like the policy)."""

    def __init__(self, model, beta: float, lora: bool):
        self.enabled = beta > 0
        self.copy = None
        self.adapter: dict[str, torch.Tensor] | None = None
        if self.enabled and not lora:
            self.copy = copy.deepcopy(model).eval().requires_grad_(False)
        elif self.enabled and not is_fresh_adapter(model) and adapter_changes_model(model):
            self.adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def sync(self, model, alpha: float) -> None:
        """Full fine-tuning: the reference copy becomes alpha x policy + (1 - alpha) x itself (TRL's
        SyncRefModelCallback); under FSDP2 both are sharded alike, so each rank mixes its own shards."""
        with torch.no_grad():
            for r, p in zip(self.copy.parameters(), model.parameters(), strict=True):
                r.mul_(1.0 - alpha).add_(p.detach(), alpha=alpha)

    def context(self, model):
        if self.copy is not None:
            return contextlib.nullcontext(self.copy)
        if self.adapter is not None:
            return _adapter_swapped(model, self.adapter)
        return _adapter_off(model)


def adapter_changes_model(model) -> bool:
    """Whether a peft model's LoRA adapters change its output at all: a fresh adapter has every B matrix zero
    (peft's default initialisation), so switching it off gives the very same model."""
    return any(("lora_B" in n or "lora_embedding_B" in n) and bool(p.detach().ne(0).any())
               for n, p in model.named_parameters())


@contextlib.contextmanager
def _adapter_swapped(model, saved: dict[str, torch.Tensor]):
    params = dict(model.named_parameters())
    with torch.no_grad():
        live = {n: params[n].detach().clone() for n in saved}
        for n, v in saved.items():
            params[n].copy_(v)
    try:
        yield model
    finally:
        with torch.no_grad():
            for n, v in live.items():
                params[n].copy_(v)


@contextlib.contextmanager
def _adapter_off(model):
    with model.disable_adapter():
        yield model


def merge_adapter(run_or_adapter: str, cfg: ModelConfig, out_dir: str, overwrite: bool = False) -> str:
    """Write base + adapter merged into one full model (for deployment) plus its tokenizer. A folder that holds
    files already is refused unless `overwrite` (files of the same name are then replaced, others kept)."""
    target = Path(out_dir)
    if target.exists() and not target.is_dir():
        raise ModelError(f"merge: {target} is a file, not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ModelError(f"merge: {target} is not empty ({len(list(target.iterdir()))} entries); the merged model "
                         f"would overwrite them: choose a new folder, or pass --overwrite")
    model, tok = load_model(cfg, adapter=run_or_adapter)
    say(f"merging the adapter into the base weights, writing {out_dir}")
    merged = model.merge_and_unload()
    out = Path(out_dir)
    merged.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def completion_hidden(model, prompt_ids: list[list[int]], completion_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states [B, T, H] that predict each completion token (state at position p-1+t for token t).

    prompt_ids: B unpadded prompts; completion_ids: [B, T] (right-padded). Rows are laid out prompt +
    completion, right-padded, with no attention mask: under causal attention a real token never sees the
    padding after it, and positions count from 0 as in (left-padded, masked) generation. Without a mask
    SDPA takes its causal flash kernel instead of a masked one.
    """
    body, head = backbone_and_head(model)
    device = head.weight.device
    n_rows, width = completion_ids.shape
    if len(prompt_ids) != n_rows:
        raise ValueError(f"completion_hidden: {len(prompt_ids)} prompts for {n_rows} completion rows")
    lens = [len(p) for p in prompt_ids]
    if min(lens, default=1) < 1:
        raise ValueError(f"completion_hidden: prompt {lens.index(0)} is empty (need >= 1 token to predict from)")
    ids = torch.zeros((n_rows, max(lens) + width), dtype=torch.long)  # [B, L]
    for i, p in enumerate(prompt_ids):
        ids[i, :lens[i]] = torch.tensor(p)
        ids[i, lens[i]:lens[i] + width] = completion_ids[i]
    with compute_context(model):
        hidden = body(input_ids=to_device(ids, device), use_cache=False, **no_mask_kwargs(body)).last_hidden_state
    index = to_device(torch.tensor(lens), device)[:, None] - 1 + torch.arange(width, device=device)  # [B, T]
    return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, T, H]


def completion_logprobs(model, prompt_ids: list[list[int]], completion_ids: torch.Tensor, *,
                        chunk_size: int = 1024, temperature: float = 1.0, with_entropy: bool | str = False,
                        lengths: list[int] | None = None):
    """Log-probs [B, T] float32 of each completion token under `model`, from hidden states in chunks of
    `chunk_size` tokens (no [B, T, V] logits, forward or backward). Arguments as `completion_hidden`.
    with_entropy: (log-probs, entropy [B, T] of each position's distribution) from the same pass; True: the entropy
    without gradient, "grad": with it (logprobs.chunked_token_logprobs).
    With `lengths` (real tokens per row) the rows run packed, without padding (`packing.py`; 0 after each
    row's end). A model sharded with FSDP2 runs the same pass as a forward of its root module, which gathers
    the embeddings and lm_head around it (`fsdp.shard_model` says why, and sets the pass as the model's
    `modelinfo.SHARDED_LOGPROBS` attribute, called here); every rank must call it then."""
    kw = {"with_entropy": with_entropy} if with_entropy else {}  # True, or "grad" (the entropy bonus)
    sharded = getattr(model, SHARDED_LOGPROBS, None)
    if sharded is not None:
        return sharded(prompt_ids, completion_ids, chunk_size=chunk_size, temperature=temperature,
                       lengths=lengths, **kw)
    return unsharded_completion_logprobs(model, prompt_ids, completion_ids, chunk_size=chunk_size,
                                         temperature=temperature, lengths=lengths, **kw)


def unsharded_completion_logprobs(model, prompt_ids: list[list[int]], completion_ids: torch.Tensor, *,
                                  chunk_size: int = 1024, temperature: float = 1.0, with_entropy: bool | str = False,
                                  lengths: list[int] | None = None):
    """`completion_logprobs` on parameters that are plain tensors (not sharded, or gathered by FSDP)."""
    from .logprobs import check_token_ids, chunked_token_logprobs

    if lengths is not None:
        from .packing import packed_completion_logprobs

        return packed_completion_logprobs(model, prompt_ids, completion_ids, lengths, chunk_size=chunk_size,
                                          temperature=temperature, with_entropy=with_entropy)
    _, head = backbone_and_head(model)
    # before the forward (an id past the embedding fails there unclearly); the update passes its host copy: no sync
    check_token_ids(completion_ids, head.weight.shape[0], "completion_logprobs")
    sel = completion_hidden(model, prompt_ids, completion_ids)  # [B, T, H]
    return chunked_token_logprobs(sel, head.weight, to_device(completion_ids, sel.device), chunk_size=chunk_size,
                                  temperature=temperature, lm_head_bias=getattr(head, "bias", None),
                                  with_entropy=with_entropy, check_ids=False)
