"""Where an update's GPU time goes, the same way for mathgrpo and TRL (benchmarks.update, benchmarks.step prof=1).

    with PassCounter(model) as passes, profiled() as prof:
        run_one_update()
    out = dict(kernel_breakdown(prof, wall_s, lora_rank=32), **passes.summary())

`kernel_breakdown` sums GPU kernel time by kind from kernel names (bitsandbytes dequantisation, matmuls, attention,
the fused lm_head kernels, optimizer, copies / casts, other elementwise, other Triton kernels, the rest), splits
off the LoRA matmuls by their operands' shapes (one dimension equal to the rank) and reports the GPU's idle time
(wall minus kernel time). `PassCounter` counts the model body's forward calls (with and without grad: policy and
reference / old-policy passes, and their tokens) and the first decoder layer's (its extra calls are activation-
checkpoint recomputes in the backward).
"""

from __future__ import annotations

import contextlib
import time

from benchmarks.common import sync

KINDS = ("dequant", "matmul", "lora_matmul", "attention", "lmhead", "optimizer", "copy", "elementwise", "triton",
         "other")


def kernel_kind(name: str) -> str:
    n = name.lower()
    if "dequant" in n:
        return "dequant"
    if n.startswith(("_lse_fwd", "_dz_bwd")):
        return "lmhead"
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "attn")):
        return "attention"
    if any(k in n for k in ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "sm90_")):
        return "matmul"
    if any(k in n for k in ("multi_tensor", "adam", "foreach")):
        return "optimizer"
    if any(k in n for k in ("copy", "memcpy", "memset")):
        return "copy"
    if any(k in n for k in ("elementwise", "vectorized", "reduce", "unrolled")):
        return "elementwise"
    if "triton" in n or n.startswith("_"):
        return "triton"
    return "other"


@contextlib.contextmanager
def profiled():
    """torch.profiler over the block (CPU + CUDA, operand shapes recorded for the LoRA split)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        yield prof


def _device_us(e, self_only: bool = True) -> float:
    if self_only:
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
    return getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)


def kernel_breakdown(prof, wall_s: float, lora_rank: int | None = None, top: int = 15) -> dict:
    """GPU seconds by kernel kind, GPU idle, kernel launches, the top kernels; LoRA matmuls moved out of matmul."""
    import torch

    kinds = dict.fromkeys(KINDS, 0.0)
    launches = 0
    kernels = []
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA or "#" in e.key:
            continue  # "Optimizer.step#AdamW.step": a user annotation's GPU range over kernels counted already
        s = _device_us(e) / 1e6
        kinds[kernel_kind(e.key)] += s
        launches += e.count
        kernels.append((s, e.count, e.key[:100]))
    if lora_rank:  # the matmul ops (CPU side, shapes known) with an operand of the rank: LoRA's A, B and their grads
        for e in prof.key_averages(group_by_input_shape=True):
            if e.key in ("aten::mm", "aten::addmm", "aten::bmm") and any(
                    lora_rank in (shape or []) for shape in (e.input_shapes or [])):
                s = _device_us(e, self_only=False) / 1e6
                kinds["lora_matmul"] += s
                kinds["matmul"] -= s
    busy = sum(kinds.values())
    return dict(wall_s=round(wall_s, 4), gpu_busy_s=round(busy, 4), idle_s=round(wall_s - busy, 4),
                kernel_launches=launches, **{f"{k}_s": round(v, 4) for k, v in kinds.items()},
                top=[dict(s=round(s, 4), n=c, kernel=k) for s, c, k in sorted(kernels, reverse=True)[:top]])


def profile_call(run, lora_rank: int | None = None) -> dict:
    """One call of `run` under the profiler (synchronised): its kernel breakdown."""
    with profiled() as prof:
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        wall = time.perf_counter() - t0
    return kernel_breakdown(prof, wall, lora_rank)


class PassCounter:
    """Counts forward calls of the model body (split by grad mode, with their tokens) and of its first decoder
    layer's MLP while active: calls beyond body calls are checkpoint recomputes."""

    def __init__(self, model):
        from mathgrpo.modelinfo import backbone_and_head

        self.body, _ = backbone_and_head(model)
        # the first layer's MLP: checkpointing replays the layer's `forward` (transformers wraps forward, not
        # __call__, so a hook on the layer itself would not see the replay); its MLP's call is seen either way
        self.layer = self.body.layers[0].mlp
        self.counts = dict(grad_passes=0, no_grad_passes=0, grad_tokens=0, no_grad_tokens=0, layer0_calls=0)
        self._hooks = []

    def _body_hook(self, module, args, kwargs):
        import torch

        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        n = ids.numel() if ids is not None else (emb.shape[0] * emb.shape[1] if emb is not None else 0)
        key = "grad" if torch.is_grad_enabled() else "no_grad"
        self.counts[f"{key}_passes"] += 1
        self.counts[f"{key}_tokens"] += int(n)

    def _layer_hook(self, module, args):
        self.counts["layer0_calls"] += 1

    def __enter__(self):
        self._hooks = [self.body.register_forward_pre_hook(self._body_hook, with_kwargs=True),
                       self.layer.register_forward_pre_hook(self._layer_hook)]
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def summary(self) -> dict:
        c = dict(self.counts)
        c["recomputes"] = c["layer0_calls"] - c["grad_passes"] - c["no_grad_passes"]
        return c


class Recording:
    """`profile_call` split in two, for code that only offers callbacks (TRL's TrainerCallback): start() ...
    stop() -> the kernel breakdown and the pass counts of what ran between them."""

    def __init__(self, model, lora_rank: int | None = None):
        self.model, self.lora_rank = model, lora_rank

    def start(self) -> None:
        self._stack = contextlib.ExitStack()
        self._passes = self._stack.enter_context(PassCounter(self.model))
        self._prof = self._stack.enter_context(profiled())
        sync()
        self._t0 = time.perf_counter()

    def stop(self) -> dict:
        sync()
        wall = time.perf_counter() - self._t0
        self._stack.close()
        return dict(kernel_breakdown(self._prof, wall, self.lora_rank), **self._passes.summary())
