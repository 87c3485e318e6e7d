"""Forward passes of the `fast` engine over `GenWeights` and a static KV cache.

Cache layout: k, v each [layers, rows, kv_heads, capacity, head_dim]. Prompts are left-padded to a
common width P, so every row writes decode step i at the same column P + i (one `index_copy_` per
layer, graph-safe with a device index); each row's own position (for RoPE) is its prompt length + i,
and a per-row additive mask hides its left padding.

Decode attention reads only the first S columns of the cache (S = the current length rounded up
to a bucket), so its cost grows with the real length; grouped-query heads are folded into the
query-length axis ([B, kv_heads, group, D] against [B, kv_heads, S, D]), which needs no repeated K/V
and no causal mask for a single new token.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .fast_sampling import compile_static
from .fast_weights import Dequant, GenWeights, LayerWeights, LowRank


def rope_table(decoder, length: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, head_dim] from the model's own rotary module (so every rope_type/scaling applies)."""
    pos = torch.arange(length, device=device)[None]
    cos, sin = decoder.rotary_emb(torch.zeros(1, device=device), pos)
    return cos[0].to(dtype), sin[0].to(dtype)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def _add_rms(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float):
    """Residual add then RMSNorm: (x + r, norm(x + r))."""
    x = x + r
    return x, _rms(x, w, eps)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def _glu(gate: torch.Tensor, up: torch.Tensor, act) -> torch.Tensor:
    return act(gate) * up


# The pointwise pieces between the matmuls. `compiled_ops()` gives torch.compile'd versions (one fused
# Triton kernel each instead of several eager ones) for the fixed-shape decode step on CUDA.
EAGER_OPS = {"rms": _rms, "add_rms": _add_rms, "rope": _rope, "glu": _glu}


def compiled_ops(pdl: bool = False) -> dict:
    """pdl: the compiled kernels take programmatic dependent launch (fast_kernels' module docstring)."""
    return {name: compile_static(fn, pdl) for name, fn in EAGER_OPS.items()}


def _project(x: torch.Tensor, ws: list[torch.Tensor], bs: list[torch.Tensor | None],
             lora: LowRank | None = None, lin=F.linear) -> torch.Tensor:
    """Output of a projection group, concatenated ([q; k; v], [gate; up]): one matmul when fused, plus the
    unmerged LoRA delta (two small matmuls for the whole group) when there is one. lin: the matmul
    (F.linear, or fast_matmul.linear on the decode step's table-driven path)."""
    outs = [lin(x, w() if isinstance(w, Dequant) else w, b) for w, b in zip(ws, bs)]
    y = outs[0] if len(outs) == 1 else torch.cat(outs, -1)
    if lora is not None:
        y = y + F.linear(F.linear(x, lora.A), lora.B)
    return y


def _project_parts(x: torch.Tensor, ws: list, bs: list, lora: LowRank | None, sizes: list[int] | None = None,
                   lin=F.linear):
    """The group's outputs one per module (q, k, v; gate, up): views of the fused output (split by `sizes`, or
    in equal halves), or the separate matmuls' own outputs (no concatenation)."""
    if len(ws) == 1 or lora is not None:
        y = _project(x, ws, bs, lora, lin)
        return y.split(sizes, -1) if sizes else y.chunk(2, -1)
    return [lin(x, w() if isinstance(w, Dequant) else w, b) for w, b in zip(ws, bs)]


def _attention_inputs(L: LayerWeights, w: GenWeights, h: torch.Tensor, cos, sin, ops):
    """q [.., H, D] and k, v [.., KV, D] after the q/k norms (Qwen3) and RoPE."""
    H, KV, D = w.n_heads, w.n_kv, w.head_dim
    qkv = _project(h, L.qkv, L.qkv_bias, L.qkv_lora, ops.get("linear", F.linear)).unflatten(-1, (H + 2 * KV, D))
    qk, v = qkv[..., :H + KV, :], qkv[..., H + KV:, :]
    if L.q_norm is not None:
        rms = ops["rms"]
        qk = torch.cat((rms(qk[..., :H, :], L.q_norm, w.eps), rms(qk[..., H:, :], L.k_norm, w.eps)), -2)
    qk = ops["rope"](qk, cos, sin)  # q and k rotated together
    return qk[..., :H, :], qk[..., H:, :], v


def _mlp(L: LayerWeights, w: GenWeights, h: torch.Tensor, ops) -> torch.Tensor:
    lin = ops.get("linear", F.linear)
    g = ops["glu_mm"](L, w.act, h) if "glu_mm" in ops else None  # fast_matmul's matmul + SwiGLU, where it has one
    if g is None:
        g = ops["glu"](*_project_parts(h, L.gate_up, L.gate_up_bias, L.gate_up_lora, lin=lin), w.act)
    return _project(g, [L.down], [L.down_bias], L.down_lora, lin)


Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Attention = Callable[[int, LayerWeights, torch.Tensor], torch.Tensor]


def reference_attention(w: GenWeights, cos: torch.Tensor, sin: torch.Tensor, attend: Attend,
                        ops: dict = EAGER_OPS) -> Attention:
    """Layer attention in plain torch: q/k/v projection, norms, RoPE, then `attend(layer, q, k, v) -> [.., H*D]`."""
    return lambda i, L, h: attend(i, *_attention_inputs(L, w, h, cos, sin, ops))


def run_layers(w: GenWeights, x: torch.Tensor, attention: Attention, ops: dict = EAGER_OPS) -> torch.Tensor:
    """x [.., hidden] -> final-normed hidden [.., hidden]; `attention(layer, weights, normed x) -> [.., H*D]`."""
    add_rms, lin = ops["add_rms"], ops.get("linear", F.linear)
    h = ops["rms"](x, w.layers[0].ln1, w.eps)
    for i, L in enumerate(w.layers):
        x, h = add_rms(x, _project(attention(i, L, h), [L.o], [L.o_bias], L.o_lora, lin), L.ln2, w.eps)
        nxt = w.layers[i + 1].ln1 if i + 1 < len(w.layers) else w.norm  # next norm fused with this residual
        x, h = add_rms(x, _mlp(L, w, h, ops), nxt, w.eps)
    return h


def _silu(act) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def glu_weights(L: LayerWeights, act) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(gate, up) where a layer's gate/up can take a matmul with a SwiGLU epilogue (plain tensors, no LoRA pair,
    no bias, SiLU; the owned fused copy's halves or the model's separate tensors), else None."""
    gu = L.gate_up
    if (L.gate_up_lora is not None or not all(isinstance(t, torch.Tensor) and t.stride(-1) == 1 for t in gu)
            or any(b is not None for b in L.gate_up_bias) or not _silu(act)):
        return None
    if len(gu) == 2:
        return gu[0], gu[1]
    return tuple(gu[0].chunk(2, 0)) if gu[0].shape[0] % 2 == 0 else None


def logits_into(w: GenWeights, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[:b] <- lm_head(h) for h [b, hidden] (written in place: a static buffer under CUDA graphs)."""
    out = out[:h.shape[0]]
    torch.mm(h, w.lm_head.t(), out=out)
    if w.lm_head_bias is not None:
        out.add_(w.lm_head_bias)
    return out


def prefill(w: GenWeights, kc: torch.Tensor, vc: torch.Tensor, ids: torch.Tensor, lens: torch.Tensor,
            counts: torch.Tensor, row0: int, cos_t: torch.Tensor, sin_t: torch.Tensor) -> torch.Tensor:
    """Run left-padded prompts ids [u, P] (real lengths lens [u]) and write their K/V, each repeated
    counts[j] times, into cache rows row0 ... row0 + sum(counts). Returns last-position hidden [u, hidden]."""
    u, P = ids.shape
    H, D = w.n_heads, w.head_dim
    cols = torch.arange(P, device=ids.device)
    pad = (P - lens)[:, None]  # [u, 1]
    pos = (cols[None] - pad).clamp(min=0)  # [u, P]
    key_ok = cols[None] >= pad  # [u, P]
    causal = cols[:, None] >= cols[None]  # [P, P]
    # A padded query row sees only itself: keeps softmax finite; its output is never used.
    mask = (causal[None] & key_ok[:, None, :]) | torch.eye(P, dtype=torch.bool, device=ids.device)[None]
    rows = int(counts.sum())
    expand = rows != u

    def attend(i, q, k, v):  # q [u, P, H, D]; k, v [u, P, KV, D]
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [u, KV, P, D]
        kc[i, row0:row0 + rows, :, :P] = k.repeat_interleave(counts, 0) if expand else k
        vc[i, row0:row0 + rows, :, :P] = v.repeat_interleave(counts, 0) if expand else v
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask[:, None], scale=w.scaling,
                                           enable_gqa=True)  # [u, H, P, D]
        return o.transpose(1, 2).reshape(u, P, H * D)

    x = F.embedding(ids, w.embed)
    h = run_layers(w, x, reference_attention(w, cos_t[pos][:, :, None, :], sin_t[pos][:, :, None, :], attend))
    return h[:, -1]


def decode_step(w: GenWeights, kc: torch.Tensor, vc: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor,
                col: torch.Tensor, pad: torch.Tensor, n_cols: int, cos_t: torch.Tensor,
                sin_t: torch.Tensor, ops: dict = EAGER_OPS, splits: int = 0) -> torch.Tensor:
    """One token per row: tokens, pos, pad [B]; col [1] the cache column to write (same for all rows).
    Attends over cache columns [pad_b, col]. Returns hidden [B, hidden].

    splits > 0: the Triton path (ops["rope_write"]: RoPE + KV write in one kernel, ops["attend"]: flash-decoding
    over `splits` slices of the filled columns; n_cols unused); splits == 0: the reference path (SDPA over the
    first n_cols columns with a mask). ops (fast_plan.decode_ops): the pointwise pieces, and the matmuls
    ("linear", "glu_mm") where the kernel plan takes fast_matmul's table."""
    B = tokens.shape[0]
    H, KV, D = w.n_heads, w.n_kv, w.head_dim
    x = F.embedding(tokens, w.embed)  # [B, hidden]
    if splits:
        sizes = [H * D, KV * D, KV * D]

        def attention(i, L, h):
            lin = ops.get("linear", F.linear)
            q, k, v = _project_parts(h, L.qkv, L.qkv_bias, L.qkv_lora, sizes, lin)
            q = ops["rope_write"](q, k, v, cos_t, sin_t, pos, L.q_norm, L.k_norm, w.eps, kc[i], vc[i], col, H, KV)
            return ops["attend"](q, kc[i], vc[i], pad, col, w.scaling, splits)

        return run_layers(w, x, attention, ops)
    cols = torch.arange(n_cols, device=tokens.device)
    ok = (cols[None] >= pad[:, None]) & (cols[None] <= col)  # [B, S]
    bias = torch.zeros(ok.shape, dtype=w.dtype, device=tokens.device).masked_fill_(~ok, float("-inf"))
    bias = bias[:, None, None, :]  # [B, 1, 1, S]

    def attend(i, q, k, v):  # q [B, H, D]; k, v [B, KV, D]
        kc[i, :B].index_copy_(2, col, k[:, :, None])
        vc[i, :B].index_copy_(2, col, v[:, :, None])
        qg = q.reshape(B, KV, H // KV, D)  # query heads of one KV head act as that head's query rows
        o = F.scaled_dot_product_attention(qg, kc[i, :B, :, :n_cols], vc[i, :B, :, :n_cols], attn_mask=bias,
                                           scale=w.scaling)  # [B, KV, G, D]
        return o.reshape(B, H * D)

    return run_layers(w, x, reference_attention(w, cos_t[pos][:, None, :], sin_t[pos][:, None, :], attend, ops), ops)
