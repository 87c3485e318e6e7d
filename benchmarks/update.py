"""The update alone, profiled and in variants: where its time goes and what each switch buys.

    PYTHONPATH=src python -m benchmarks.update                                   # lora-1k + uneven-8k, CUDA
    PYTHONPATH=src python -m benchmarks.update --workloads uneven-8k --variants gc=layer pack=1:gc=none --profile
    PYTHONPATH=src python -m benchmarks.update --tiny                            # CPU smoke test, seconds

One subprocess per workload loads the random model (benchmarks.common) of DeepSeek-R1-Distill-Qwen-1.5B's shape once (bf16,
sdpa, LoRA r=32 on all seven projections, beta 0.04, loss "grpo") and runs the trainer's `policy_update` on
canned completions of the workload's lengths (`common.canned_completions`: random tokens; lora-1k forced to
1,024, uneven-8k log-normal) under each variant in turn, `--steps` updates each, the first a warm-up.
Variant keys (':'-separated): pack=0|1 (trainer.pack_sequences), attn=auto|varlen|padded|rows (packed
attention, `packing.set_packed_attention`; pad=<ratio> its auto threshold), lmhead=triton|torch (the fused
lm_head log-prob kernels of lmhead.py, or the plain chunked path), gc=layer|none (activation checkpointing), lora=nf4|addmm|peft
(model.lora_fused_add: nf4 = the default, qlora.NF4LoRA on 4-bit layers and addmm on the others; addmm = addmm
on all; peft = off), budget=<tokens per micro-batch>, chunk=<log-prob chunk>, fused=1
(liger-kernel RMSNorm/SwiGLU/RoPE), gckeep=<N> (with gc=layer: N evenly spaced layers not checkpointed),
compile=1 (torch.compile of every decoder layer). fused and compile
cannot be undone, so variants with them run after the others. Printed per variant: update seconds, the
reference pass alone, peak memory, useful TFLOP/s (common.update_flops: real tokens only, no recompute) and
its share of the bf16 matmul peak measured in the same process (8192^3). --profile runs one more update of
the first variant (and of those marked prof=1) under torch.profiler: GPU time in matmuls, attention, other
kernels and GPU idle. --sync-check runs one more update of the first variant under
torch.cuda.set_sync_debug_mode("warn") and reports how many synchronizing calls it made, and where.
--attention times packed attention alone (one layer's shapes, forward and forward+backward) per
micro-batch of each workload: the varlen FlashAttention-2 kernel, the padded / dense sdpa batch (cuDNN),
FlexAttention with a document block mask (compiled once, sequences padded to the budget) and cuDNN's own
varlen forward.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

from benchmarks.common import (LORA, WORKLOADS, canned_completions, child_env, drawn_lengths, load_tokenizer,
                               make_model_dir, markdown_table, mathgrpo_config, matmul_peak_tflops, module_command,
                               parse_options, peak_gib, prompt_ids, random_rewards, reset_peak, sync, timed,
                               update_flops)

DEFAULT_VARIANTS = ["gc=none:lmhead=torch", "gc=none", "pack=1:gc=none:attn=varlen", "pack=1:gc=none",
                    "pack=1:gc=none:attn=padded", "gc=none:fused=1", "pack=1:gc=none:fused=1",
                    "pack=1:gc=layer:fused=1"]
IRREVERSIBLE = ("fused", "compile")


def parse_variant(spec: str) -> dict:
    return parse_options(spec if spec != "base" else "", "--variants")


def apply_variant(model, cfg, opts: dict, state: dict) -> None:
    """Set the trainer keys and the model's checkpointing / kernels for one variant (state: what was done)."""
    from mathgrpo import lmhead
    from mathgrpo.models import backbone_and_head, enable_checkpointing, fuse_kernels, fuse_lora_add
    from mathgrpo.packing import set_packed_attention

    t = cfg.trainer
    t.pack_sequences = opts.get("pack", "0") == "1"
    t.max_tokens_per_microbatch = int(opts.get("budget", 16384))
    t.logprob_chunk_size = int(opts.get("chunk", 1024))
    gc = opts.get("gc", "layer")
    base = model.get_base_model()
    if gc == "none":
        (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()
    else:
        enable_checkpointing(model, keep_layers=int(opts.get("gckeep", 0)))
    lora = opts.get("lora", "nf4")
    fuse_lora_add(model, on=lora != "peft", qlora=lora == "nf4")
    set_packed_attention(opts.get("attn", "auto"), pad_ratio=float(opts["pad"]) if "pad" in opts else None)
    lmhead.set_fused(opts.get("lmhead", "triton") == "triton")
    if opts.get("fused") == "1" and not state.get("fused"):
        fuse_kernels(model)
        state["fused"] = True
    if opts.get("compile") == "1" and not state.get("compiled"):
        if t.pack_sequences:
            from mathgrpo.packing import varlen_kernel

            varlen_kernel()  # the one-time kernel check, outside the compiled region
        body, _ = backbone_and_head(model)
        for layer in body.layers:
            layer.compile(dynamic=True)
        state["compiled"] = True


def profile_update(run, model, steps_out: dict) -> None:
    """GPU time of one update by kernel kind (profiling.py: dequantisation, matmuls, LoRA's, attention, lm_head,
    optimizer, copies, ...), the GPU's idle share of the wall time, and the passes the update ran."""
    from benchmarks.profiling import PassCounter, profile_call

    with PassCounter(model) as passes:
        steps_out["profile"] = profile_call(run, lora_rank=LORA["r"])
    steps_out["profile"].update(passes.summary())


def sync_check(run, out: dict) -> None:
    """One update under torch.cuda.set_sync_debug_mode("warn"): the synchronizing calls it made, by call site."""
    import traceback
    import warnings

    import torch

    sites: dict[str, int] = {}
    shown = warnings.showwarning

    def record(message, category, *a, **k):
        if "synchroniz" not in str(message):
            return shown(message, category, *a, **k)
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        ours = [f for f in frames if "mathgrpo" in f.filename or "transformers" in f.filename or "peft" in f.filename]
        f = (ours or frames)[-1]
        key = f"{os.path.basename(f.filename)}:{f.lineno} {f.line}"[:140]
        sites[key] = sites.get(key, 0) + 1

    torch.cuda.set_sync_debug_mode("warn")
    warnings.showwarning = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            run()
            sync()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = shown
    out["syncs"] = sum(sites.values())
    out["sync_sites"] = dict(sorted(sites.items(), key=lambda kv: -kv[1])[:12])


def attention_bench(args, budget: int = 16384) -> None:
    """Packed attention alone, per micro-batch of each workload (12 heads, 2 KV heads, head_dim 128, bf16)."""
    import types

    import torch

    from mathgrpo.packing import (batched_attention, call_varlen, packed_microbatches, rows_layout,
                                  set_packed_attention, varlen_kernel)

    def bench(fn, reps=5):  # ms per call after one warm-up
        fn()
        return timed(fn, reps) * 1e3

    heads, kv, dim, dev = 12, 2, 128, "cuda"
    module = types.SimpleNamespace(is_causal=True, num_key_value_groups=heads // kv, training=False)
    fa2, kw = varlen_kernel()
    flex = None
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    except Exception as e:  # noqa: BLE001
        print(f"flex unavailable: {e}", flush=True)
    for name in args.workloads:
        rows_all = [args.prompt_len + n - 1 for n in drawn_lengths(WORKLOADS[name])]
        totals, seen = {}, {}
        for group in packed_microbatches(rows_all, budget):
            lens = tuple(sorted((rows_all[i] for i in group), reverse=True))
            if lens in seen:  # the same shape again (lora-1k): count its time, do not re-time it
                for vname, ms in seen[lens].items():
                    totals[vname] = totals.get(vname, 0.0) + ms
                continue
            s = sum(lens)
            q = torch.randn(1, heads, s, dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
            k, v = (torch.randn(1, kv, s, dim, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
            cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=dev, dtype=torch.int32)
            go = torch.randn(s, heads, dim, device=dev, dtype=torch.bfloat16)
            variants = {}
            if fa2 is not None:
                variants["varlen_fa2"] = lambda: call_varlen(fa2, kw, *(x[0].transpose(0, 1) for x in (q, k, v)), cu,
                                                             lens[0], None)
            set_packed_attention("padded")
            lay = rows_layout(lens, torch.device(dev))
            set_packed_attention("auto")
            variants["padded_sdpa"] = lambda: batched_attention(module, q, k, v, lay["mathgrpo_rows"],
                                                                lay.get("mathgrpo_pad"), None)
            if flex is not None:
                doc = torch.full((budget,), -1, device=dev, dtype=torch.int32)
                doc[:s] = torch.repeat_interleave(torch.arange(len(lens), device=dev, dtype=torch.int32),
                                                  torch.tensor(lens, device=dev))

                def mask_mod(b, h, qi, ki, doc=doc):
                    return (doc[qi] == doc[ki]) & (qi >= ki) & (doc[qi] >= 0)

                t0 = time.perf_counter()
                bm = create_block_mask(mask_mod, None, None, budget, budget, device=dev)
                mask_ms = (time.perf_counter() - t0) * 1e3
                pad = budget - s
                qf, kf, vf = (torch.nn.functional.pad(x.detach(), (0, 0, 0, pad)).requires_grad_() for x in (q, k, v))
                variants["flex"] = lambda: flex(qf, kf, vf, block_mask=bm, enable_gqa=True)[0, :, :s].transpose(0, 1)
            rec = dict(workload=name, rows=len(lens), tokens=s, longest=lens[0],
                       attn_tflop_fwd=4 * heads * dim * sum(n * n for n in lens) / 2 / 1e12)
            for vname, fn in variants.items():
                try:
                    fwd = bench(lambda: fn())
                    both = bench(lambda: torch.autograd.backward(fn(), go))
                    rec[vname] = dict(fwd_ms=round(fwd, 3), fwd_bwd_ms=round(both, 3))
                except Exception as e:  # noqa: BLE001
                    rec[vname] = f"{type(e).__name__}: {str(e)[:160]}"
            if flex is not None:
                rec["flex_block_mask_ms"] = round(mask_ms, 2)
            try:  # cuDNN's own varlen forward (torch's varlen_attn keeps it off; no GQA: K/V repeated)
                kr, vr = (x[0].transpose(0, 1).repeat_interleave(heads // kv, dim=1) for x in (k, v))
                qq = q[0].transpose(0, 1)
                rec["cudnn_varlen_fwd_ms"] = round(bench(lambda: torch.ops.aten._cudnn_attention_forward(
                    qq, kr, vr, None, cu, cu, lens[0], lens[0], True, 0.0, True, False)), 3)
            except Exception as e:  # noqa: BLE001
                rec["cudnn_varlen_fwd_ms"] = f"{type(e).__name__}: {str(e)[:160]}"
            seen[lens] = {vname: rec[vname]["fwd_bwd_ms"] for vname in variants if isinstance(rec.get(vname), dict)}
            for vname, ms in seen[lens].items():
                totals[vname] = totals.get(vname, 0.0) + ms
            print("ATTN " + json.dumps(rec), flush=True)
        print("ATTN_TOTAL " + json.dumps(dict(workload=name, fwd_bwd_ms_per_layer=totals)), flush=True)


def release_check(args) -> None:
    """generation.release_memory's cost, on the workload's canned rows with the fast engine attached: rounds of
    [update_stage, a 32-token generate] alternating release on / off (update seconds, generate seconds, graphs
    re-captured, whether the owned copy came back elsewhere), then a CUDA-graph re-capture alone (a 32-token
    generate after dropping the graphs, against one that replays them)."""
    import torch

    from mathgrpo.advantages import group_advantages
    from mathgrpo.models import Reference, load_model
    from mathgrpo.rollout import SamplingConfig, make_rollout
    from mathgrpo.rollout.fast_buffers import owned_pointers
    from mathgrpo.update import make_optimizer, update_stage

    w = WORKLOADS[args.workload]
    cfg = mathgrpo_config(args, w, {})
    model, _ = load_model(cfg.model, trainable=True)
    rollout = make_rollout(cfg.generation, model, load_tokenizer(args.model_dir))
    ref = Reference(model, cfg.grpo.beta, lora=True)
    optimizer, scheduler = make_optimizer(model, cfg)
    comp = canned_completions(args, w)
    adv = group_advantages(random_rewards(comp.completion_ids.shape[0], 0), w.group)
    prompts, short = prompt_ids(args, w), SamplingConfig(max_new_tokens=32, temperature=1.0, ignore_eos=True, seed=0)

    timed(lambda: rollout.generate(prompts, w.group, short))
    rounds = []
    for r in range(2 * args.steps):
        cfg.generation.release_memory = r % 2 == 0
        ptrs, caps = owned_pointers(rollout.w), rollout.captures
        upd = timed(lambda: update_stage(model, optimizer, scheduler, ref, comp, adv, cfg, rollout=rollout))
        gen = timed(lambda: rollout.generate(prompts, w.group, short))
        rounds.append(dict(release=cfg.generation.release_memory, update_s=upd, gen32_s=gen,
                           recaptures=rollout.captures - caps, owned_moved=owned_pointers(rollout.w) != ptrs))
        print(f"[{args.workload}] release round {json.dumps(rounds[-1])}", flush=True)
    replay = [timed(lambda: rollout.generate(prompts, w.group, short)) for _ in range(3)]
    recapture = []
    for _ in range(3):
        rollout.drop_graphs()
        recapture.append(timed(lambda: rollout.generate(prompts, w.group, short)))
    later = rounds[2:]  # the first pair warms up
    mean = lambda rs, k: sum(x[k] for x in rs) / max(1, len(rs))  # noqa: E731
    rec = dict(workload=args.workload, variant="release-check", rounds=rounds,
               update_s_release=mean([x for x in later if x["release"]], "update_s"),
               update_s_keep=mean([x for x in later if not x["release"]], "update_s"),
               gen32_s_release=mean([x for x in later if x["release"]], "gen32_s"),
               gen32_s_keep=mean([x for x in later if not x["release"]], "gen32_s"),
               gen32_replay_s=sorted(replay)[1], gen32_recapture_s=sorted(recapture)[1])
    rec["recapture_cost_s"] = rec["gen32_recapture_s"] - rec["gen32_replay_s"]
    print("RESULT " + json.dumps(rec), flush=True)


def run_workload(args) -> None:
    import torch

    from mathgrpo.advantages import group_advantages
    from mathgrpo.models import Reference, completion_logprobs, load_model
    from mathgrpo.update import make_optimizer, microbatches, policy_update
    from mathgrpo.packing import packed_microbatches

    w = WORKLOADS[args.workload]
    if args.new_tokens:
        w = w.with_new_tokens(args.new_tokens)
    peak = matmul_peak_tflops() if torch.cuda.is_available() else None
    cfg = mathgrpo_config(args, w, {})
    cfg.model.lora_fused_add = False  # set per variant
    model, _ = load_model(cfg.model, trainable=True)
    ref = Reference(model, cfg.grpo.beta, lora=True)
    optimizer, scheduler = make_optimizer(model, cfg)
    comp = canned_completions(args, w)
    lengths = comp.completion_mask.sum(1).tolist()
    adv = group_advantages(random_rewards(len(lengths), 0), w.group)
    rows = [(len(p) + n, n) for p, n in zip(comp.prompt_ids, lengths)]
    flops = update_flops(args, rows)
    totals = [a for a, _ in rows]
    print(f"[{args.workload}] rows {len(rows)}, tokens {sum(totals)}, truncated {int(comp.truncated.sum())}, "
          f"matmul peak {peak} TFLOP/s, useful update {flops / 1e12:.1f} TFLOP", flush=True)
    variants = sorted(args.variants, key=lambda v: any(k in parse_variant(v) for k in IRREVERSIBLE))  # stable
    state: dict = {}
    for k, spec in enumerate(variants):
        opts = parse_variant(spec)
        rec = dict(workload=args.workload, variant=spec, matmul_peak_tflops=peak, useful_tflop=flops / 1e12)
        try:
            apply_variant(model, cfg, opts, state)
            t = cfg.trainer
            split = packed_microbatches if t.pack_sequences else microbatches
            groups = split(totals, t.max_tokens_per_microbatch)
            padded = sum(len(g) * max(totals[i] for i in g) for g in groups)
            rec.update(microbatches=len(groups), padded_tokens=padded if not t.pack_sequences else sum(totals))

            def update():
                policy_update(model, optimizer, scheduler, ref, comp, adv, cfg)
                optimizer.zero_grad(set_to_none=True)  # as the trainer's update stage

            def ref_pass():
                with torch.no_grad():
                    for g in groups:
                        with ref.context(model) as rm:
                            completion_logprobs(rm, [comp.prompt_ids[i] for i in g],
                                                comp.completion_ids[g, :max(lengths[i] for i in g)],
                                                lengths=[lengths[i] for i in g] if t.pack_sequences else None)

            reset_peak()
            times = []
            for _ in range(args.steps):
                sync()
                t0 = time.perf_counter()
                update()
                sync()
                times.append(time.perf_counter() - t0)
            rec.update(first_s=times[0], update_s=sum(times[1:]) / max(1, len(times) - 1), peak_gib=peak_gib())
            sync()
            t0 = time.perf_counter()
            ref_pass()
            sync()
            rec["ref_pass_s"] = time.perf_counter() - t0
            rec["tflops"] = flops / 1e12 / rec["update_s"]
            if peak:
                rec["pct_of_peak"] = 100 * rec["tflops"] / peak
            if args.profile and (k == 0 or opts.get("prof") == "1") and torch.cuda.is_available():
                profile_update(update, model, rec)
            if args.sync_check and k == 0 and torch.cuda.is_available():
                sync_check(update, rec)
        except Exception as e:  # noqa: BLE001  (one failing variant must not lose the others' numbers)
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print("RESULT " + json.dumps(rec), flush=True)


def table(rows: list[dict]) -> str:
    cols = ["workload", "variant", "microbatches", "padded_tokens", "update_s", "ref_pass_s", "peak_gib", "tflops",
            "pct_of_peak", "syncs", "error"]
    return markdown_table(rows, cols)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=["lora-1k", "uneven-8k"], choices=list(WORKLOADS))
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    ap.add_argument("--steps", type=int, default=2, help="updates per variant (the first one warms up)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler breakdown of the first variant")
    ap.add_argument("--sync-check", action="store_true", help="count the first variant's synchronizing calls")
    ap.add_argument("--attention", action="store_true", help="time packed attention alone per micro-batch")
    ap.add_argument("--release-check", action="store_true",
                    help="generation.release_memory's cost in the update and a graph re-capture's (fast engine, CUDA)")
    ap.add_argument("--shape", default="1.5b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shape on CPU, 16 new tokens: a smoke test")
    ap.add_argument("--new-tokens", type=int, default=0)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per workload")
    ap.add_argument("--out", default=None, help="append JSON lines of raw results here")
    ap.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.backend, args.steps_total = "auto", args.steps
    if args.tiny:
        args.shape, args.device, args.new_tokens, args.prompt_len = "tiny", "cpu", args.new_tokens or 16, 8
        args.variants = [v for v in args.variants if "fused" not in v and "compile" not in v]
    for v in args.variants:
        parse_variant(v)
    if args.attention:
        return attention_bench(args)
    if args.workload:
        return release_check(args) if args.release_check else run_workload(args)
    import tempfile

    if args.model_dir is None:
        args.model_dir = tempfile.mkdtemp(prefix="mathgrpo-update-")
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        make_model_dir(args)
    rows = []
    for wl in args.workloads:
        cmd = module_command("benchmarks.update", "--workload", wl, "--model-dir", args.model_dir, "--shape",
                             args.shape, "--device", args.device, "--steps", str(args.steps), "--new-tokens",
                             str(args.new_tokens), "--prompt-len", str(args.prompt_len), "--variants", *args.variants)
        cmd += ["--profile"] if args.profile else []
        cmd += ["--sync-check"] if args.sync_check else []
        cmd += ["--release-check"] if args.release_check else []
        print(f"== {wl}", flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
        t0 = time.time()
        for line in proc.stdout:
            if line.startswith("RESULT "):
                rec = json.loads(line[7:])
                rows.append(rec)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                print(json.dumps({k: v for k, v in rec.items() if k not in ("profile", "sync_sites", "rounds")}), flush=True)
                for key in ("profile", "sync_sites", "rounds"):
                    if key in rec:
                        print(json.dumps(rec[key], indent=1), flush=True)
            else:
                print("   " + line.rstrip()[:300], flush=True)
            if time.time() - t0 > args.timeout:
                proc.kill()
                print(f"   !! {wl}: stopped after {args.timeout} s", flush=True)
                break
        proc.wait()
        print(table(rows), flush=True)


if __name__ == "__main__":
    main()
