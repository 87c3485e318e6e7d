"""Host cost of a 4-bit LoRA update on CPU: the Python/dispatcher/autograd overhead per projection, which sets the
pace of the notebook shape's update on a GPU (there the kernels are ~0.35 s of ~0.55 s). A tiny Qwen2 with the
1.5B's 28 layers (hidden 64) whose seven projections are bitsandbytes NF4 layers (its CPU backend) with peft LoRA
r=4, a few tokens so the arithmetic is negligible; per variant, the best of --repeats timings of one update's
passes: a no-grad reference forward (adapters off) and a policy forward + backward under activation checkpointing,
plus the autograd nodes of one policy forward and the Python calls of one update (cProfile).

    PYTHONPATH=src python -m benchmarks.qlora_host [--autocast] [--repeats 20]     # needs bitsandbytes

Variants: peft (peft's 4-bit LoRA forward), addmm (`lora_fused_add` before `qlora.NF4LoRA`: peft's base call,
then one addmm for the delta), nf4 (the default now: one autograd node per projection).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import time

import torch

from benchmarks.common import tiny_nf4_lora_model


def nodes(t: torch.Tensor) -> int:
    seen, todo = set(), [t.grad_fn]
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        todo.extend(g for g, _ in f.next_functions)
    return len(seen)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--autocast", action="store_true", help="bf16 autocast, as the GPU update runs")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from mathgrpo.models import enable_checkpointing, fuse_lora_add
    from mathgrpo.modelinfo import backbone_and_head

    vocab = 97
    model = tiny_nf4_lora_model(layers=args.layers, vocab=vocab)
    enable_checkpointing(model)
    model.train()
    body, _ = backbone_and_head(model)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(1, vocab, (1, args.tokens))
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.autocast else contextlib.nullcontext

    def update():
        with ctx():
            with torch.no_grad(), model.disable_adapter():
                body(input_ids=ids).last_hidden_state
            out = body(input_ids=ids).last_hidden_state
        torch.autograd.grad(out.float().square().sum(), params)
        return out

    print(f"{args.layers} layers x 7 NF4 projections, {args.tokens} tokens, autocast={'bf16' if args.autocast else 'off'}")
    print("variant | best update ms | median ms | autograd nodes (policy forward) | python calls per update")
    for name in ("peft", "addmm", "nf4", "peft", "addmm", "nf4"):
        fuse_lora_add(model, on=name != "peft", qlora=name == "nf4")
        for _ in range(3):
            update()
        times = []
        for _ in range(args.repeats):
            t0 = time.process_time()
            update()
            times.append(time.process_time() - t0)
        with ctx():
            n_nodes = nodes(body(input_ids=ids).last_hidden_state)
        prof = cProfile.Profile()
        prof.enable()
        update()
        prof.disable()
        calls = pstats.Stats(prof).total_calls
        times.sort()
        print(f"{name} | {times[0] * 1e3:.1f} | {times[len(times) // 2] * 1e3:.1f} | {n_nodes} | {calls}")


if __name__ == "__main__":
    main()
