"""Which kernels the `fast` engine runs on a device: one plan, built once per device, read by the engine.

    plan = plan_for(torch.device("cuda"))            # from the card: capability, shared memory, bf16, Triton
    plan = plan_for(device, "conservative")          # the set for untuned cards, forced (tests, emulation)
    print(plan.line())                               # what FastRollout.describe() and the run's log report

Three sets (`generation.kernels`, or the MATHGRPO_KERNELS environment variable when the config says auto):
- tuned: the card the kernels were measured on (compute capability 9.0: H100, H200): Triton decode attention at
  the measured tiling, the skinny-matmul table (fast_matmul.TABLE: SwiGLU-epilogue gate/up and down at <= 16
  rows, cuBLAS elsewhere), programmatic dependent launch, the one-kernel token draw, compiled pointwise ops;
- conservative: any other card Triton supports (compute capability >= 7.0: T4, V100, A10G, L4, A100, RTX):
  the same attention kernel at a tiling whose shared memory fits 64 KiB a block (32 columns a step, 2 pipeline
  stages), cuBLAS for every matmul, no PDL, the draw kernel, compiled pointwise ops;
- torch: no Triton anywhere (SDPA attention, cuBLAS, torch's sampler ops, no torch.compile), CUDA graphs on a GPU:
  cards below compute capability 7.0 (P100), installs without Triton, CPU (eagerly there).
A kernel that fails to compile or launch (`KernelFailure`, raised through `guarded`) makes the engine switch to
the torch plan (`reference`) with a warning naming the kernel and the reason, and redo the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import torch

from ..devices import DeviceInfo, device_info
from . import fast_kernels, fast_matmul

KERNEL_SETS = ("auto", "conservative", "torch")
ENV = "MATHGRPO_KERNELS"  # forces a set where the config says auto (the tests and the small-card emulation use it)
TUNED_CAPABILITY = (9, 0)  # where fast_matmul.TABLE and attend's tiling were measured (H200; the H100 is the same sm)


@dataclass(frozen=True)
class KernelPlan:
    """kernels: the set taken (tuned | conservative | torch) and `reason`; cuda_graphs: decode steps captured;
    compile_pointwise: torch.compile'd norm/rope/activation and sampler pick; attention: triton | sdpa;
    kv_bucket: the sdpa path's attention length granularity (and the cache's capacity unit); block_n,
    attend_stages, min_chunk: attend's columns a block step, software-pipeline depth (None: Triton's default),
    columns a split at least (None: by batch); matmul: table (fast_matmul's kernel where `table` has the (kind, N, K, row bucket)) | cublas; prefetch: W
    chunks pulled toward L2 before a skinny matmul's PDL wait; pdl: programmatic dependent launch; sampler:
    triton (fast_draw's one-kernel draw for greedy / plain temperature) | torch."""

    device: DeviceInfo
    kernels: str
    reason: str
    cuda_graphs: bool
    compile_pointwise: bool
    attention: str
    kv_bucket: int
    matmul: str
    pdl: bool
    sampler: str
    block_n: int = 64
    attend_stages: int | None = None
    min_chunk: int | None = None
    prefetch: int = 0
    table: Mapping = field(default_factory=lambda: MappingProxyType({}), compare=False, repr=False)

    @property
    def uses_kernels(self) -> bool:
        """Whether anything beyond torch's own ops runs (a failure then has a reference path to fall back to)."""
        return (self.attention == "triton" or self.sampler == "triton" or self.compile_pointwise
                or self.matmul == "table")

    def line(self) -> str:
        """One line: the set, why, and what it runs."""
        att = (f"triton attention (block {self.block_n}"
               f"{f', {self.attend_stages} stages' if self.attend_stages else ''})" if self.attention == "triton"
               else "SDPA attention")
        cuda = self.device.type == "cuda"
        mm = (f"skinny-matmul table ({len(self.table)} entries) + cuBLAS" if self.matmul == "table"
              else "cuBLAS" if cuda else "torch matmuls")
        parts = [att, mm, f"{self.sampler} sampler"]
        if cuda:
            parts += ["PDL" if self.pdl else "no PDL", "CUDA graphs" if self.cuda_graphs else "no CUDA graphs"]
        parts.append("compiled pointwise ops" if self.compile_pointwise else "eager pointwise ops")
        return f"kernels {self.kernels} on {self.device.line()}: {self.reason}; " + ", ".join(parts)


class KernelFailure(RuntimeError):
    """A kernel failed to compile or launch: `kernel` names it, `reason` is the error's first line."""

    def __init__(self, kernel: str, error: BaseException):
        self.kernel = kernel
        self.reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        super().__init__(f"{kernel} failed: {self.reason}")


def guarded(kernel: str, fn):
    """fn, with any error it raises (but running out of memory, which the reference path would too) turned into a
    KernelFailure naming `kernel`."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (torch.OutOfMemoryError, KernelFailure, KeyboardInterrupt):
            raise
        except Exception as e:
            raise KernelFailure(kernel, e) from e

    return run


def requested_set(kernels: str = "auto") -> str:
    """The set asked for: `kernels` unless it is auto and MATHGRPO_KERNELS names one."""
    if kernels not in KERNEL_SETS:
        raise ValueError(f"generation.kernels: unknown '{kernels}'; choose from {', '.join(KERNEL_SETS)}")
    env = os.environ.get(ENV, "").strip()
    if kernels == "auto" and env:
        if env not in KERNEL_SETS:
            raise ValueError(f"{ENV}={env}: unknown; choose from {', '.join(KERNEL_SETS)}")
        return env
    return kernels


def _torch_plan(info: DeviceInfo, reason: str) -> KernelPlan:
    cuda = info.type == "cuda"
    return KernelPlan(info, "torch", reason, cuda_graphs=cuda, compile_pointwise=False, attention="sdpa",
                      kv_bucket=256 if cuda else 1, matmul="cublas", pdl=False, sampler="torch")


def plan_for(device: torch.device | str, kernels: str = "auto", **overrides) -> KernelPlan:
    """The plan for `device` under the `kernels` set (auto | conservative | torch; auto reads MATHGRPO_KERNELS).
    overrides: fields to set over the set's choice (attention / sampler "auto" keep it); checked against what
    the device can run (a clear ValueError otherwise)."""
    device = torch.device(device)
    info = device_info(device)
    want = requested_set(kernels)
    can = fast_kernels.available(device)
    if info.type != "cuda":
        plan = _torch_plan(info, f"{info.type}: the reference path, eagerly")
    elif not can:
        why = (f"Triton needs compute capability >= 7.0, this card has {info.capability[0]}.{info.capability[1]}"
               if info.capability[0] < 7 else "Triton is not installed")
        plan = _torch_plan(info, f"{why}: the torch-only path")
    elif want == "torch":
        plan = _torch_plan(info, "the torch set as asked")
    elif want == "auto" and info.capability == TUNED_CAPABILITY:
        plan = KernelPlan(info, "tuned", f"{info.sm}: the card the kernels were measured on", cuda_graphs=True,
                          compile_pointwise=True, attention="triton", kv_bucket=256, matmul="table",
                          pdl=fast_kernels.supports_pdl(device), sampler="triton", table=MappingProxyType(
                              dict(fast_matmul.TABLE)))
    else:
        why = "as asked" if want == "conservative" else f"{info.sm} is not the tuned {TUNED_CAPABILITY[0]}.0"
        plan = KernelPlan(info, "conservative", why, cuda_graphs=True, compile_pointwise=True, attention="triton",
                          kv_bucket=256, matmul="cublas", pdl=False, sampler="triton", block_n=32, attend_stages=2)
    if overrides.get("attention") == "auto":
        overrides.pop("attention")
    if overrides.get("sampler") == "auto":
        overrides.pop("sampler")
    if overrides.get("attention") == "sdpa":  # the skinny matmuls and PDL run on the triton path only
        overrides.setdefault("matmul", "cublas")
        overrides.setdefault("pdl", False)
    if "table" in overrides:
        overrides["table"] = MappingProxyType(dict(overrides["table"]))
    changed = {k: v for k, v in overrides.items() if getattr(plan, k) != v}
    if changed:
        said = ", ".join(f"{k}={'<table>' if k == 'table' else v}" for k, v in changed.items())
        plan = dataclasses.replace(plan, **changed, reason=f"{plan.reason}; set: {said}")
    check(plan, device)
    return plan


def check(plan: KernelPlan, device: torch.device) -> None:
    """A plan the device can run, or a ValueError saying what is missing."""
    can = fast_kernels.available(device)
    if plan.attention not in ("triton", "sdpa"):
        raise ValueError(f"FastRollout: attention must be auto, triton or sdpa, got {plan.attention!r}")
    if plan.sampler not in ("triton", "torch"):
        raise ValueError(f"FastRollout: sampler must be auto, triton or torch, got {plan.sampler!r}")
    if plan.matmul not in ("table", "cublas"):
        raise ValueError(f"FastRollout: matmul must be table or cublas, got {plan.matmul!r}")
    if plan.attention == "triton" and not can:
        raise ValueError(f"FastRollout: attention='triton' needs Triton and a CUDA device of compute capability "
                         f">= 7.0 (or TRITON_INTERPRET=1 on CPU); here: triton "
                         f"{'found' if fast_kernels.triton else 'missing'}, device {device}")
    if plan.sampler == "triton" and not can:
        raise ValueError("FastRollout: sampler='triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
    if plan.matmul == "table" and plan.attention != "triton":
        raise ValueError("FastRollout: the skinny-matmul table needs the triton attention path")
    if plan.pdl and not (plan.attention == "triton" and fast_kernels.supports_pdl(device)):
        raise ValueError("FastRollout: pdl=True needs the triton attention path on a GPU of compute capability "
                         ">= 9 (Hopper) with a Triton that has grid dependency control")
    if plan.cuda_graphs and device.type != "cuda":
        raise ValueError("FastRollout: cuda_graphs=True needs a CUDA device")


def reference(plan: KernelPlan, why: str) -> KernelPlan:
    """The torch plan of the same device (what a kernel failure falls back to)."""
    return _torch_plan(plan.device, why)


def decode_ops(plan: KernelPlan) -> dict:
    """The decode step's ops under `plan` (fast_forward.decode_step's `ops`), every kernel `guarded`: the
    pointwise pieces (compiled or eager), rope_write / attend on the triton path, the skinny matmuls ("linear",
    and "glu_mm": gate/up with the SwiGLU epilogue) where the plan takes the table."""
    from .fast_forward import EAGER_OPS, compiled_ops, glu_weights

    if plan.compile_pointwise:
        ops = {k: guarded(f"compiled pointwise op '{k}' (torch.compile)", f)
               for k, f in compiled_ops(plan.pdl).items()}
    else:
        ops = dict(EAGER_OPS)
    if plan.attention == "triton":
        ops["rope_write"] = guarded("rope_write (fast_kernels)", fast_kernels.rope_write)
        ops["attend"] = guarded("attend (fast_kernels)", functools.partial(
            fast_kernels.attend, block_n=plan.block_n, min_chunk=plan.min_chunk, stages=plan.attend_stages))
    if plan.matmul == "table":
        table, pre = plan.table, plan.prefetch

        def glu_mm(L, act, h: torch.Tensor):
            gu = glu_weights(L, act)
            return fast_matmul.glu(h, *gu, table=table, prefetch=pre) if gu is not None else None

        ops["linear"] = guarded("skinny matmul (fast_matmul)", functools.partial(
            fast_matmul.linear, table=table, prefetch=pre))
        ops["glu_mm"] = guarded("skinny matmul + SwiGLU (fast_matmul)", glu_mm)
    return ops


def describe_matmuls(plan: KernelPlan, w) -> dict | str:
    """Which matmul each projection group of the decode step takes per row bucket under `plan` (GenWeights w)."""
    if plan.matmul != "table":
        return "cuBLAS + reference ops"
    from .fast_forward import glu_weights

    L = w.layers[0]
    gu = glu_weights(L, w.act)
    shapes = {"qkv": [tuple(t.shape) for t in L.qkv], "o": [tuple(L.o.shape)],
              "gate_up": [tuple(t.shape) for t in L.gate_up], "down": [tuple(L.down.shape)]}
    if any(lr is not None for lr in (L.qkv_lora, L.o_lora, L.gate_up_lora, L.down_lora)) or not all(
            isinstance(t, torch.Tensor) for t in (*L.qkv, L.o, *L.gate_up, L.down)):
        shapes = {g: [] for g in shapes}  # low-rank pairs, weights dequantised per use: cuBLAS
    return fast_matmul.describe(shapes, tuple(gu[0].shape) if gu else None, w.dtype, plan.table)
