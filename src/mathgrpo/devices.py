"""What a device can do, read once, and the precision a model runs in there.

    info = device_info(torch.device("cuda"))     # name, compute capability, shared memory a block, bf16, Triton
    dtype, why = choose_dtype(device, "auto")    # bf16 where the card has it, fp16 below compute capability 8

Everything that picks a path by hardware asks here: loading (the model's dtype), the fast engine's kernel plan
(rollout/fast_plan.py), the update's loss scaling. Imports nothing of mathgrpo.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

NAMED_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


@dataclass(frozen=True)
class DeviceInfo:
    """type: "cuda" / "cpu" / ...; capability: (major, minor) on CUDA, None elsewhere; smem_per_block: the most
    shared memory one block may use, in bytes (opt-in limit; 0 off CUDA); bf16: native bfloat16 matmuls
    (compute capability >= 8: Ampere and later; torch's emulation on older cards does not count); triton: the
    Triton version importable here, None without it."""

    type: str
    name: str
    capability: tuple[int, int] | None
    smem_per_block: int
    multiprocessors: int
    bf16: bool
    triton: str | None

    @property
    def sm(self) -> str:
        """"sm_90"-style architecture name ("cpu" off CUDA)."""
        return f"sm_{self.capability[0]}{self.capability[1]}" if self.capability else self.type

    def line(self) -> str:
        return (f"{self.name} ({self.sm}, {self.smem_per_block // 1024} KiB shared memory a block, "
                f"bf16 {'yes' if self.bf16 else 'no'}, triton {self.triton or 'missing'})"
                if self.capability else f"{self.name} (triton {self.triton or 'missing'})")


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return getattr(triton, "__version__", "unknown")


@functools.lru_cache(maxsize=None)
def _info(kind: str, index: int | None) -> DeviceInfo:
    if kind != "cuda":
        return DeviceInfo(kind, kind.upper(), None, 0, 0, kind == "cpu", _triton_version())
    p = torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device())
    cap = (p.major, p.minor)
    smem = getattr(p, "shared_memory_per_block_optin", 0) or getattr(p, "shared_memory_per_block", 0) or 48 * 1024
    return DeviceInfo("cuda", p.name, cap, int(smem), int(p.multi_processor_count), cap[0] >= 8, _triton_version())


def device_info(device: torch.device | str) -> DeviceInfo:
    """The facts of `device` (read once per device, then cached)."""
    d = torch.device(device)
    return _info(d.type, d.index)


def choose_dtype(device: torch.device | str, requested: str = "auto") -> tuple[torch.dtype, str]:
    """(dtype, why) for a model on `device`. requested: "auto" or a name of NAMED_DTYPES. auto = bfloat16 on a GPU
    with native bf16 (compute capability >= 8), float16 on older GPUs (T4, V100, P100: the update then scales
    its loss), float32 off CUDA (bf16 matmuls on most CPUs are slower than fp32 and lose accuracy)."""
    if requested != "auto":
        if requested not in NAMED_DTYPES:
            raise ValueError(f"model.dtype: unknown '{requested}'; choose from auto, {', '.join(NAMED_DTYPES)}")
        dtype = NAMED_DTYPES[requested]
        info = device_info(device)
        note = (" (this card has no native bf16: torch emulates it, slowly)"
                if dtype == torch.bfloat16 and info.type == "cuda" and not info.bf16 else "")
        return dtype, f"model.dtype={requested} as set{note}"
    info = device_info(device)
    if info.type != "cuda":
        return torch.float32, f"auto: float32 on {info.type} (bf16 matmuls are slow on most CPUs)"
    if info.bf16:
        return torch.bfloat16, f"auto: bfloat16 ({info.name}, {info.sm}, has native bf16)"
    return torch.float16, (f"auto: float16 ({info.name}, {info.sm}, has no bf16 below compute capability 8.0; "
                           f"the update scales its loss to keep fp16 gradients finite)")


def half_dtype(device: torch.device | str) -> torch.dtype:
    """The 16-bit compute dtype of `device`: bfloat16 where it is native, else float16 (NF4's compute dtype for a
    float32 model, for instance)."""
    info = device_info(device)
    return torch.bfloat16 if info.type != "cuda" or info.bf16 else torch.float16
