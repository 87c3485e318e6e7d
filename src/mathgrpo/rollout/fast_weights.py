"""Generation weights for the `fast` rollout engine, read out of a HF Llama/Qwen2-style causal LM.

Two ways to hold a weight:
- direct: a detached view of the model's own parameter (plain bf16/fp32 model, full fine-tuning).
  No copy; in-place optimizer steps show up in generation at once.
- owned: a buffer the engine fills itself, used when the model's tensor cannot be multiplied as is:
  a LoRA-wrapped module (W_gen = W_base + scale * B @ A, one `addmm` per module and adapter),
  a bitsandbytes 4/8-bit base (dequantised into the generation dtype on every refill, so the
  engine holds one bf16 copy and no second dequantised base), or a dtype cast. Owned q/k/v and
  gate/up are stored fused ([q; k; v] and [gate; up]) so a decode step makes one matmul of each.

LoRA has three modes (`lora_merge`), trading decode speed against GPU memory:
- copy (default): the owned merged copy above; fastest (fused q/k/v and gate/up), costs a bf16 copy of every
  adapted weight (2.4 GiB at 1.5B with all seven projections adapted).
- in_place: the base weights stay direct views; `merge_in_place` adds the deltas into them just before
  sampling and `restore` copies the untouched base back from a pinned host snapshot right after
  (fast_buffers.py; exact: subtracting the delta again would not round back to the same bf16 values). No GPU copy; the host
  holds one copy of the adapted base weights; each rollout pays one host-to-device copy of them.
- none: the base weights stay direct views and each group of projections that read the same input gets a
  `LowRank` pair, A = [A_1; A_2; ...] ([sum r, in]) and a block-diagonal B ([sum out, sum r], scales folded
  in): two small matmuls per group per decode step, no copy anywhere.
A bitsandbytes 4/8-bit base is dequantised into the owned copy with `copy`; with `in_place` or `none` it is
dequantised at every use instead (`Dequant`: no bf16 copy, slower decode) and its LoRA deltas are `LowRank`
pairs. Cast bases and LoRA layers that are not plain linear ones always take the copy path.

`refill` recomputes every owned buffer in place (same storage, so captured CUDA graphs stay valid);
the trainer calls it through `FastRollout.sync_weights` after each optimizer step.

Note: merging in bf16 rounds W + delta to bf16, as `merge_and_unload` does; vLLM-backed trainers
generate from merged bf16 weights the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
import torch.nn as nn

from ..modelinfo import base_model, is_lora_layer

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class LowRank:
    """An unmerged LoRA delta of a projection group: y += (x @ A.T) @ B.T."""

    A: torch.Tensor  # [sum r, in]
    B: torch.Tensor  # [sum out, sum r], block-diagonal, LoRA scaling folded in


@dataclass
class LayerWeights:
    qkv: list[torch.Tensor]  # one fused [(H+2KV)*D, hidden] or three (q, k, v)
    qkv_bias: list[torch.Tensor | None]
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: list[torch.Tensor]  # one fused [2I, hidden] or two (gate, up)
    gate_up_bias: list[torch.Tensor | None]
    down: torch.Tensor
    down_bias: torch.Tensor | None
    ln1: torch.Tensor
    ln2: torch.Tensor
    q_norm: torch.Tensor | None = None  # Qwen3 per-head norms
    k_norm: torch.Tensor | None = None
    qkv_lora: LowRank | None = None  # unmerged LoRA deltas (lora_merge=none)
    o_lora: LowRank | None = None
    gate_up_lora: LowRank | None = None
    down_lora: LowRank | None = None


@dataclass
class GenWeights:
    layers: list[LayerWeights]
    embed: torch.Tensor  # [V, hidden]
    norm: torch.Tensor
    lm_head: torch.Tensor  # [V, hidden]
    lm_head_bias: torch.Tensor | None
    n_heads: int
    n_kv: int
    head_dim: int
    eps: float
    scaling: float
    act: object
    window: int | None = None  # smallest sliding-window size of any layer (None: full attention everywhere)
    # (owned buffer, function that recomputes it in place) for every tensor the engine holds itself.
    recipes: list[tuple[torch.Tensor, Callable[[torch.Tensor], None]]] = field(default_factory=list)
    owned_bytes: int = 0
    # lora_merge=in_place: (base weight the engine reads, its LoRA module, pinned host snapshot of the weight)
    in_place: list[tuple[torch.Tensor, nn.Module, torch.Tensor]] = field(default_factory=list)
    # projection group (qkv, gate_up, o, down, embed, lm_head) -> how generation reads its weights
    plan: dict[str, str] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.dtype


class UnsupportedModel(ValueError):
    """The engine cannot read this model (its family, layout or adapter kind): generation.backend=auto takes hf."""


def causal_lm_parts(model: nn.Module):
    """(base causal LM, decoder) of a HF model or a peft PeftModel, after checking the family is supported."""
    base = base_model(model)
    mtype = getattr(getattr(base, "config", None), "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(f"FastRollout: model_type '{mtype}' is not supported "
                               f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)}); use generation.backend: hf")
    decoder = getattr(base, "model", None)
    for name in ("layers", "embed_tokens", "norm", "rotary_emb"):
        if not hasattr(decoder, name):
            raise UnsupportedModel(f"FastRollout: {type(base).__name__}.model has no '{name}'; unsupported layout")
    return base, decoder


LORA_MODES = ("copy", "in_place", "none")


def extract(model: nn.Module, dtype: torch.dtype | None = None, device: torch.device | None = None,
            fuse: bool = False, lora_merge: str = "copy") -> GenWeights:
    """Build generation weights; `fuse=True` copies q/k/v and gate/up into fused buffers even for a plain model;
    `lora_merge` says how LoRA deltas reach generation (copy | in_place | none, see the module docstring)."""
    if lora_merge not in LORA_MODES:
        raise ValueError(f"FastRollout: lora_merge must be one of {', '.join(LORA_MODES)}, got {lora_merge!r}")
    base, dec = causal_lm_parts(model)
    cfg = base.config
    dtype = dtype or _plain(dec.embed_tokens).weight.dtype
    device = torch.device(device) if device is not None else _plain(dec.embed_tokens).weight.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    env = _Env(dtype, device, lora_merge, recipes := [], in_place := [], plan := [])
    layers = []
    # Qwen2 sets a window per layer (None for full-attention layers); Mistral reads its config.
    windows = [w for w in (getattr(la.self_attn, "sliding_window", getattr(cfg, "sliding_window", None))
                           for la in dec.layers) if w]
    for layer in dec.layers:
        at, mlp = layer.self_attn, layer.mlp
        qkv, qkv_b, qkv_l = _group([at.q_proj, at.k_proj, at.v_proj], env, fuse, "qkv")
        gu, gu_b, gu_l = _group([mlp.gate_proj, mlp.up_proj], env, fuse, "gate_up")
        (o,), (o_b,), o_l = _group([at.o_proj], env, False, "o")
        (down,), (down_b,), down_l = _group([mlp.down_proj], env, False, "down")
        layers.append(LayerWeights(
            qkv=qkv, qkv_bias=qkv_b, o=o, o_bias=o_b, gate_up=gu, gate_up_bias=gu_b, down=down, down_bias=down_b,
            qkv_lora=qkv_l, o_lora=o_l, gate_up_lora=gu_l, down_lora=down_l,
            ln1=_vector(layer.input_layernorm.weight, env), ln2=_vector(layer.post_attention_layernorm.weight, env),
            q_norm=_vector(at.q_norm.weight, env) if hasattr(at, "q_norm") else None,
            k_norm=_vector(at.k_norm.weight, env) if hasattr(at, "k_norm") else None))
    merged = env._replace(mode="copy")  # a LoRA on the embedding or head (rare) is merged into a copy
    (embed,), _, _ = _group([dec.embed_tokens], merged, False, "embed")
    (lm_head,), (lm_b,), _ = _group([base.lm_head], merged, False, "lm_head")
    n_heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    ln = dec.layers[0].input_layernorm
    from transformers.activations import ACT2FN

    w = GenWeights(layers=layers, embed=embed, norm=_vector(dec.norm.weight, env), lm_head=lm_head,
                   lm_head_bias=lm_b, n_heads=n_heads, n_kv=getattr(cfg, "num_key_value_heads", None) or n_heads,
                   head_dim=head_dim, eps=getattr(ln, "variance_epsilon", getattr(ln, "eps", 1e-6)),
                   scaling=getattr(dec.layers[0].self_attn, "scaling", head_dim ** -0.5),
                   act=ACT2FN[cfg.hidden_act], window=min(windows) if windows else None, recipes=recipes,
                   in_place=in_place, plan={g: ", ".join(sorted({how for n, how in plan if n == g}))
                                            for g in dict.fromkeys(n for n, _ in plan)})
    w.owned_bytes = sum(d.numel() * d.element_size() for d, _ in recipes)
    refill(w)
    return w


@torch.no_grad()
def refill(w: GenWeights) -> None:
    """Recompute every owned buffer in place (base weight, dequantised, + LoRA deltas; cast copies)."""
    for dst, fill in w.recipes:
        fill(dst)


# ---------------------------------------------------------------------------------------------------------

def _plain(m: nn.Module) -> nn.Module:
    """The module whose weight generation should see, through peft's modules_to_save wrapper."""
    if hasattr(m, "modules_to_save") and hasattr(m, "original_module"):
        a = m.active_adapter
        a = a[0] if isinstance(a, (list, tuple)) and a else a
        if getattr(m, "disable_adapters", False) or a not in m.modules_to_save:
            return m.original_module
        return m.modules_to_save[a]
    return m


def _base(m: nn.Module) -> nn.Module:
    m = _plain(m)
    return m.get_base_layer() if is_lora_layer(m) else m


def _is_quantized(m: nn.Module) -> bool:
    return type(m.weight).__name__ in ("Params4bit", "Int8Params") or hasattr(m, "W_q")


class _Env(NamedTuple):
    dtype: torch.dtype
    device: torch.device
    mode: str  # lora_merge
    recipes: list
    in_place: list
    plan: list  # (group, how its weights are read), one entry per group and layer


class Dequant:
    """A bitsandbytes 4/8-bit base weight dequantised at every use (lora_merge=in_place|none): the engine keeps
    no bf16 copy of a quantized model, at the price of one dequantisation per projection and decode step."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        self.module, self.dtype = module, dtype

    def __call__(self) -> torch.Tensor:
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight(self.module).to(self.dtype)


def _live(m: nn.Module, env: _Env) -> bool:
    """A quantized base read through `Dequant` (not copied): in the in_place and none modes."""
    return _is_quantized(_base(m)) and env.mode != "copy"


def _merges(m: nn.Module, env: _Env) -> bool:
    """Whether this module's LoRA deltas must go into an owned copy of its weight (else in place, or a LowRank
    pair: a quantized base cannot take a delta in place)."""
    lora = _plain(m)
    if not is_lora_layer(lora):
        return False
    b = _base(m)
    if env.mode == "in_place" and not _is_quantized(b):
        return not (_low_rank_ok(lora) and (b.weight.dtype, b.weight.device) == env[:2])
    return env.mode == "copy" or not _low_rank_ok(lora)


def _low_rank_ok(lora: nn.Module) -> bool:
    return (not getattr(lora, "fan_in_fan_out", False)
            and all(isinstance(lora.lora_A[a], nn.Linear) for a in lora.lora_A))


def _needs_copy(m: nn.Module, env: _Env) -> bool:
    b = _base(m)
    if _is_quantized(b):
        return _merges(m, env) or not _live(m, env)
    return _merges(m, env) or (b.weight.dtype, b.weight.device) != (env.dtype, env.device)


def _out_features(m: nn.Module) -> int:
    b = _base(m)
    return b.weight.shape[0] if not _is_quantized(b) else b.out_features


def _in_features(m: nn.Module) -> int:
    b = _base(m)
    if isinstance(b, nn.Embedding):
        return b.embedding_dim
    return b.weight.shape[1] if not _is_quantized(b) else b.in_features


def _group(mods: list[nn.Module], env: _Env, fuse: bool, name: str):
    """Weights, biases and unmerged LoRA delta (or None) of modules that read the same input. Either every module
    is read as it is (a view, or `Dequant`) with its deltas added in place or kept as a `LowRank` pair, or the
    group gets one owned (fused) buffer with every delta merged into it. The choice goes into `env.plan`."""
    has_bias = [getattr(_base(m), "bias", None) is not None for m in mods]
    for m in mods:
        _check_lora(m)
    env.plan.append((name, _how(mods, env, fuse)))
    if not fuse and not any(_needs_copy(m, env) for m in mods):
        if env.mode == "in_place":
            env.in_place.extend(_snapshot(m) for m in mods if is_lora_layer(_plain(m)) and not _live(m, env))
        return ([Dequant(_base(m), env.dtype) if _live(m, env) else _base(m).weight.detach() for m in mods],
                [_vector(_base(m).bias, env) if hb else None for m, hb in zip(mods, has_bias)], _low_rank(mods, env))
    rows = [_out_features(m) for m in mods]
    buf = torch.empty(sum(rows), _in_features(mods[0]), dtype=env.dtype, device=env.device)

    def fill_weight(dst, mods=mods, rows=rows):
        for m, part in zip(mods, dst.split(rows)):
            _effective_into(m, part)

    env.recipes.append((buf, fill_weight))
    if not any(has_bias):
        return [buf], [None], None
    bias = torch.empty(sum(rows), dtype=env.dtype, device=env.device)

    def fill_bias(dst, mods=mods, rows=rows):
        for m, part in zip(mods, dst.split(rows)):
            part.copy_(_base(m).bias) if getattr(_base(m), "bias", None) is not None else part.zero_()

    env.recipes.append((bias, fill_bias))
    return [buf], [bias], None


def _how(mods: list[nn.Module], env: _Env, fuse: bool) -> str:
    """The plan entry of a group: how its weights are read and how LoRA deltas reach them."""
    lora = any(is_lora_layer(_plain(m)) for m in mods)
    if fuse or any(_needs_copy(m, env) for m in mods):
        quant = [_is_quantized(_base(m)) for m in mods]
        cast = any(not q and (_base(m).weight.dtype, _base(m).weight.device) != env[:2] for m, q in zip(mods, quant))
        notes = [n for n, on in (("LoRA merged", lora), ("dequantised", any(quant)), ("cast", cast)) if on]
        return ("owned fused copy" if len(mods) > 1 else "owned copy") + (f" ({', '.join(notes)})" if notes else "")
    read = "dequantised per use" if any(_live(m, env) for m in mods) else "model's own tensors"
    if not lora:
        return read + (" (separate matmuls)" if len(mods) > 1 else "")
    in_place = env.mode == "in_place" and not any(_live(m, env) for m in mods)
    return read + (" + deltas added in place while sampling" if in_place else " + low-rank LoRA matmuls")


def _snapshot(m: nn.Module) -> tuple[torch.Tensor, nn.Module, torch.Tensor]:
    """lora_merge=in_place: (the base weight, its LoRA module, a pinned host copy of the weight to restore from)."""
    weight = _base(m).weight.detach()
    host = torch.empty(weight.shape, dtype=weight.dtype, device="cpu", pin_memory=weight.device.type == "cuda")
    return weight, _plain(m), host.copy_(weight)


def _low_rank(mods: list[nn.Module], env: _Env) -> LowRank | None:
    """The group's unmerged LoRA pair: one column block per (module, adapter), every adapter the module knows,
    so that enabling/disabling adapters only changes what a refill writes (inactive ones are zero blocks)."""
    blocks = []  # (module index, lora module, adapter, rank)
    for j, m in enumerate(mods):
        lora = _plain(m)
        if is_lora_layer(lora) and (env.mode == "none" or _live(m, env)):
            blocks += [(j, lora, a, lora.lora_A[a].out_features) for a in lora.lora_A]
    if not blocks:
        return None
    rows = [_out_features(m) for m in mods]
    row0 = [sum(rows[:j]) for j in range(len(mods))]
    R = sum(b[3] for b in blocks)
    A = torch.empty(R, _in_features(mods[0]), dtype=env.dtype, device=env.device)
    B = torch.empty(sum(rows), R, dtype=env.dtype, device=env.device)

    def fill_a(dst):
        col = 0
        for _, lora, a, r in blocks:
            dst[col:col + r].copy_(lora.lora_A[a].weight)
            col += r

    def fill_b(dst):
        dst.zero_()
        col = 0
        for j, lora, a, r in blocks:
            if a in active_adapters(lora):
                block = dst[row0[j]:row0[j] + rows[j], col:col + r]
                block.copy_(lora.lora_B[a].weight).mul_(lora.scaling[a])
            col += r

    env.recipes.extend([(A, fill_a), (B, fill_b)])
    return LowRank(A, B)


def _vector(t: torch.Tensor, env: _Env) -> torch.Tensor:
    """Norm weights and biases: a view when dtype and device match, else an owned copy."""
    if (t.dtype, t.device) == (env.dtype, env.device):
        return t.detach()
    buf = torch.empty(t.shape, dtype=env.dtype, device=env.device)
    env.recipes.append((buf, lambda dst, src=t: dst.copy_(src)))
    return buf


def active_adapters(m: nn.Module) -> list[str]:
    if getattr(m, "disable_adapters", False) or getattr(m, "merged", False):
        return []  # merged: the base weight already holds the deltas
    known = set(m.lora_A) | set(getattr(m, "lora_embedding_A", {}))
    return [a for a in m.active_adapters if a in known]


def _check_lora(m: nn.Module) -> None:
    m = _plain(m)
    if not is_lora_layer(m):
        return
    for a in active_adapters(m):
        if getattr(m, "lora_variant", {}).get(a) is not None or getattr(m, "use_dora", {}).get(a, False):
            raise UnsupportedModel(f"FastRollout: adapter '{a}' on {type(m).__name__} uses a LoRA variant "
                                   "(e.g. DoRA); only plain LoRA can be merged into the generation weights")
        if getattr(m, "lora_bias", {}).get(a, False):
            raise UnsupportedModel(f"FastRollout: adapter '{a}' trains a LoRA bias, which is not supported")


def _effective_into(m: nn.Module, dst: torch.Tensor) -> None:
    """dst <- base weight (dequantised) + sum of active LoRA deltas; the first delta fused into the copy."""
    from peft.utils.integrations import dequantize_module_weight

    b = _base(m)
    w = dequantize_module_weight(b) if _is_quantized(b) else b.weight
    w = w.detach()
    lora = _plain(m)
    adapters = active_adapters(lora) if is_lora_layer(lora) else []
    plain_linear = all(isinstance(lora.lora_A[a], nn.Linear) if a in lora.lora_A else False for a in adapters)
    if adapters and plain_linear and not getattr(lora, "fan_in_fan_out", False):
        for j, a in enumerate(adapters):
            A = lora.lora_A[a].weight.to(dst.dtype)  # [r, in]
            B = lora.lora_B[a].weight.to(dst.dtype)  # [out, r]
            s = lora.scaling[a]
            if j == 0:
                torch.addmm(w.to(dst.dtype), B, A, alpha=s, out=dst)  # one pass: read base, write dst
            else:
                dst.addmm_(B, A, alpha=s)
        return
    dst.copy_(w.to(dst.dtype))
    for a in adapters:  # embeddings and other layouts: peft knows their delta's shape
        dst.add_(lora.get_delta_weight(a).to(dst.dtype))
