"""Data-parallel GRPO over the GPUs of one host: step time and throughput per GPU count, and whether the
N-GPU update agrees with the 1-GPU update of the same rollout.

    PYTHONPATH=src python -m benchmarks.multigpu --gpus 1 2 --global-prompts 16 --group 8 --new-tokens 1024 \\
        --steps 3 --out $OUT/multigpu.json                        # CUDA: torchrun per GPU count
    PYTHONPATH=src python -m benchmarks.multigpu --tiny --gpus 1 2  # CPU smoke test: tiny model, gloo, 16 tokens

Workload (as benchmarks.step; benchmarks.common): a random-initialised Qwen2 of DeepSeek-R1-Distill-Qwen-1.5B's shape
(bf16, sdpa), saved once to a folder; LoRA r=32, alpha=32, dropout 0 on all seven projections; beta 0.04,
loss "grpo", gradient checkpointing; completions forced to full length (ignore_eos); random rewards.
The driver (this script without torchrun's environment) builds the model folder in a subprocess, then
for each N in --gpus runs `python -m torch.distributed.run --standalone --nproc_per_node=N` on this
script as a worker, with a time limit per run, and reads the JSON lines its rank 0 prints.

Each worker runs the trainer's own pieces: `process_group`, `load_model` on `world.model_device`, the
rollout backend (the CUDA-graph `fast` engine on CUDA, `hf` on CPU), `Reference`, `make_optimizer`,
`policy_update(..., world)` (gradients averaged over ranks) and `rollout.sync_weights`.

Timing phase. The global batch is fixed: --global-prompts x --group completions per step whatever N is
(strong scaling). Each rank takes its contiguous share of the prompts (`World.mine`: whole groups),
samples with `rank_seed(step, rank)`, takes the rewards of its global row indices (rewards do not depend
on N), computes group advantages and runs one `policy_update` + `sync_weights`. Generation and update
are timed separately (torch.cuda.synchronize); every time is the slowest rank's (reduce_metrics max).
Step 0 is warm-up (CUDA-graph capture, allocator growth); reported numbers are means of the later steps.
Peak memory is torch.cuda.max_memory_allocated, the max over steps and ranks.

    tokens/s          = global completion tokens / step_s      (step_s = gen_s + update_s)
    tokens/s per GPU  = tokens/s / N
    scaling eff.      = (tokens/s per GPU at N) / (tokens/s at 1 GPU)   (1.0 = perfect linear scaling)
    speed-up          = step_s at 1 GPU / step_s at N
Because the global batch is fixed, each GPU decodes N times fewer rows at N GPUs; decoding is bound by
weight reads, so generation does not get N times faster and efficiency falls below 1 from that alone.

Agreement phase (after the timing steps, same worker). The trainable (LoRA) weights are reset to the
seeded start every run uses; rank 0 of the first run (1 GPU) samples the whole global rollout once
(seed 777) and saves it, later runs load that file, and rank 0 broadcasts it, so every run and rank
sees the same data. Each rank takes its contiguous share of rows (whole groups) and runs ONE
`policy_update` with lr --check-lr (default 1e-4, large enough to move the weights visibly) and
gradient clipping off, so gradients are compared as averaged. Rank 0 saves weights before/after and the
averaged gradients; the driver compares each N-GPU file with the 1-GPU file:
    grad rel diff   = max|g_N - g_1| / max|g_1|
    weight rel diff = max|w_N - w_1| / max|w_1 - w_before|   (after one step). Adam's first step is
                      lr * g / (|g| + eps): about lr * sign(g) where |g| >> eps (so the weights hide a
                      gradient scale error: read the gradient line), but linear in g with slope lr / eps
                      where |g| ~ eps = 1e-8, which magnifies gradient rounding on those entries; the
                      line also gives the diff over entries with |g| > 1e-6.
    loss / grad_norm differences. With group-normalised advantages the policy term of the loss sums to
    ~0 by cancellation (the loss is ~beta * KL), so compare the loss in absolute terms.
On CPU fp32 these should sit at float rounding (~1e-6 relative or less). On CUDA the base weights and the
matmuls are bf16 and the micro-batches differ between N (each rank cuts its own rows into token-budgeted
micro-batches), so kernel choice and reduction order alone move the gradients at bf16 rounding level (of
order 1e-3 relative, more on single entries); a data-parallel error (a wrong normalisation, a missing
all-reduce) shows up as an O(1) relative difference.

Every run is stopped after --timeout seconds (torchrun and its workers), and after --total-timeout the
remaining runs are skipped, so the table always prints; --out is rewritten after every run.

NVLink multicast stays off in every worker: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
NVSHMEM_DISABLE_NVLS=1 are forced in the environment of each torchrun.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time

from benchmarks.common import (ROOT, SHAPES, Workload, child_env, load_tokenizer, make_model_dir, mathgrpo_config,
                               module_command, peak_gib, prompt_ids, random_rewards, reset_peak, sync, update_flops)

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
CHECK_SEED, CHECK_REWARD_STEP = 777, 777
INIT_SEED = 0


# ----------------------------------------------------------------------------- worker (under torchrun)


def _log(world, msg: str) -> None:
    if world.is_main:
        print(f"[{world.size} rank{'s' if world.size > 1 else ''}] {msg}", flush=True)


def _emit(world, kind: str, rec: dict) -> None:
    if world.is_main:
        print(f"{kind} " + json.dumps(rec), flush=True)


def _seeded_lora(model) -> dict:
    """Set every trainable tensor from one fixed CPU generator (the same start for every N and rank; B != 0,
    so A gets gradients too) and return a CPU copy of that start."""
    import torch

    gen = torch.Generator().manual_seed(INIT_SEED)
    start = {}
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad:
                v = torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.02
                p.copy_(v.to(p.device, p.dtype))
                start[name] = p.detach().cpu().clone()
    return start


def _rows_of(comp, lo: int, hi: int):
    from dataclasses import replace

    return replace(comp, prompt_ids=comp.prompt_ids[lo:hi], completion_ids=comp.completion_ids[lo:hi],
                   completion_mask=comp.completion_mask[lo:hi], texts=comp.texts[lo:hi],
                   truncated=comp.truncated[lo:hi],
                   logprobs=None if comp.logprobs is None else comp.logprobs[lo:hi])


def _cpu(comp):
    from dataclasses import replace

    return replace(comp, completion_ids=comp.completion_ids.cpu(), completion_mask=comp.completion_mask.cpu(),
                   truncated=comp.truncated.cpu(), logprobs=None, texts=[""] * len(comp.texts))


def worker(args) -> None:
    import torch

    from mathgrpo.advantages import group_advantages
    from mathgrpo.distributed import process_group, rank_seed
    from mathgrpo.models import Reference, load_model
    from mathgrpo.rollout import SamplingConfig, make_rollout
    from mathgrpo.update import make_optimizer, policy_update, update_stage

    t_start = time.perf_counter()
    with process_group(args.device) as world:
        on_cuda = args.device != "cpu"
        if on_cuda:
            _log(world, f"device: {torch.cuda.get_device_name()} x {world.size}; torch {torch.__version__}; "
                        f"NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}")
        w = Workload(None, args.global_prompts, args.group, args.new_tokens, 0)
        cfg = mathgrpo_config(args, w, {})
        cfg.model.device = world.model_device(args.device)
        G, n_global = args.group, args.global_prompts * args.group
        k = world.share(args.global_prompts) * G  # rows per rank
        lo, hi = world.rank * k, (world.rank + 1) * k

        model, _ = load_model(cfg.model, trainable=True)
        start = _seeded_lora(model)
        params = [p for _, p in sorted(model.named_parameters()) if p.requires_grad]
        world.broadcast_params(params)  # identical replicas (they already are: same folder, same seed)
        tok = load_tokenizer(args.model_dir)
        rollout = make_rollout(cfg.generation, model, tok)
        rollout.sync_weights(model)
        ref = Reference(model, cfg.grpo.beta, lora=True)
        optimizer, scheduler = make_optimizer(model, cfg)
        all_prompts = prompt_ids(args, w)
        mine = world.mine(all_prompts)
        backend = type(rollout).__name__
        n_lora = sum(p.numel() for p in params)
        setup_s = world.reduce_metrics({"t": time.perf_counter() - t_start}, op="max")["t"]
        _log(world, f"set up in {setup_s:.1f} s: backend {backend}, {n_lora / 1e6:.2f} M LoRA params, "
                    f"{n_global} completions/step global = {len(mine)} prompts x G={G} = {k} per rank")

        # ---------------------------------------------------------------- timing
        steps = []
        for step in range(args.steps):
            reset_peak()
            sync()
            t0 = time.perf_counter()
            comp = rollout.generate(mine, G, SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0,
                                                            ignore_eos=True, seed=rank_seed(step, world.rank)))
            sync()
            t1, peak_gen = time.perf_counter(), peak_gib()
            reset_peak()
            adv = group_advantages(random_rewards(n_global, step)[lo:hi], G)  # [k]: this rank's global rows
            upd = update_stage(model, optimizer, scheduler, ref, comp, adv, cfg, world, rollout)  # the trainer's
            sync()
            t2 = time.perf_counter()
            mine_tokens = float(comp.lengths.sum())
            slow = world.reduce_metrics({"gen_s": t1 - t0, "update_s": t2 - t1, "step_s": t2 - t0,
                                         "peak_gen_gib": peak_gen, "peak_update_gib": peak_gib()}, op="max")
            avg = world.reduce_metrics({"loss": upd["loss"], "grad_norm": upd["grad_norm"], "tokens": mine_tokens})
            rec = dict(step=step, **{kk: round(v, 4) for kk, v in slow.items()},
                       completion_tokens=int(round(avg["tokens"] * world.size)),
                       loss=round(avg["loss"], 6), grad_norm=round(avg["grad_norm"], 6))
            steps.append(rec)
            _log(world, f"step {step}: {json.dumps(rec)}")
        rows = [(args.prompt_len + args.new_tokens, args.new_tokens)] * n_global
        _emit(world, "RESULT", dict(gpus=world.size, device=torch.cuda.get_device_name() if on_cuda else "cpu",
                                    backend=backend, setup_s=setup_s, global_completions=n_global,
                                    rows_per_gpu=k, new_tokens=args.new_tokens, lora_params=n_lora,
                                    update_tflop=update_flops(args, rows) / 1e12, steps=steps))

        # ---------------------------------------------------------------- agreement
        if args.no_check:
            return
        with torch.no_grad():
            for (name, p) in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
                p.copy_(start[name].to(p.device, p.dtype))
        model.zero_grad(set_to_none=True)
        cfg.trainer.learning_rate, cfg.trainer.max_grad_norm = args.check_lr, 1e9  # clipping off
        opt2, sched2 = make_optimizer(model, cfg)
        path = os.path.join(args.work_dir, "check_rollout.pt")
        comp = None
        if world.is_main:
            if os.path.isfile(path):
                comp = torch.load(path, weights_only=False)
                src = "loaded " + path
            else:
                rollout.sync_weights(model)
                comp = _cpu(rollout.generate(all_prompts, G, SamplingConfig(
                    max_new_tokens=args.new_tokens, temperature=1.0, ignore_eos=True, seed=CHECK_SEED)))
                torch.save(comp, path)
                src = f"sampled (seed {CHECK_SEED}) and saved to {path}"
            _log(world, f"check rollout: {src}")
        comp = world.broadcast_object(comp)
        adv = group_advantages(random_rewards(n_global, CHECK_REWARD_STEP), G)  # [N] global, whole groups
        upd = policy_update(model, opt2, sched2, ref, _rows_of(comp, lo, hi), adv[lo:hi], cfg, world)  # grads kept
        metrics = world.reduce_metrics({"loss": upd["loss"], "grad_norm": upd["grad_norm"]})
        if world.is_main:
            named = sorted((n, p) for n, p in model.named_parameters() if p.requires_grad)
            out = os.path.join(args.work_dir, f"check_{world.size}.pt")
            torch.save({"before": start, "after": {n: p.detach().float().cpu() for n, p in named},
                        "grads": {n: p.grad.detach().float().cpu() for n, p in named},
                        "metrics": metrics, "rollout_sum": int(comp.completion_ids.sum()),
                        "rows": int(comp.completion_ids.shape[0])}, out)
            _emit(world, "CHECK", dict(gpus=world.size, file=out, **metrics))
        world.barrier()


# ----------------------------------------------------------------------------- driver


def _env(nproc: int = 1) -> dict:
    env = child_env(TOKENIZERS_PARALLELISM="false", **NO_MULTICAST)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # the same share for every N
    src = os.path.join(ROOT, "src")
    if os.path.isdir(src):
        env["PYTHONPATH"] = src + os.pathsep + env["PYTHONPATH"]
    return env


def _common(args) -> list[str]:
    return ["--model-dir", args.model_dir, "--shape", args.shape, "--device", args.device, "--work-dir",
            args.work_dir, "--global-prompts", str(args.global_prompts), "--group", str(args.group),
            "--new-tokens", str(args.new_tokens), "--prompt-len", str(args.prompt_len), "--steps", str(args.steps),
            "--backend", args.backend, "--check-lr", str(args.check_lr)] + (["--no-check"] if args.no_check else [])


def _noise(line: str) -> bool:
    """Progress bars (model loading/saving) and blank lines: not worth the output tail."""
    t = line.strip()
    return not t or "it/s]" in t or "s/it]" in t or "%|" in t


def run_logged(cmd: list[str], timeout: float, label: str, nproc: int = 1) -> tuple[dict, int | None, bool]:
    """Run cmd in its own process group; echo its output; collect `RESULT`/`CHECK` JSON lines. Stop the
    whole group (torchrun and its workers) after `timeout` seconds, even when it prints nothing."""
    print(f"== {label}: {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(nproc),
                            start_new_session=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True)
    reader.start()
    found: dict = {}
    deadline, timed_out = time.time() + timeout, False
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.time()))
        except queue.Empty:
            line = ""
        if line is None:
            break
        if line:
            kind, _, rest = line.partition(" ")
            if kind in ("RESULT", "CHECK"):
                try:
                    found[kind] = json.loads(rest)
                    continue
                except json.JSONDecodeError:
                    pass
            if not _noise(line):
                print("   " + line.rstrip()[:600], flush=True)
        if time.time() > deadline:
            timed_out = True
            print(f"   !! {label}: stopped after {timeout:.0f} s", flush=True)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)  # the group started above: torchrun and its workers
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    pass
            break
    try:
        rc = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        rc = None
    return found, rc, timed_out


def summarize(res: dict) -> dict:
    steps = res["steps"]
    later = steps[1:] or steps
    mean = lambda key: sum(s[key] for s in later) / len(later)  # noqa: E731
    n = res["gpus"]
    out = dict(gpus=n, global_completions=res["global_completions"], rows_per_gpu=res["rows_per_gpu"],
               timed_steps=len(later), first_step_s=steps[0]["step_s"], step_s=mean("step_s"), gen_s=mean("gen_s"),
               update_s=mean("update_s"), tokens=mean("completion_tokens"),
               peak_gib=max(max(s["peak_gen_gib"], s["peak_update_gib"]) for s in steps), setup_s=res["setup_s"])
    out["tokens_per_s"] = out["tokens"] / out["step_s"]
    out["tokens_per_s_per_gpu"] = out["tokens_per_s"] / n
    out["update_tflops_per_gpu"] = res["update_tflop"] / out["update_s"] / n
    return out


def agreement(work_dir: str, base: int, n: int) -> dict:
    import torch

    a = torch.load(os.path.join(work_dir, f"check_{base}.pt"), weights_only=False)
    b = torch.load(os.path.join(work_dir, f"check_{n}.pt"), weights_only=False)
    mx = lambda d: max(float(t.abs().max()) for t in d.values()) if d else 0.0  # noqa: E731
    keys = sorted(a["after"])
    start_diff = mx({k: b["before"][k] - a["before"][k] for k in keys})
    w_diff = mx({k: b["after"][k] - a["after"][k] for k in keys})
    w_upd = mx({k: a["after"][k] - a["before"][k] for k in keys})
    # Adam's first step is lr * g / (|g| + eps), eps = 1e-8: on entries with |g| ~ eps it is linear in g with
    # slope lr / eps, so it magnifies gradient rounding there; elsewhere it is ~lr * sign(g).
    w_diff_big = mx({k: (b["after"][k] - a["after"][k]) * (a["grads"][k].abs() > 1e-6) for k in keys})
    g_diff = mx({k: b["grads"][k] - a["grads"][k] for k in keys})
    g_max = mx({k: a["grads"][k] for k in keys})
    g_l2 = sum(float((b["grads"][k] - a["grads"][k]).double().pow(2).sum()) for k in keys) ** 0.5
    g_norm = sum(float(a["grads"][k].double().pow(2).sum()) for k in keys) ** 0.5
    la, lb = a["metrics"]["loss"], b["metrics"]["loss"]
    ga, gb = a["metrics"]["grad_norm"], b["metrics"]["grad_norm"]
    return dict(gpus=n, base_gpus=base, same_rollout=a["rollout_sum"] == b["rollout_sum"] and a["rows"] == b["rows"],
                start_max_diff=start_diff, weight_max_diff=w_diff, weight_max_update=w_upd,
                weight_rel=w_diff / w_upd if w_upd else float("nan"),
                weight_max_diff_big_grad=w_diff_big, grad_max_diff=g_diff, grad_max=g_max,
                grad_rel=g_diff / g_max if g_max else float("nan"), grad_rel_l2=g_l2 / g_norm if g_norm else float("nan"),
                loss=lb, base_loss=la, loss_diff=lb - la, grad_norm=gb, base_grad_norm=ga,
                grad_norm_rel=(gb - ga) / ga if ga else float("nan"))


def table(rows: list[dict], base: dict | None) -> str:
    head = ["GPUs", "global completions", "step s", "gen s", "update s", "tokens/s", "tokens/s per GPU",
            "scaling eff.", "speed-up", "peak GiB", "update TFLOP/s per GPU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['gpus']} | {r['error']} |" + " |" * (len(head) - 2))
            continue
        eff = r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"] if base else float("nan")
        spd = base["step_s"] / r["step_s"] if base else float("nan")
        cells = [r["gpus"], r["global_completions"], f"{r['step_s']:.2f}", f"{r['gen_s']:.2f}", f"{r['update_s']:.2f}",
                 f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s_per_gpu']:.0f}", f"{eff:.2f}", f"{spd:.2f}x",
                 f"{r['peak_gib']:.2f}", f"{r['update_tflops_per_gpu']:.1f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def agreement_line(a: dict) -> str:
    return (f"agreement {a['gpus']} GPUs vs {a['base_gpus']}: same rollout {a['same_rollout']}, start diff "
            f"{a['start_max_diff']:.2g}; grads max|diff| {a['grad_max_diff']:.3g} / max|g| {a['grad_max']:.3g} = "
            f"{a['grad_rel']:.3g} rel (L2 {a['grad_rel_l2']:.3g}); weights after one step max|diff| "
            f"{a['weight_max_diff']:.3g} / max|update| {a['weight_max_update']:.3g} = {a['weight_rel']:.3g} rel "
            f"({a['weight_max_diff_big_grad']:.3g} where |g| > 1e-6; Adam's eps magnifies the rest); "
            f"loss {a['loss']:.6g} vs {a['base_loss']:.6g} (diff {a['loss_diff']:.3g}); grad_norm {a['grad_norm']:.6g} "
            f"vs {a['base_grad_norm']:.6g} (rel {a['grad_norm_rel']:.3g})")


def _write(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="GPU counts (torchrun --nproc_per_node)")
    ap.add_argument("--global-prompts", type=int, default=16, help="prompts per step, over all GPUs")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    ap.add_argument("--new-tokens", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (the first one warms up)")
    ap.add_argument("--check-lr", type=float, default=1e-4, help="lr of the agreement step")
    ap.add_argument("--no-check", action="store_true", help="skip the agreement phase")
    ap.add_argument("--shape", default="1.5b", choices=list(SHAPES))
    ap.add_argument("--device", default="cuda", help="cuda (NCCL) or cpu (gloo)")
    ap.add_argument("--backend", default="auto", help="rollout backend: auto (fast on CUDA) | fast | hf")
    ap.add_argument("--tiny", action="store_true", help="tiny shape on CPU, 16 new tokens: a smoke test")
    ap.add_argument("--model-dir", default=None, help="reuse a saved random model (default: built in --work-dir)")
    ap.add_argument("--work-dir", default=None, help="model folder and check files (default: a temp folder)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per run (torchrun and its workers)")
    ap.add_argument("--total-timeout", type=float, default=540,
                    help="seconds for everything: a run gets at most what is left, so the table always prints")
    ap.add_argument("--out", default=None, help="write every raw result and summary here as JSON")
    ap.add_argument("--role", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tiny:
        args.shape, args.device, args.prompt_len = "tiny", "cpu", 8
        args.new_tokens = 16 if args.new_tokens == 1024 else args.new_tokens
    if args.role == "make":
        return make_model_dir(args)
    if args.role == "worker":
        return worker(args)

    t_all = time.time()
    left = lambda: max(1.0, min(args.timeout, t_all + args.total_timeout - time.time()))  # noqa: E731
    bad = [n for n in args.gpus if args.global_prompts % n]
    if bad:
        raise SystemExit(f"--global-prompts {args.global_prompts} does not split over {bad} GPUs (whole groups per GPU)")
    own_dir = args.work_dir is None
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="mathgrpo-multigpu-")
    os.makedirs(args.work_dir, exist_ok=True)
    for name in os.listdir(args.work_dir):  # stale agreement files of an earlier invocation
        if name.startswith("check_") and name.endswith(".pt"):
            os.remove(os.path.join(args.work_dir, name))
    args.model_dir = args.model_dir or os.path.join(args.work_dir, "model")
    print(f"multigpu: GPUs {args.gpus}, global batch {args.global_prompts} prompts x G={args.group} = "
          f"{args.global_prompts * args.group} completions of {args.new_tokens} tokens, prompt {args.prompt_len} "
          f"tokens, {args.steps} steps (first = warm-up), shape {args.shape} on {args.device}; work dir {args.work_dir}; "
          f"{' '.join(f'{k}={v}' for k, v in NO_MULTICAST.items())}", flush=True)
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        t0 = time.time()
        run_logged(module_command("benchmarks.multigpu", "--role", "make", "--model-dir", args.model_dir, "--shape",
                                  args.shape, "--device", args.device), left(), "build model folder")
        if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
            raise SystemExit("building the model folder failed (see above)")
        print(f"   model folder built in {time.time() - t0:.1f} s", flush=True)

    raw, rows, checks = [], [], {}
    for n in args.gpus:
        cmd = module_command("torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "--module",
                             "benchmarks.multigpu", "--role", "worker", *_common(args))
        t0 = time.time()
        if t_all + args.total_timeout - time.time() < 20:
            raw.append(dict(gpus=n, skipped="total time used up"))
            rows.append(dict(gpus=n, error="skipped: --total-timeout used up"))
            continue
        found, rc, timed_out = run_logged(cmd, left(), f"{n} GPU{'s' if n > 1 else ''}", n)
        wall = time.time() - t0
        print(f"   run with {n} GPU(s): {wall:.1f} s wall, exit {rc}{' (timed out)' if timed_out else ''}", flush=True)
        raw.append(dict(gpus=n, wall_s=wall, rc=rc, timed_out=timed_out, **found))
        if "RESULT" in found and found["RESULT"].get("steps"):
            rows.append(summarize(found["RESULT"]))
        else:
            rows.append(dict(gpus=n, error=f"no result (exit {rc}{', timed out' if timed_out else ''})"))
        if "CHECK" in found:
            checks[n] = found["CHECK"]
        if "error" not in rows[-1]:
            r = rows[-1]
            print(f"   {n} GPU(s): step {r['step_s']:.2f} s (gen {r['gen_s']:.2f} + update {r['update_s']:.2f}), "
                  f"{r['tokens_per_s']:.0f} tokens/s, peak {r['peak_gib']:.2f} GiB", flush=True)
        if args.out:  # after every run: a driver stopped from outside still leaves what it measured
            _write(args.out, dict(args=vars(args), runs=raw, summary=rows, partial=True))

    base = next((r for r in rows if r["gpus"] == 1 and "error" not in r), None)
    agree = []
    ref_n = 1 if 1 in checks else (min(checks) if checks else None)
    for n in sorted(checks):
        if n != ref_n:
            try:
                agree.append(agreement(args.work_dir, ref_n, n))
            except Exception as e:  # noqa: BLE001  (a report, not a crash, at the end of a long run)
                agree.append(dict(gpus=n, base_gpus=ref_n, error=repr(e)))
    device = next((x["RESULT"].get("device") for x in raw if "RESULT" in x), args.device)
    backend = next((x["RESULT"].get("backend") for x in raw if "RESULT" in x), None)
    print(f"\n## Data-parallel GRPO step, {device}, rollout backend {backend}\n"
          f"global batch {args.global_prompts} prompts x G={args.group}, {args.new_tokens} new tokens (forced), "
          f"prompt {args.prompt_len}; mean of {max(1, args.steps - 1)} step(s) after warm-up; times of the slowest rank; "
          f"scaling eff. = tokens/s per GPU / tokens/s at 1 GPU\n")
    print(table(rows, base))
    print()
    for a in agree:
        print(agreement_line(a) if "error" not in a else f"agreement {a['gpus']} vs {a['base_gpus']}: {a['error']}")
    if not agree:
        print("agreement: not available (need CHECK results of two GPU counts)")
    print(f"\ntotal {time.time() - t_all:.1f} s", flush=True)
    if args.out:
        _write(args.out, dict(args=vars(args), runs=raw, summary=rows, agreement=agree, total_s=time.time() - t_all))
        print(f"raw results: {args.out}")
    if own_dir and args.device == "cpu":
        shutil.rmtree(args.work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
