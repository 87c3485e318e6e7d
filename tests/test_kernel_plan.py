"""The fast engine's kernel plan (rollout/fast_plan.py): which set each class of card gets, the forcing switches,
and the fallback to the reference path when a kernel fails to compile or launch. CPU only: cards are described
by a DeviceInfo, kernel failures injected."""

from __future__ import annotations

import pytest
import torch

from mathgrpo.devices import DeviceInfo, choose_dtype, device_info
from mathgrpo.rollout import fast_draw, fast_kernels, fast_matmul, fast_plan
from mathgrpo.rollout.base import SamplingConfig
from mathgrpo.rollout.fast import FastRollout
from mathgrpo.rollout.fast_plan import ENV, plan_for
from test_rollout_fast import PROMPTS, char_tokenizer, rows_of, tiny_model

CARDS = {  # name, capability, shared memory a block (opt-in), multiprocessors
    "H100": ("NVIDIA H100 80GB HBM3", (9, 0), 227 * 1024, 132),
    "A100": ("NVIDIA A100-SXM4-40GB", (8, 0), 163 * 1024, 108),
    "L4": ("NVIDIA L4", (8, 9), 99 * 1024, 58),
    "T4": ("Tesla T4", (7, 5), 64 * 1024, 40),
    "P100": ("Tesla P100-PCIE-16GB", (6, 0), 48 * 1024, 56),
}


def _card(monkeypatch, name: str, triton: bool = True) -> DeviceInfo:
    label, cap, smem, sms = CARDS[name]
    info = DeviceInfo("cuda", label, cap, smem, sms, cap[0] >= 8, "3.6.0" if triton else None)
    monkeypatch.setattr(fast_plan, "device_info", lambda d: info)
    monkeypatch.setattr(fast_kernels, "available", lambda d: triton and cap[0] >= 7)
    monkeypatch.setattr(fast_kernels, "supports_pdl", lambda d: triton and cap[0] >= 9)
    monkeypatch.delenv(ENV, raising=False)
    return info


def _attend_shared_bytes(plan, head_dim: int = 128, elem: int = 2) -> int:
    """attend's shared memory at the plan's tiling: a K and a V tile [block_n, head_dim] per pipeline stage
    (Triton's default depth on CUDA is 3)."""
    return (plan.attend_stages or 3) * 2 * plan.block_n * head_dim * elem


def test_each_card_class_gets_its_set(monkeypatch):
    cuda = torch.device("cuda")
    _card(monkeypatch, "H100")
    tuned = plan_for(cuda)
    assert tuned.kernels == "tuned" and tuned.matmul == "table" and dict(tuned.table) == fast_matmul.TABLE
    assert tuned.pdl and tuned.attention == "triton" and tuned.sampler == "triton" and tuned.cuda_graphs
    for name in ("A100", "L4", "T4"):  # untuned: never the H200 table; attention that fits 64 KiB
        info = _card(monkeypatch, name)
        p = plan_for(cuda)
        assert p.kernels == "conservative" and p.matmul == "cublas" and not p.table and not p.pdl, name
        assert p.attention == "triton" and _attend_shared_bytes(p) <= 64 * 1024 <= info.smem_per_block, name
        assert info.sm in p.line() and "cuBLAS" in p.line()
    _card(monkeypatch, "P100")  # Triton supports no card below 7.0: torch only, said in the line
    p = plan_for(cuda)
    assert (p.kernels, p.attention, p.sampler, p.compile_pointwise, p.cuda_graphs) == ("torch", "sdpa", "torch",
                                                                                      False, True)
    assert "Triton needs compute capability >= 7.0, this card has 6.0" in p.line()
    _card(monkeypatch, "H100", triton=False)
    assert "Triton is not installed" in plan_for(cuda).line() and not plan_for(cuda).uses_kernels
    monkeypatch.setattr(fast_plan, "device_info", device_info)
    cpu = plan_for("cpu")
    assert cpu.kernels == "torch" and not cpu.cuda_graphs and cpu.kv_bucket == 1 and not cpu.uses_kernels


def test_forcing_the_conservative_or_torch_set(monkeypatch):
    cuda = torch.device("cuda")
    _card(monkeypatch, "H100")
    assert plan_for(cuda, "conservative").kernels == "conservative"
    assert plan_for(cuda, "torch").kernels == "torch"
    monkeypatch.setenv(ENV, "conservative")  # the environment forces a set where the config says auto ...
    assert plan_for(cuda).kernels == "conservative" and plan_for(cuda).matmul == "cublas"
    assert plan_for(cuda, "torch").kernels == "torch"  # ... but not over a set the config names
    monkeypatch.setenv(ENV, "fastest")
    with pytest.raises(ValueError, match="MATHGRPO_KERNELS=fastest: unknown"):
        plan_for(cuda)
    with pytest.raises(ValueError, match="generation.kernels: unknown 'turbo'"):
        plan_for(cuda, "turbo")
    _card(monkeypatch, "T4")
    with pytest.raises(ValueError, match="pdl=True needs"):
        plan_for(cuda, pdl=True)
    from mathgrpo.config import load_config

    assert load_config(None, ["generation.kernels=conservative"]).generation.kernels == "conservative"


def test_dtype_by_card(monkeypatch):
    from mathgrpo import devices

    assert choose_dtype("cpu")[0] == torch.float32 and device_info("cpu").capability is None
    for name, want in (("H100", torch.bfloat16), ("A100", torch.bfloat16), ("T4", torch.float16),
                       ("P100", torch.float16)):
        label, cap, smem, sms = CARDS[name]
        monkeypatch.setattr(devices, "device_info", lambda d, cap=cap, label=label, smem=smem, sms=sms: DeviceInfo(
            "cuda", label, cap, smem, sms, cap[0] >= 8, None))
        dtype, why = choose_dtype("cuda")
        assert dtype == want, name
        assert label in why and (("no bf16" in why) == (want == torch.float16)), why
    assert choose_dtype("cuda", "fp32") == (torch.float32, "model.dtype=fp32 as set")
    assert "emulates it" in choose_dtype("cuda", "bf16")[1]  # a T4 (the last card patched) asked for bf16


@pytest.mark.parametrize("kernel,injected,sampling", [
    ("rope_write", True, SamplingConfig(max_new_tokens=8, seed=3)),
    ("rope_write", False, SamplingConfig(max_new_tokens=8, seed=3, temperature=0)),  # a real failure: no GPU driver
    ("draw", True, SamplingConfig(max_new_tokens=8, seed=5)),
])
def test_a_failing_kernel_falls_back_to_the_reference_path(monkeypatch, kernel, injected, sampling):
    """A kernel that raises on first use (as a compile error or a shared-memory overflow does) makes the engine warn,
    naming the kernel and the reason, take the torch plan and decode the batch again: the tokens and log-probs of
    the reference path, and the next call stays there."""
    monkeypatch.setattr(fast_kernels, "available", lambda d: True)  # the kernel path, on CPU, as on a GPU
    reason = "RuntimeError: out of resource: shared memory" if injected else "RuntimeError: "

    def broken(*a, **k):
        raise RuntimeError("out of resource: shared memory, Required: 98304, Hardware limit: 65536")

    module = fast_draw if kernel == "draw" else fast_kernels
    if injected:
        monkeypatch.setattr(module, kernel, broken)
    model, tok = tiny_model("qwen2"), char_tokenizer()
    plan = (plan_for("cpu", sampler="triton") if kernel == "draw"
            else plan_for("cpu", attention="triton", sampler="torch"))
    eng = FastRollout(model, tok, plan=plan)
    name = f"{kernel} ({module.__name__.rsplit('.', 1)[1]})"
    with pytest.warns(RuntimeWarning, match=rf"{kernel} \(fast_(kernels|draw)\) failed on CPU \({reason}.*reference path"):
        got = eng.generate(PROMPTS, 2, sampling)
    want = FastRollout(model, tok, plan=plan_for("cpu")).generate(PROMPTS, 2, sampling)
    assert rows_of(got) == rows_of(want)
    torch.testing.assert_close(got.logprobs, want.logprobs, atol=0, rtol=0)
    d = eng.describe()
    assert d["fallbacks"] == [name] and d["attention"] == "sdpa" and d["sampler"] == "torch"
    assert f"after {name} failed" in d["plan"]
    again = eng.generate(PROMPTS, 2, sampling)  # the engine stays on the reference path
    assert rows_of(again) == rows_of(want) and eng.describe()["fallbacks"] == [name]


def test_out_of_memory_is_not_a_kernel_failure(monkeypatch):
    """Running out of memory is raised as it is: the reference path would need the memory too."""
    monkeypatch.setattr(fast_kernels, "available", lambda d: True)

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(fast_kernels, "rope_write", oom)
    eng = FastRollout(tiny_model("qwen2"), char_tokenizer(), plan=plan_for("cpu", attention="triton", sampler="torch"))
    with pytest.raises(torch.OutOfMemoryError):
        eng.generate(PROMPTS, 1, SamplingConfig(max_new_tokens=4, seed=0))
