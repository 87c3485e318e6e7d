"""How far the fast engine's sampling log-probs are from the update's, and what correcting for it costs.

    PYTHONPATH=src python -m benchmarks.mismatch                  # CUDA: 1.5B shape, bf16 + LoRA copy, then NF4 + LoRA
    PYTHONPATH=src python -m benchmarks.mismatch --tiny           # CPU smoke test (tiny shape, fp32), seconds

The model is a random-initialised Qwen2 of DeepSeek-R1-Distill-Qwen-1.5B's shape with a word-level tokenizer
(`common.make_model_dir`; no real weights can be fetched on the GPU machine), LoRA r=32 on all seven projections
with B drawn non-zero (std --lora-std) so that the engine's merged copy differs from the base. The final RMSNorm's
weight is multiplied by --logit-scale: random init gives near-uniform next-token distributions (entropy ~ log V),
which says little about a trained model's mismatch; the scale sharpens them (the printed entropy says how much).
Per base (bf16, nf4): one rollout of --prompts x --group completions of --new-tokens tokens from the fast engine
(generation.lora_merge=copy: sampling from merged weights with the engine's kernels, Completions.logprobs), then
the trainer's update stage on it under each grpo.sampler_correction (none, token_truncate, sequence_mask), --reps
times after one warm-up, learning rate 1e-9 (the weights hardly move: every repetition sees the same mismatch).
Printed: the mismatch the update logs (sampler/logp_diff = mean |log pi_train - log pi_sampler|, its max, the token
ratio's mean, std, min and max), the share of tokens whose ratio passes the cap (3.0), the policy's mean entropy,
and the update's seconds per setting (mean of --reps, CUDA-synchronised).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from benchmarks.common import PROJECTIONS, SHAPES, load_tokenizer, make_model_dir, sync

CORRECTIONS = ("none", "token_truncate", "sequence_mask")


def config(args, quant: str | None):
    from mathgrpo.config import Config

    cfg = Config()
    m = cfg.model
    m.name_or_path, m.device, m.quantization = args.model_dir, args.device, quant
    m.dtype = "bfloat16" if args.device != "cpu" else "float32"
    m.lora_r, m.lora_alpha, m.lora_dropout, m.lora_target_modules = 32, 32, 0.0, list(PROJECTIONS)
    m.gradient_checkpointing, m.attn_implementation = args.device != "cpu", "sdpa"
    g = cfg.generation
    g.backend, g.lora_merge, g.max_new_tokens, g.temperature = "fast", "copy", args.new_tokens, 1.0
    cfg.grpo.num_generations, cfg.grpo.beta, cfg.grpo.loss_type = args.group, 0.0, "dapo"
    cfg.trainer.learning_rate, cfg.trainer.lr_scheduler, cfg.trainer.max_steps = 1e-9, "constant", 1000
    return cfg


def run_base(args, quant: str | None) -> dict:
    import torch

    from mathgrpo.advantages import group_advantages
    from mathgrpo.models import Reference, completion_logprobs, load_model
    from mathgrpo.rollout import SamplingConfig, make_rollout
    from mathgrpo.update import make_optimizer, update_stage

    cfg = config(args, quant)
    torch.manual_seed(0)
    model, _ = load_model(cfg.model, trainable=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, args.lora_std)
            if name.endswith("model.norm.weight"):
                p.mul_(args.logit_scale)
    tok = load_tokenizer(args.model_dir)
    rollout = make_rollout(cfg.generation, model, tok)
    rollout.sync_weights(model)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, SHAPES[args.shape]["vocab_size"], (args.prompts, args.prompt_len), generator=g).tolist()
    comp = rollout.generate(prompts, args.group, SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0,
                                                                ignore_eos=True, seed=0))
    assert comp.logprobs is not None, "the fast engine returned no log-probs"
    with torch.no_grad():  # the policy's entropy and the share of tokens past the cap, directly
        rows = list(range(min(len(comp.prompt_ids), 8)))
        logp, ent = completion_logprobs(model, [comp.prompt_ids[i] for i in rows], comp.completion_ids[rows],
                                        with_entropy=True)
        mask = comp.completion_mask[rows].bool()
        over = ((logp - comp.logprobs[rows].to(logp.device)).exp() > 3.0)[mask].float().mean().item()
        entropy = ent[mask].float().mean().item()
    ref = Reference(model, cfg.grpo.beta, lora=True)
    optimizer, scheduler = make_optimizer(model, cfg)
    adv = group_advantages(torch.randn(comp.completion_ids.shape[0], generator=g), args.group)
    out = {"base": quant or cfg.model.dtype, "completion_tokens": int(comp.lengths.sum()), "entropy": entropy,
           "ratio_over_cap_frac": over, "update_s": {}}
    for correction in CORRECTIONS:
        cfg.grpo.sampler_correction = correction
        times = []
        for rep in range(args.reps + 1):
            sync()
            t0 = time.perf_counter()
            metrics = update_stage(model, optimizer, scheduler, ref, comp, adv, cfg, rollout=None)
            sync()
            if rep:  # the first is a warm-up
                times.append(time.perf_counter() - t0)
        out["update_s"][correction] = sum(times) / len(times)
        out.update({k: v for k, v in metrics.items() if k.startswith("sampler/")})
        print(f"[{out['base']}] {correction}: update {out['update_s'][correction]:.3f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shape on CPU, fp32, bf16 base only")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--lora-std", type=float, default=1e-3)
    ap.add_argument("--logit-scale", type=float, default=1.0)
    ap.add_argument("--bases", nargs="+", default=["bf16", "nf4"], choices=["bf16", "nf4"])
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    args.shape, args.device = "1.5b", "cuda"
    if args.tiny:
        args.shape, args.device, args.bases = "tiny", "cpu", ["bf16"]
        args.prompts, args.group, args.new_tokens, args.prompt_len, args.reps = 2, 4, 16, 8, 2
    with tempfile.TemporaryDirectory() as d:
        args.model_dir = d
        make_model_dir(args)
        results = [run_base(args, None if b == "bf16" else "nf4") for b in args.bases]
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
