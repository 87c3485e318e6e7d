"""Does it fit on card X, and how close is the plan? A GRPO step under an emulated card's memory.

    PYTHONPATH=src python -m benchmarks.memory --card 16GiB                         # both shapes, ours + TRL
    PYTHONPATH=src python -m benchmarks.memory --card 16GiB --runs ours:qlora-2k ours:lora-4k:16384
    PYTHONPATH=src python -m benchmarks.memory --tiny                                # CPU smoke test

Each run is a subprocess that caps its CUDA allocator at the card's memory
(`torch.cuda.set_per_process_memory_fraction`: an allocation past the cap raises out-of-memory, as on the
smaller card), then
- ours: asks the memory plan (mathgrpo.memory_plan) for the planned keys with the cap as the free memory, prints
  the plan, runs `--steps` GRPO steps with those settings (benchmarks.step's `run_mathgrpo`: the fast engine,
  the trainer's update stage, the random 1.5B model of DeepSeek-R1-Distill-Qwen-1.5B's shape) and reports the
  measured peak of each phase (torch.cuda.max_memory_allocated, reset at each phase's start) against the plan's
  estimate: the ratio estimate / measured;
- trl: TRL's GRPOTrainer on the same workload under the same cap (benchmarks.step's `run_trl`); an out-of-memory error is
  reported as "does not fit", with the peak reached before it.
A run is `method:workload[:new_tokens][:option=value...]`; workloads are benchmarks.common's (qlora-2k: the notebook, 1 x 4 x
2,048, NF4; lora-4k: 1 x 8, bf16 LoRA, here usually with 16,384 new tokens). TRL option gen=canned replaces its
generation by fixed rows of full length (the update alone: what a long shape needs to know whether it fits);
our option set.<section.key>=<value> sets a key explicitly (the plan keeps it), e.g.
ours:qlora-2k:set.model.gradient_checkpointing=true.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time

from benchmarks import step
from benchmarks.common import SHAPES, WORKLOADS, child_env, module_command

PLANNED = ("generation.max_batch", "generation.release_memory", "model.gradient_checkpointing",
           "trainer.max_tokens_per_microbatch", "trainer.logprob_chunk_size")


def cap_memory(cap: int) -> str:
    """Cap this process's CUDA allocations at `cap` bytes; returns the card's name."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
    return torch.cuda.get_device_name(0)


def workload(spec: str):
    """'method:workload[:new_tokens][:key=value...]' -> (method, workload name, Workload, options)."""
    method, name, *rest = spec.split(":")
    w = WORKLOADS[name]
    opts = dict(r.split("=", 1) for r in rest if "=" in r)
    tokens = [int(r) for r in rest if "=" not in r]
    return method, name, w.with_new_tokens(tokens[0]) if tokens else w, opts


def run_ours(args, w, opts: dict) -> dict:
    import torch

    from mathgrpo.config import AUTO
    from mathgrpo.memory_plan import plan_run
    from mathgrpo.settings import merge, parse_overrides

    on_gpu = args.device != "cpu"
    card = cap_memory(args.cap) if on_gpu else "cpu"
    made = step.mathgrpo_config
    box = {}

    def planned(a, wl, o):  # the benchmarks' config with the planned keys left to the plan
        cfg = made(a, wl, o)
        cfg.model.gradient_checkpointing = cfg.trainer.max_tokens_per_microbatch = AUTO
        cfg.trainer.logprob_chunk_size = cfg.generation.max_batch = cfg.generation.release_memory = AUTO
        cfg.prompt.max_prompt_tokens, cfg.trainer.prompts_per_step = args.prompt_len, wl.prompts
        fixed = [f"{k[4:]}={v}" for k, v in o.items() if k.startswith("set.")]  # explicit keys: the plan keeps them
        if fixed:
            merge(cfg, parse_overrides(fixed))
        free = args.cap - (torch.cuda.memory_reserved() if on_gpu else 0)
        cfg, plan = plan_run(cfg, args.device, free=free, card=f"{card} capped at {args.cap / 2**30:.1f} GiB")
        print("\n".join(plan.lines()), flush=True)
        box["plan"] = plan
        return cfg

    step.mathgrpo_config = planned
    rec = step.run_mathgrpo(args, w, opts)
    plan = box["plan"]
    steps = rec["steps"]
    measured = {"sampling": max(s["peak_gen_gib"] for s in steps), "update": max(s["peak_update_gib"] for s in steps)}
    est = {k: v / 2**30 for k, v in plan.peaks.items()}
    later = steps[1:] or steps
    return dict(card=card, cap_gib=args.cap / 2**30, plan=plan.values(), estimate_gib=est,
                components={"sampling": plan.sampling, "update": plan.update}, measured_gib=measured,
                ratio={k: est[k] / measured[k] if measured[k] == measured[k] and measured[k] else None for k in est},
                step_s=sum(s["step_s"] for s in later) / len(later), gen_s=sum(s["gen_s"] for s in later) / len(later),
                update_s=sum(s["update_s"] for s in later) / len(later), first_step_s=steps[0]["step_s"],
                steps=steps)


def run_trl(args, w, opts: dict) -> dict:
    import torch

    card = cap_memory(args.cap)
    try:
        rec = step.run_trl(args, w, opts)
    except torch.OutOfMemoryError as e:
        return dict(card=card, cap_gib=args.cap / 2**30, fits=False,
                    peak_before_oom_gib=torch.cuda.max_memory_allocated() / 2**30, error=str(e).split("\n")[0][:300])
    steps = rec["steps"]
    later = steps[1:] or steps
    return dict(card=card, cap_gib=args.cap / 2**30, fits=True, backend=rec["backend"],
                measured_gib={"sampling": max(s["peak_gen_gib"] for s in steps),
                              "update": max(s["peak_update_gib"] for s in steps)},
                step_s=sum(s["step_s"] for s in later) / len(later), gen_s=sum(s["gen_s"] for s in later) / len(later),
                update_s=sum(s["update_s"] for s in later) / len(later), steps=steps)


def worker(args) -> None:
    method, name, w, opts = workload(args.worker)
    rec = (run_ours if method == "ours" else run_trl)(args, w, opts)
    print("RESULT " + json.dumps(dict(run=args.worker, **rec), default=str), flush=True)


def spawn(args, spec: str) -> dict:
    cmd = module_command("benchmarks.memory", "--worker", spec, "--cap", str(args.cap), "--model-dir", args.model_dir,
                         "--device", args.device, "--shape", args.shape, "--steps", str(args.steps), "--trl-steps",
                         str(args.trl_steps), "--prompt-len", str(args.prompt_len))
    print(f"== {spec}", flush=True)
    t0 = time.time()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=child_env())
        text, code = out.stdout + out.stderr, out.returncode
    except subprocess.TimeoutExpired as e:
        text, code = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    result = next((json.loads(x[7:]) for x in text.splitlines() if x.startswith("RESULT ")), None)
    for line in text.splitlines():
        if not line.startswith("RESULT ") and (line.startswith(("memory plan", "  ")) or "Error" in line):
            print("   " + line[:300], flush=True)
    return result or dict(run=spec, error=f"exit {code} after {time.time() - t0:.0f} s", tail=text[-1500:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--card", default="16GiB", help="the emulated card's memory (e.g. 16GiB, 24GiB, 40GiB)")
    ap.add_argument("--runs", nargs="+", default=["ours:qlora-2k", "trl:qlora-2k", "ours:lora-4k:16384",
                                                  "trl:lora-4k:16384:gen=canned"])
    ap.add_argument("--steps", type=int, default=3, help="our steps (the first one warms up)")
    ap.add_argument("--trl-steps", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--shape", default="1.5b", choices=list(SHAPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model-dir", default=None, help="reuse a saved random model (default: a temp folder)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per run")
    ap.add_argument("--out", default=None, help="append the JSON results here")
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU, 16 new tokens: a smoke test")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cap", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.backend, args.new_tokens = "auto", 0
    if args.tiny:
        args.shape, args.device, args.prompt_len = "tiny", "cpu", 8
        args.runs = ["ours:lora-4k:16"]
    if args.worker:
        return worker(args)
    from mathgrpo.memory_plan import parse_size

    args.cap = parse_size(args.card)
    if args.model_dir is None:
        args.model_dir = tempfile.mkdtemp(prefix="mathgrpo-memory-")
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        subprocess.run(module_command("benchmarks.step", "--worker", "make", "--model-dir", args.model_dir, "--shape",
                                      args.shape, "--device", args.device), check=True, env=child_env())
    rows = [spawn(args, spec) for spec in args.runs]
    for r in rows:
        line = {k: r.get(k) for k in ("run", "fits", "plan", "estimate_gib", "measured_gib", "ratio",
                                      "peak_before_oom_gib", "step_s", "gen_s", "update_s", "first_step_s", "error")
                if r.get(k) is not None}
        print(json.dumps(line, default=str), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(r, default=str) + "\n")


if __name__ == "__main__":
    main()
