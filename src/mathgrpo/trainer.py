"""The GRPO loop: sample -> score -> advantages -> update -> log/save.

    mathgrpo train                      # embedded default: SmolLM2-135M on built-in arithmetic, CPU
    mathgrpo train cfg.yaml trainer.max_steps=80
    mathgrpo train cfg.yaml --resume    # continue the newest run exactly where it stopped

    torchrun --nproc_per_node=4 -m mathgrpo train cfg.yaml   # data-parallel over 4 ranks (distributed.py)

Every step draws `prompts_per_step` problems, samples G completions each through the rollout backend,
scores them, normalises rewards per group and runs `num_iterations` optimizer steps over the rollout in
token-budgeted micro-batches. Randomness is re-seeded from (seed, step, rank) at every step, so a resumed
run repeats the uninterrupted one step for step. Under torchrun each rank takes its share of the step's
prompts and gradients are averaged over ranks (full fine-tuning: weights, gradients and Adam state sharded
with FSDP2, trainer.fsdp); rank 0 alone writes files.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from . import runs
from .config import Config, dump_yaml, max_new_tokens_at
from .data import Problem, ProblemSet, load_problems
from .distributed import SINGLE, World, batch_line, process_group, rank_seed
from .fsdp import gathered, is_sharded, rollout_for, shard_model, use_fsdp
from .logger import NullLogger, RunLogger
from .loss import (bnpo_row_norms, effective_mask, group_advantages, grpo_loss, token_means, unscorable_as_nan,
                   zero_std_fraction)
from .models import Reference, completion_logprobs, load_model
from .packing import packed_microbatches
from .prompts import PromptBuilder
from .rewards import RewardSet
from .rollout import Completions, make_rollout
from .sampling import sample_step


@dataclass
class Sampler:
    """Deterministic problem order: a fresh seeded permutation every epoch; its position is checkpointed."""

    n: int
    seed: int
    epoch: int = 0
    position: int = 0
    order: list[int] = field(default_factory=list)

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if not self.order or self.position >= len(self.order):
                if self.order:
                    self.epoch += 1
                self.order = list(range(self.n))
                random.Random(self.seed + self.epoch).shuffle(self.order)
                self.position = 0
            out.append(self.order[self.position])
            self.position += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "order": self.order}


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**31)


def at_step(cfg: Config, step: int) -> Config:
    """cfg with generation.max_new_tokens at its value for `step` (an int; a length curriculum resolved)."""
    return replace(cfg, generation=replace(cfg.generation, max_new_tokens=max_new_tokens_at(
        cfg.generation.max_new_tokens, step)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_optimizer(model, cfg: Config):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: enable model.lora or full fine-tuning")
    t = cfg.trainer
    opt = torch.optim.AdamW(params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                            weight_decay=t.weight_decay)
    total = max(1, t.max_steps * cfg.grpo.num_iterations)

    def factor(i: int) -> float:
        if i < t.warmup_steps:
            return (i + 1) / (t.warmup_steps + 1)
        frac = (i - t.warmup_steps) / max(1, total - t.warmup_steps)
        return {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[t.lr_scheduler]

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def prepare_policy(model, cfg: Config, world: World = SINGLE) -> Reference:
    """The KL reference, then FSDP2 sharding of the policy and of a full fine-tuning reference copy when
    trainer.fsdp asks for it (distributed.py); the reference comes first since FSDP modules cannot be copied."""
    ref = Reference(model, cfg.grpo.beta, cfg.model.lora)
    if use_fsdp(cfg.trainer.fsdp, cfg.model.lora, world):
        for m in (model, ref.copy):
            if m is not None:
                shard_model(m, world)
    return ref


def microbatches(total_lengths: list[int], budget: int) -> list[list[int]]:
    """Row groups whose padded size (rows x longest row) stays within `budget` tokens; similar lengths
    are grouped (stable sort) so short completions are not padded to long ones."""
    order = sorted(range(len(total_lengths)), key=lambda i: total_lengths[i])
    groups, cur, longest = [], [], 0
    for i in order:
        new_longest = max(longest, total_lengths[i])
        if cur and new_longest * (len(cur) + 1) > budget:
            groups.append(cur)
            cur, new_longest = [], total_lengths[i]
        cur.append(i)
        longest = new_longest
    if cur:
        groups.append(cur)
    return groups


def policy_update(model, optimizer, scheduler, ref: Reference, comp: Completions, adv: torch.Tensor,
                  cfg: Config, world: World = SINGLE, keep_grads: bool = False) -> dict:
    """num_iterations optimizer steps over one rollout (this rank's rows); returns this rank's averaged loss
    metrics. With several ranks, gradients are averaged over ranks before each step (distributed.py).
    Gradients are freed at the end (generation gets their memory) unless keep_grads (tests inspect them)."""
    g, t = cfg.grpo, cfg.trainer
    mask = comp.completion_mask.float()  # [N, T]
    n_rows = mask.shape[0]
    lengths = comp.completion_mask.sum(1).tolist()
    split = packed_microbatches if t.pack_sequences else microbatches
    groups = split([len(p) + int(n) for p, n in zip(comp.prompt_ids, lengths)], t.max_tokens_per_microbatch)
    sharded = is_sharded(model)
    if sharded:  # every FSDP2 forward and backward is a collective: the same number of micro-batches on every rank
        groups = world.match_microbatches(groups)
    eff = effective_mask(mask, comp.truncated, g.mask_truncated_completions)  # [N, T]
    tokens = float(eff.sum())
    seq_count, token_count = world.loss_counts(g.loss_type, n_rows, tokens)
    row_norm = bnpo_row_norms(eff, g.bnpo_batch_rows) if g.loss_type == "bnpo" else None  # [N]
    device = next(p for p in model.parameters() if p.requires_grad).device

    def logp_of(m, rows: list[int], with_entropy: bool = False):  # [len(rows), T_rows] (and entropy, same shape)
        width = max(1, max(lengths[i] for i in rows))
        return completion_logprobs(m, [comp.prompt_ids[i] for i in rows], comp.completion_ids[rows, :width],
                                   chunk_size=t.logprob_chunk_size, temperature=max(cfg.generation.temperature, 1e-6),
                                   with_entropy=with_entropy,
                                   lengths=[int(lengths[i]) for i in rows] if t.pack_sequences else None)

    fixed: dict[str, dict[int, torch.Tensor]] = {"old": {}, "ref": {}}
    with torch.no_grad():
        for k, rows in enumerate(groups):
            if g.beta > 0:
                with ref.context(model) as rm:
                    fixed["ref"][k] = logp_of(rm, rows)
    sums: dict[str, float] = {}
    for it in range(g.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        loss_total = 0.0
        for k, rows in enumerate(groups):
            logp, entropy = logp_of(model, rows, with_entropy=True)  # entropy: logged, and top_entropy_quantile
            width = logp.shape[1]
            if it == 0 and g.num_iterations > 1:
                # The old policy is this iteration's policy: its log-probs are taken from this very pass (same
                # dropout mask, so the first ratio is exactly 1, and no extra forward pass).
                fixed["old"][k] = logp.detach()
            loss, m = grpo_loss(
                logp, fixed["old"].get(k), fixed["ref"].get(k), adv[rows].to(device), mask[rows, :width].to(device),
                loss_type=g.loss_type, epsilon_low=g.epsilon, epsilon_high=g.epsilon_high, beta=g.beta,
                max_completion_length=cfg.generation.max_new_tokens, token_count=token_count, seq_count=seq_count,
                truncated=comp.truncated[rows].to(device), mask_truncated=g.mask_truncated_completions,
                importance_sampling_level=g.importance_sampling_level, use_bias_correction_kl=g.use_bias_correction_kl,
                sapo_temperature_pos=g.sapo_temperature_pos, sapo_temperature_neg=g.sapo_temperature_neg,
                row_norm=None if row_norm is None else row_norm[rows].to(device),
                entropy=entropy, top_entropy_quantile=g.top_entropy_quantile)
            loss.backward()
            loss_total += float(loss.detach())
            for key, v in m.items():  # token sums: token-weighted means over micro-batches and ranks below
                sums[key] = sums.get(key, 0.0) + v / g.num_iterations
        params = [p for p in model.parameters() if p.requires_grad]
        if not sharded:  # (FSDP2 reduce-scatters, averaging over ranks, in every backward)
            world.all_reduce_grads(params)  # after the last micro-batch: ranks may run different numbers of them
        # the global norm, also over FSDP2's DTensor gradients (a replicated DTensor: the same float on every rank);
        # max_grad_norm=0 means no clipping (torch would scale every gradient to 0)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or float("inf")))
        optimizer.step()
        scheduler.step()
        sums["loss"] = sums.get("loss", 0.0) + loss_total / g.num_iterations
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm / g.num_iterations
    if not keep_grads:
        optimizer.zero_grad(set_to_none=True)
    # every rank returns the global token means (TRL's global_masked_mean); the mean over ranks of sums is sum / W
    summed = world.reduce_metrics({k: v for k, v in sums.items() if k.endswith("_sum") or k == "num_tokens"})
    means = {**token_means(summed), "num_tokens": summed["num_tokens"] * world.size}  # tokens in the loss, all ranks
    return {**{k: v for k, v in sums.items() if k not in summed}, **means}


def rollout_metrics(lengths: np.ndarray, truncated: np.ndarray, names: list[str], per: np.ndarray,
                    total: np.ndarray, group: int) -> dict:
    """Reward and length statistics of a rollout: lengths/truncated/total [N], per [N, R], whole groups."""
    lens = lengths.astype(np.float64)
    # as TRL 1.16: rows no reward could score (all None) are left out; stds are unbiased (Bessel)
    scored = unscorable_as_nan(torch.from_numpy(per), torch.from_numpy(total)).numpy()  # [N]
    m = {"reward": _nanmean(scored), "reward_std": _nanstd(scored),
         "frac_zero_std": zero_std_fraction(torch.from_numpy(scored), group),
         "completion_length_mean": float(lens.mean()), "completion_length_max": float(lens.max()),
         "truncated_frac": float(truncated.astype(np.float64).mean())}
    for j, name in enumerate(names):
        col = per[:, j]
        m[f"rewards/{name}/mean"] = _nanmean(col)
        m[f"rewards/{name}/std"] = _nanstd(col)
    return m


def _nanmean(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def _nanstd(x: np.ndarray) -> float:  # Bessel's correction, as TRL's nanstd; NaN with fewer than 2 values
    return float(np.nanstd(x, ddof=1)) if np.isfinite(x).sum() > 1 else float("nan")


def rank_advantages(world: World, per: np.ndarray, total: np.ndarray, group: int, scale_rewards: str) -> torch.Tensor:
    """This rank's advantages [N] (rows prompt-major): rows no reward could score are NaN (advantage 0, out of
    their group's statistics), and the advantages are computed over the global batch (every rank's rows in rank
    order), so scale_rewards=batch divides by the global std, as TRL 1.16 does; groups never span ranks."""
    mine = unscorable_as_nan(torch.from_numpy(per), torch.from_numpy(total))  # [N]
    everyone = torch.cat(world.gather_objects([mine]))  # [W * N]
    return group_advantages(everyone, group, scale_rewards)[world.rank * len(mine):(world.rank + 1) * len(mine)]


class StopFlag:
    """SIGINT/SIGTERM ask the loop to stop after the current step (with a checkpoint)."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the host application
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def make_run_dir(cfg: Config) -> tuple[Path, Path | None]:
    """(run dir, checkpoint to resume from or None)."""
    t = cfg.trainer
    if t.resume:
        start = ckpt.find_resume(t.resume, Path(t.output_dir))
        return start.parent.parent, start
    return runs.create_run_dir(cfg), None  # claimed exclusively, config.yaml written


def _truncate_metrics(run: Path, last_step: int) -> None:
    """On resume, forget steps logged after the checkpoint: they are about to be redone."""
    runs.truncate_logs(run, last_step)


def step_metrics(world: World, comp: Completions, names: list[str], per: np.ndarray, total: np.ndarray, group: int,
                 update: dict, times: dict) -> dict:
    """Metrics of the global step: rollout statistics over every rank's rows (whole groups, rank order),
    update metrics averaged over ranks, times of the slowest rank. One rank: this rank's numbers."""
    parts = world.gather_objects([(comp.lengths.cpu().numpy(), comp.truncated.cpu().numpy(), per, total)])
    lengths, truncated, per_all, total_all = (np.concatenate(x) for x in zip(*parts))
    times = world.reduce_metrics(times, op="max")
    return {**rollout_metrics(lengths, truncated, names, per_all, total_all, group), **world.reduce_metrics(update),
            **times, "tokens_per_s": float(lengths.sum()) / times["step_time"]}


def train(cfg: Config, quiet: bool = False, *, model=None, tokenizer=None, data: ProblemSet | None = None,
          prompts=None, reward_funcs: list | None = None, callbacks: list | None = None) -> Path:
    """Run GRPO as configured. The keyword hooks let library callers (the TRL front door) pass a loaded
    model/tokenizer, their own problems, a prompt builder (`.ids(text)`, `.text(text)`, `.prefill`),
    reward callables (used instead of cfg.rewards.functions, weighted by cfg.rewards.weights), and
    callbacks called as `cb(step, metrics)` after every step. Under torchrun every rank calls this (the
    process group is started here unless the caller started one); callbacks run on every rank with the
    metrics reduced over ranks; the run dir is returned on every rank, written by rank 0 alone."""
    with process_group(cfg.model.device) as world:
        return _train(cfg, world, quiet, model=model, tokenizer=tokenizer, data=data, prompts=prompts,
                      reward_funcs=reward_funcs, callbacks=callbacks)


def _train(cfg: Config, world: World, quiet: bool, *, model, tokenizer, data, prompts, reward_funcs,
           callbacks) -> Path:
    world.share(cfg.trainer.prompts_per_step)  # a global batch that does not split fails before any work
    data = data or load_problems(cfg.data, seed=cfg.trainer.seed)  # (bad data: no run folder is made)
    run, resume_from = world.broadcast_object(make_run_dir(cfg) if world.is_main else None)
    depends = runs.fingerprints(data)  # checked on resume before any model is loaded
    changes = runs.check_resume(resume_from, cfg, depends) if resume_from is not None else {}
    seed_everything(cfg.trainer.seed)
    if model is None:
        model, tok = load_model(replace(cfg.model, device=world.model_device(cfg.model.device)), trainable=True)
    else:
        tok = tokenizer
    if world.is_main:
        (run / "data_report.txt").write_text(data.report + "\n")
    prompts = prompts or PromptBuilder(tok, cfg.prompt, cfg.data.answer_mod)
    funcs = reward_funcs or cfg.rewards.functions
    rewards = RewardSet(list(zip(funcs, cfg.rewards.weights or [1.0] * len(funcs))))
    ref = prepare_policy(model, cfg, world)
    rollout = rollout_for(model, lambda: make_rollout(cfg.generation, model, tok))  # on gathered weights if sharded
    optimizer, scheduler = make_optimizer(model, cfg)
    sampler = Sampler(len(data.train), cfg.trainer.seed)  # global: the same draws on every rank
    start = 0
    if resume_from is not None:  # every rank loads the same weights and optimizer state (or its shard of them)
        state = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler, world)
        start = state["step"]
        sampler = Sampler(len(data.train), cfg.trainer.seed, **state["sampler"])
        if world.is_main:
            _truncate_metrics(run, start)
            runs.record_resume(run, resume_from, start, changes, cfg)
    world.broadcast_params([p for p in model.parameters() if p.requires_grad])  # identical replicas, as DDP
    rollout.sync_weights(model)  # backends holding their own weight copy must sample from the loaded weights
    G = cfg.grpo.num_generations
    logger = RunLogger(run, cfg.trainer.tensorboard, cfg.trainer.max_steps, start, quiet, cfg=cfg) if world.is_main \
        else NullLogger()
    logger.write(f"run dir: {run}\n{data.report}")
    logger.write(batch_line(cfg.trainer.prompts_per_step, G, world, cfg.trainer.max_tokens_per_microbatch,
                            cfg.grpo.num_iterations, is_sharded(model))
                 + (f"; resumed from {resume_from}" if resume_from else "")
                 + "".join(f"\nchanged on resume: {k} {a!r} -> {b!r} (recorded in resumes.jsonl)"
                           for k, (a, b) in changes.items()))
    state_of = lambda s: {"step": s, "sampler": sampler.state(), "max_steps": cfg.trainer.max_steps,  # noqa: E731
                          "depends": depends}
    step, stopped = start, False
    guard = ckpt.SaveOnError(run, model, optimizer, scheduler, cfg, world, state_of, start)
    with StopFlag() as stop, guard:
        for step in range(start + 1, cfg.trainer.max_steps + 1):
            guard.begin(step, sampler.state())
            t0 = time.perf_counter()
            # Every rank draws the same global batch and takes its contiguous share: a group never spans ranks.
            # (sampling.py: dynamic sampling's extra rounds; the length curriculum's cap for this step.)
            step_cfg, cap = at_step(cfg, step), max_new_tokens_at(cfg.generation.max_new_tokens, step)
            if isinstance(cfg.generation.max_new_tokens, dict) and (
                    step == start + 1 or cap != max_new_tokens_at(cfg.generation.max_new_tokens, step - 1)):
                logger.write(f"step {step}: generation.max_new_tokens = {cap} (length curriculum)")
            seed = rank_seed(step_seed(cfg.trainer.seed, step), world.rank)
            got = sample_step(step_seed(cfg.trainer.seed, step), sampler, data.train, rollout, prompts, rewards,
                              step_cfg, world, tok.pad_token_id or 0, step)
            batch: list[Problem] = got.batch
            comp, per, total = got.comp, got.per, got.total
            if got.note:
                logger.write(got.note)
            adv = rank_advantages(world, per, total, G, cfg.grpo.scale_rewards)  # [N]
            t1 = time.perf_counter()
            if cfg.generation.release_memory and hasattr(rollout, "release"):
                rollout.release()  # the update's activations get the KV cache's memory
            torch.manual_seed(seed + 1)  # LoRA dropout
            upd = {**policy_update(model, optimizer, scheduler, ref, comp, adv, step_cfg, world),
                   "lr": scheduler.get_last_lr()[0]}
            rollout.sync_weights(model)
            now = time.perf_counter()
            metrics = step_metrics(world, comp, rewards.names, per, total, G, upd,
                                   {"step_time": now - t0, "gen_time": t1 - t0, "update_time": now - t1})
            metrics.update(got.metrics)
            if isinstance(cfg.generation.max_new_tokens, dict):
                metrics["max_new_tokens"] = cap
            logger.log(step, metrics, step % cfg.trainer.logging_steps == 0)
            # a callback returning something truthy asks to stop after this step (checkpointed like a signal)
            wants_stop = any([bool(cb(step, metrics)) for cb in callbacks or ()])
            n = cfg.trainer.log_completions_steps
            if n and (step == 1 or step % n == 0 or step == cfg.trainer.max_steps):
                logger.log_completions(step, world.gather_objects(
                    [{"problem": p.problem, "gold": p.gold, "completion": comp.texts[i * G + j],
                      "length": int(comp.lengths[i * G + j]), "truncated": bool(comp.truncated[i * G + j]),
                      "reward": float(total[i * G + j])} for i, p in enumerate(batch) for j in range(G)]))
            stopped = world.any(stop.requested or wants_stop)  # a signal seen by any rank stops all after this same step
            last = step == cfg.trainer.max_steps
            if last or stopped or step % cfg.trainer.save_steps == 0:
                path = ckpt.save_checkpoint(run, step, model, optimizer, scheduler, state_of(step), dump_yaml(cfg),
                                            cfg.trainer.save_total_limit, world)  # rank 0 writes, all gather
                world.barrier()  # nobody moves on (or exits) before the checkpoint is complete
            if stopped and not last:
                logger.write(f"stopped after step {step}; checkpoint {path}\n"
                             f"resume with: mathgrpo train {run / 'config.yaml'} --resume {run}")
                break
    logger.close()
    ckpt.save_weights(model, run / ("adapter" if cfg.model.lora else "model"), world)  # rank 0 writes, all gather
    if world.is_main:
        summary = summarize(run, rewards.names)
        (run / "summary.json").write_text(json.dumps(summary, indent=1))
        print(format_summary(summary))
    if step == cfg.trainer.max_steps and cfg.trainer.eval_at_end and data.test and not stopped:
        from .evaluate import evaluate_trained_run

        with gathered(model):  # FSDP2: gathered once, as ranks sample different numbers of batches
            evaluate_trained_run(cfg, run, model, tok, data.test, rollout=rollout, world=world)  # sharded over ranks
    elif world.is_main:
        _write_report(run)
    return run


def _write_report(run: Path) -> None:
    from .report import write_report

    md, _ = write_report(run)
    print(f"report: {md}")


def summarize(run: Path, names: list[str], window: int = 10) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    first, last = rows[:window], rows[-window:]
    out = {"run_dir": str(run), "steps": len(rows), "window": window}
    for key in ["reward"] + [f"rewards/{n}/mean" for n in names]:
        vals = lambda rs: [r[key] for r in rs if r.get(key) is not None]  # noqa: E731
        f, l_ = vals(first), vals(last)
        out[key] = {"first": float(np.mean(f)) if f else None, "last": float(np.mean(l_)) if l_ else None}
    out["step_time_mean"] = float(np.mean([r["step_time"] for r in rows])) if rows else None
    return out


def format_summary(s: dict) -> str:
    lines = [f"summary of {s['run_dir']} ({s['steps']} steps): mean of the first {s['window']} vs last {s['window']} steps"]
    for key, v in s.items():
        if isinstance(v, dict) and v.get("first") is not None:
            lines.append(f"  {key:<28} {v['first']:.3f} -> {v['last']:.3f}")
    return "\n".join(lines)
