"""The decode step's projections with their neighbours fused in, on fast_matmul's skinny-matmul kernel.

At decode time a layer's matmuls have 1-64 rows and each pointwise kernel between them costs 1.3-2 us inside a
CUDA graph (measured on the H200, docs/benchmarks.md). Three fused forms replace RMSNorm, SwiGLU, the bias and
the residual adds of a layer (10 kernels a layer with the attention pair become 7):

- `norm_linear`: RMSNorm(x) @ W.T (+ b) (q/k/v), the norm as the kernel's prologue (kind "norm");
- `norm_glu`: SiLU(RMSNorm(x) @ Wg.T) * (RMSNorm(x) @ Wu.T) (gate/up + SwiGLU; kind "norm_glu"): gate and up
  read through two pointers, so the owned fused copy ([gate; up]) and the model's separate tensors both work;
- `linear_residual`: x += a @ W.T (+ b), in place (o and down; kind "res").

Measured on the H200, the RMSNorm prologue makes the kernel slower than cuBLAS plus the kernels it saves, so
fast_matmul.TABLE has no "norm", "norm_glu" or "res" rows and the default decode path takes none of these
(it takes fast_matmul's plain kernel and its SwiGLU epilogue, through the reference layers in fast_forward).
Whether a group takes its fused kernel is fast_matmul.TABLE's call per (kind, N, K, row bucket) (`config`);
with `force` (FastRollout(fused_linear=True)) a shape the table lacks takes `fast_matmul.default_config`. A group
that `plain` rejects (low-rank LoRA pairs, weights dequantised per use, a bias on gate/up, a non-SiLU
activation) or the table does not cover takes the reference ops (cuBLAS and the pointwise kernels).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import fast_matmul as FM
from .fast_weights import LayerWeights

MAX_ROWS = FM.MAX_ROWS


def config(kind: str, x: torch.Tensor, w: torch.Tensor, force: bool = False) -> FM.Config | None:
    """The kernel configuration of a fused `kind` for x [M, K] @ w [N, K].T, None for the reference ops."""
    if not FM.usable(x, w, any_dtype=force):
        return None
    cfg = FM.choose(kind, x.shape[0], *w.shape)
    return cfg or (FM.default_config(*w.shape) if force and FM.bucket(x.shape[0]) else None)


def norm_linear(x: torch.Tensor, ln: torch.Tensor, ws: list[torch.Tensor], bs: list, eps: float,
                cfgs: list[FM.Config]) -> torch.Tensor:
    """RMSNorm(x; ln) @ [W_1; W_2; ...].T (+ biases) for x [M, K] -> [M, sum N_i] (one launch per tensor)."""
    sizes = [w.shape[0] for w in ws]
    y = torch.empty(x.shape[0], sum(sizes), dtype=x.dtype, device=x.device)
    for w, b, cfg, part in zip(ws, bs, cfgs, y.split(sizes, -1)):
        FM.launch(x, w, b, cfg, out=part, ln=ln, eps=eps)
    return y


def norm_glu(x: torch.Tensor, ln: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, eps: float,
             cfg: FM.Config) -> torch.Tensor:
    """SiLU(RMSNorm(x) @ gate.T) * (RMSNorm(x) @ up.T) for x [M, K], gate/up [I, K] (same strides) -> [M, I]."""
    return FM.launch(x, gate, None, cfg, w2=up, ln=ln, eps=eps)


def linear_residual(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, x: torch.Tensor,
                    cfg: FM.Config) -> torch.Tensor:
    """x += a @ w.T (+ b), in place, for a [M, K], w [N, K], x [M, N]; returns x."""
    return FM.launch(a, w, b, cfg, residual=x)


# ----- which groups take the kernels ----------------------------------------------------------------------

def _tensors(ws: list) -> bool:
    return all(isinstance(t, torch.Tensor) and t.stride(-1) == 1 for t in ws)


def _silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def plain(L: LayerWeights, act) -> dict[str, bool]:
    """Per projection group of a layer: whether its weights can go through these kernels."""
    gu = L.gate_up
    return {"qkv": L.qkv_lora is None and _tensors(L.qkv),
            "o": L.o_lora is None and _tensors([L.o]),
            "gate_up": (L.gate_up_lora is None and _tensors(gu) and all(b is None for b in L.gate_up_bias)
                        and _silu(act) and (len(gu) == 2 or gu[0].shape[0] % 2 == 0)),
            "down": L.down_lora is None and _tensors([L.down])}


def gate_up_of(L: LayerWeights) -> tuple[torch.Tensor, torch.Tensor]:
    gu = L.gate_up
    return (gu[0], gu[1]) if len(gu) == 2 else tuple(gu[0].chunk(2, 0))


def layer_configs(L: LayerWeights, act, x: torch.Tensor, force: bool = False) -> dict:
    """Per group of one layer at x's rows: the fused kernel's configuration(s), or None (reference ops)."""
    ok = plain(L, act)
    q = [config("norm", x, w, force) for w in L.qkv] if ok["qkv"] else [None]
    gate = gate_up_of(L)[0] if ok["gate_up"] else None
    return {"qkv": q if all(c is not None for c in q) else None,
            "o": config("res", x, L.o, force) if ok["o"] else None,
            "gate_up": config("norm_glu", x, gate, force) if gate is not None else None,
            "down": config("res", x, L.down, force) if ok["down"] else None}


def any_fused(w, x: torch.Tensor, force: bool = False) -> bool:
    """Whether a batch of x's rows takes any fused kernel (else the reference layers, fast_matmul's plain
    table inside)."""
    return any(c is not None for c in layer_configs(w.layers[0], w.act, x, force).values())


_KERNEL = {"qkv": "RMSNorm + matmul", "o": "matmul + residual", "gate_up": "RMSNorm + matmul + SwiGLU",
           "down": "matmul + residual"}


def describe(w, device: torch.device, force: bool = False) -> dict[str, dict[str, str]]:
    """Which matmul each projection group of the decode step takes, per row bucket (CUDA-graph batches are
    multiples of 8 rows): a fused kernel (its config), fast_matmul's plain kernel, or cuBLAS."""
    L = w.layers[0]
    gu = gate_up_of(L)
    plain_shapes = {"qkv": [t.shape for t in L.qkv], "o": [L.o.shape], "gate_up": [t.shape for t in L.gate_up],
                    "down": [L.down.shape]}
    out: dict[str, dict[str, str]] = {g: {} for g in _KERNEL}
    for b in FM.BUCKETS[1:]:
        x = torch.empty(b, w.embed.shape[1], dtype=w.dtype, device=device)
        cfgs = layer_configs(L, w.act, x, force)
        for g in _KERNEL:
            c = cfgs[g]
            if c is not None:
                out[g][f"<={b} rows"] = f"{_KERNEL[g]}, {c[0] if isinstance(c, list) else c}"
                continue
            if g == "gate_up" and FM.usable(x, *gu) and FM.choose("glu", b, *gu[0].shape):
                out[g][f"<={b} rows"] = f"matmul + SwiGLU, {FM.choose('glu', b, *gu[0].shape)}"
                continue
            kinds = [str(FM.choose("mm", b, *s)) if FM.usable(x, x) and FM.choose("mm", b, *s) else "cuBLAS"
                     for s in plain_shapes[g]]
            out[g][f"<={b} rows"] = " | ".join(kinds) if set(kinds) != {"cuBLAS"} else "cuBLAS"
    for g in _KERNEL:
        out[g][f">{MAX_ROWS} rows"] = "cuBLAS"
    return out
