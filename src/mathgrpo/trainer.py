"""The GRPO loop: rollout -> score -> advantages -> update -> log / checkpoint.

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

Read top to bottom, in the order things happen: `train` = `setup_run` (builds everything once into a `Run`),
the loop, `finish_run` (the final weights, the summary and the evaluation or report); each step is `train_step` =
`rollout_step` (sampling.py: draw, generate, score -> a RolloutBatch) -> `advantage_step` -> `update_step`
(update.py), then `log_step` and `save_step`. The summary and the small pieces the stages share come last.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from . import metrics as M
from . import runs
from .config import Config, ConfigError, dump_yaml, length_schedule, max_new_tokens_at
from .data import ProblemSet, load_problems
from .diagnose import Watch, diagnose
from .distributed import SINGLE, World, batch_line, process_group, rank_seed
from .files import read_jsonl
from .fsdp import gathered, is_sharded, rollout_for, shard_model, use_fsdp
from .logger import NullLogger, RunLogger
from .loading import pick_device, say
from .memory_plan import describe, plan_run, shape_from_config
from .models import Reference, enable_checkpointing, load_model
from .modelinfo import check_context
from .prompts import PromptBuilder
from .scoring import RewardSet
from .rollout import make_rollout
from .sampling import RolloutBatch, Sampler, rank_advantages, rollout_metrics, sample_step, step_seed
from .update import EntropyControl, make_optimizer, microbatches, policy_update, update_stage  # noqa: F401


# --- the loop --------------------------------------------------------------------------------------------------

def train(cfg: Config, quiet: bool = False, *, model=None, tokenizer=None, data: ProblemSet | None = None,
          prompts=None, reward_funcs: list | None = None, callbacks: list | None = None) -> Path:
    """Run GRPO as configured. The keyword hooks let library callers (the TRL front door) pass a loaded
    model/tokenizer, their own problems, a prompt builder (`.ids(text)`, `.text(text)`, `.prefill`),
    reward callables (used instead of cfg.rewards.functions, weighted by cfg.rewards.weights), and
    callbacks called as `cb(step, metrics)` after every step. Under torchrun every rank calls this (the
    process group is started here unless the caller started one); callbacks run on every rank with the
    metrics reduced over ranks; the run dir is returned on every rank, written by rank 0 alone."""
    with process_group(cfg.model.device) as world, contextlib.ExitStack() as held:
        run = setup_run(cfg, world, quiet, held, model=model, tokenizer=tokenizer, data=data, prompts=prompts,
                        reward_funcs=reward_funcs, callbacks=callbacks)
        step, stopped = _loop(run)
        finish_run(run, step, stopped)
        return run.dir


def _loop(run: Run) -> tuple[int, bool]:
    """Steps start+1 .. max_steps; a signal or a callback stops after a step, with a checkpoint. (last step, stopped)"""
    t = run.cfg.trainer
    step, stopped = run.start, False
    guard = ckpt.SaveOnError(run.dir, run.model, run.optimizer, run.scheduler, run.cfg, run.world, run.state,
                             run.start, run.synced_reference)
    with ckpt.StopFlag() as stop, guard:
        for step in range(run.start + 1, t.max_steps + 1):
            guard.begin(step, run.sampler.state())
            metrics, batch = train_step(run, step)
            wants_stop = log_step(run, step, batch, metrics)
            stopped = run.world.any(stop.requested or wants_stop)  # seen by any rank: all stop after this step
            last = step == t.max_steps
            if last or stopped or step % t.save_steps == 0:
                path = save_step(run, step)
            if stopped and not last:
                run.stop_signal = stop.signal
                run.logger.write(f"stopped after step {step}; checkpoint {path}\n"
                                 f"resume with: {runs.resume_command(run.dir)}")
                break
    return step, stopped


def finish_run(run: Run, step: int, stopped: bool) -> None:
    """Final weights, summary.json, then the end-of-training evaluation (a completed run) or the report."""
    cfg, world = run.cfg, run.world
    run.logger.close()
    ckpt.save_weights(run.model, run.dir / ("adapter" if cfg.model.lora else "model"), world)  # rank 0 writes
    if world.is_main:
        summary = summarize(run.dir, run.rewards.names, judge=(cfg, run.watch.rewards))
        summary["stopped_by"] = run.stop_signal.name if run.stop_signal else None  # the CLI's exit status
        (run.dir / "summary.json").write_text(json.dumps(summary, indent=1))
        print(format_summary(summary))
    if step == cfg.trainer.max_steps and cfg.trainer.eval_at_end and run.data.test and not stopped:
        from .evaluate import evaluate_trained_run

        with gathered(run.model):  # FSDP2: gathered once, as ranks sample different numbers of batches
            evaluate_trained_run(cfg, run.dir, run.model, run.tokenizer, run.data.test, rollout=run.rollout,
                                 world=world)  # sharded over ranks
    elif world.is_main:
        _write_report(run.dir)


# --- the run: set up once --------------------------------------------------------------------------------------

@dataclass
class Run:
    """What a run sets up once (`setup_run`) and every step uses; `start` is the last step done before (resume)."""

    cfg: Config
    world: World
    dir: Path
    data: ProblemSet
    model: Any  # the policy (peft or full model; FSDP2-sharded under trainer.fsdp)
    tokenizer: Any
    prompts: Any  # PromptBuilder, or the caller's object with .ids(text), .text(text), .prefill
    rewards: RewardSet
    ref: Reference
    rollout: Any  # a rollout backend (rollout/): .generate, .sync_weights
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: Sampler
    depends: dict  # data fingerprints, checked on resume
    logger: RunLogger | NullLogger = field(default_factory=NullLogger)
    callbacks: list = field(default_factory=list)
    start: int = 0
    resume_from: Path | None = None
    changes: dict = field(default_factory=dict)  # config keys changed on resume: key -> (old, new)
    watch: Watch | None = None  # diagnose.py: says once when the steps show a run learning nothing
    stop_signal: Any = None  # the signal that stopped the run before max_steps (signal.Signals), if one did
    entropy_control: EntropyControl | None = None  # grpo.entropy_target: the adaptive coefficient, over the run

    @property
    def synced_reference(self):
        """The reference copy when training changes it (grpo.ref_sync_steps): checkpoints carry it."""
        return self.ref.copy if self.cfg.grpo.ref_sync_steps else None

    def state(self, step: int) -> dict:
        """What a checkpoint stores besides weights and optimizer: the step, the sampler, the data fingerprints
        (and the adaptive entropy coefficient's state)."""
        state = {"step": step, "sampler": self.sampler.state(), "max_steps": self.cfg.trainer.max_steps,
                 "depends": self.depends}
        if self.entropy_control is not None:
            state["entropy_control"] = self.entropy_control.state_dict()
        return state


def setup_run(cfg: Config, world: World, quiet: bool, held: contextlib.ExitStack, *, model=None, tokenizer=None,
              data=None, prompts=None, reward_funcs=None, callbacks=None) -> Run:
    """Data, run dir (its lock entered into `held`), policy, reference, rollout backend, optimizer, sampler, logger;
    a checkpoint if resuming. The order is part of the seeding: the model is loaded right after seed_everything."""
    world.share(cfg.trainer.prompts_per_step)  # a global batch that does not split fails before any work
    data = data or load_problems(cfg.data, seed=cfg.trainer.seed)  # (bad data: no run folder is made)
    if cfg.trainer.eval_at_end and not data.test:
        raise ConfigError(f"trainer.eval_at_end=true but no test problems are held out ({len(data.train)} train "
                          f"problems, data.test_fraction={cfg.data.test_fraction}): set data.test_source or a larger "
                          f"data.test_fraction, or trainer.eval_at_end=false")
    device = pick_device(replace(cfg.model, device=world.model_device(cfg.model.device)))
    shape = shape_from_config(getattr(model.config, "text_config", model.config)) if model is not None else None
    cfg, plan = plan_run(cfg, device, world.size, shape=shape)
    if world.is_main and not quiet:  # (a plan that does not fit has raised: no run folder is made)
        say(describe(cfg, plan))
    run_dir, resume_from = world.broadcast_object(make_run_dir(cfg) if world.is_main else None)
    if world.is_main:  # a second process on this run is refused until this one ends
        held.enter_context(runs.lock_run(run_dir))
    depends = runs.fingerprints(data)  # checked on resume before any model is loaded
    changes = runs.check_resume(resume_from, cfg, depends) if resume_from is not None else {}
    seed_everything(cfg.trainer.seed)
    if model is None:
        model, tokenizer = load_model(replace(cfg.model, device=world.model_device(cfg.model.device)), trainable=True)
    elif plan and plan.choice.checkpointing and "model.gradient_checkpointing" in plan.planned:
        enable_checkpointing(model, keep_layers=cfg.model.gradient_checkpointing_keep_layers)  # the caller's model
    prompts = prompts or PromptBuilder(tokenizer, cfg.prompt, cfg.data.answer_mod)
    check_context(model, max(t for _, t in length_schedule(cfg.generation.max_new_tokens)), "generation.max_new_tokens",
                  _longest_prompt(prompts, data.train))
    if world.is_main:
        (run_dir / "data_report.txt").write_text(data.report + "\n")
        runs.record_data(run_dir, cfg, depends)
    funcs = reward_funcs or cfg.rewards.functions
    rewards = RewardSet(list(zip(funcs, cfg.rewards.weights or [1.0] * len(funcs))), cfg.rewards.time_limit)
    ref = prepare_policy(model, cfg, world)
    rollout = rollout_for(model, lambda: make_rollout(cfg.generation, model, tokenizer))  # gathered if sharded
    optimizer, scheduler = make_optimizer(model, cfg)
    run = Run(cfg, world, run_dir, data, model, tokenizer, prompts, rewards, ref, rollout, optimizer, scheduler,
              Sampler(len(data.train), cfg.trainer.seed), depends,  # the sampler is global: same draws on every rank
              callbacks=list(callbacks or ()), resume_from=resume_from, changes=changes,
              watch=Watch(cfg, list(zip(rewards.names, rewards.weights.tolist()))),
              entropy_control=EntropyControl.from_config(cfg))
    if resume_from is not None:
        _resume(run)
    world.broadcast_params([p for p in model.parameters() if p.requires_grad])  # identical replicas, as DDP
    rollout.sync_weights(model)  # backends holding their own weight copy must sample from the loaded weights
    run.logger = RunLogger(run_dir, cfg.trainer.tensorboard, cfg.trainer.max_steps, run.start, quiet, cfg=cfg) \
        if world.is_main else NullLogger()
    _announce(run)
    return run


def _resume(run: Run) -> None:
    """Every rank loads the same weights and optimizer state (or its shard of them) and the sampler's position;
    rank 0 forgets the steps logged after the checkpoint (they are about to be redone) and records the resume."""
    state = ckpt.load_checkpoint(run.resume_from, run.model, run.optimizer, run.scheduler, run.world,
                                 run.synced_reference)
    run.start = state["step"]
    run.sampler = Sampler(len(run.data.train), run.cfg.trainer.seed, **state["sampler"])
    if run.entropy_control is not None and "entropy_control" in state:  # (else: started on resume, from the config)
        run.entropy_control.load_state_dict(state["entropy_control"])
    if run.world.is_main:
        runs.truncate_logs(run.dir, run.start)
        runs.record_resume(run.dir, run.resume_from, run.start, run.changes, run.cfg)


def _announce(run: Run) -> None:
    cfg = run.cfg
    run.logger.write(f"run dir: {run.dir}\n{run.data.report}")
    run.logger.write(batch_line(cfg.trainer.prompts_per_step, cfg.grpo.num_generations, run.world,
                                cfg.trainer.max_tokens_per_microbatch, cfg.grpo.num_iterations * cfg.grpo.mini_batches,
                                is_sharded(run.model))
                     + (f"; resumed from {run.resume_from}" if run.resume_from else "")
                     + "".join(f"\nchanged on resume: {k} {a!r} -> {b!r} (recorded in resumes.jsonl)"
                               for k, (a, b) in run.changes.items()))


# --- one step: rollout -> score -> advantages -> update -> log / checkpoint ---------------------------------------

def train_step(run: Run, step: int) -> tuple[dict, RolloutBatch]:
    """One GRPO step: its metrics (reduced over ranks) and this rank's batch. Scoring happens inside the rollout
    stage, since dynamic sampling decides on the scores whether to draw more."""
    t0 = time.perf_counter()
    cfg, cap = at_step(run.cfg, step), max_new_tokens_at(run.cfg.generation.max_new_tokens, step)
    curriculum = isinstance(run.cfg.generation.max_new_tokens, dict)
    if curriculum and (step == run.start + 1 or cap != max_new_tokens_at(run.cfg.generation.max_new_tokens, step - 1)):
        run.logger.write(f"step {step}: generation.max_new_tokens = {cap} (length curriculum)")
    batch = rollout_step(run, step, cfg)
    advantage_step(run, batch)
    t1 = time.perf_counter()
    update = update_step(run, batch, cfg, rank_seed(step_seed(cfg.trainer.seed, step), run.world.rank))
    now = time.perf_counter()
    metrics = step_metrics(run.world, batch, run.rewards.names, cfg.grpo.num_generations, update,
                           {M.STEP_TIME: now - t0, M.GEN_TIME: t1 - t0, M.UPDATE_TIME: now - t1})
    metrics.update(batch.metrics)
    if curriculum:
        metrics[M.MAX_NEW_TOKENS] = cap
    return metrics, batch


def rollout_step(run: Run, step: int, cfg: Config) -> RolloutBatch:
    """Draw this step's prompts, sample G completions each and score them (sampling.py; with
    grpo.dynamic_sampling, more rounds until the groups are informative). Every rank draws the same global batch
    and takes its contiguous share: a group never spans ranks."""
    got = sample_step(step_seed(cfg.trainer.seed, step), run.sampler, run.data.train, run.rollout, run.prompts,
                      run.rewards, cfg, run.world, run.tokenizer.pad_token_id or 0, step)
    if got.note:
        run.logger.write(got.note)
    return got


def advantage_step(run: Run, batch: RolloutBatch) -> torch.Tensor:
    """batch.advantages [N]: rewards normalised per group over the global batch (rank_advantages)."""
    g = run.cfg.grpo
    batch.advantages = rank_advantages(run.world, batch.scores, batch.totals, g.num_generations, g.scale_rewards,
                                       g.reward_aggregation, run.rewards.weights)
    return batch.advantages


def update_step(run: Run, batch: RolloutBatch, cfg: Config, seed: int) -> dict:
    """num_iterations optimizer steps on the batch, gradients freed, the rollout backend's weights synced
    (update.update_stage); the update's metrics and the learning rate."""
    torch.manual_seed(seed + 1)  # LoRA dropout
    return update_stage(run.model, run.optimizer, run.scheduler, run.ref, batch.completions, batch.advantages, cfg,
                        run.world, run.rollout, run.entropy_control)


def log_step(run: Run, step: int, batch: RolloutBatch, metrics: dict) -> bool:
    """metrics.jsonl, trackers, callbacks, completions.jsonl; True when a callback asks to stop."""
    cfg, G = run.cfg, run.cfg.grpo.num_generations
    run.logger.log(step, metrics, step % cfg.trainer.logging_steps == 0)
    for line in run.watch.add(step, metrics):
        run.logger.write(line)
    # a callback returning something truthy asks to stop after this step (checkpointed like a signal)
    wants_stop = any([bool(cb(step, metrics)) for cb in run.callbacks])
    n = cfg.trainer.log_completions_steps
    if n and (step == 1 or step % n == 0 or step == cfg.trainer.max_steps):
        comp = batch.completions
        run.logger.log_completions(step, run.world.gather_objects(
            [{"problem": p.problem, "gold": p.gold, "completion": comp.texts[i * G + j],
              "length": int(comp.lengths[i * G + j]), "truncated": bool(comp.truncated[i * G + j]),
              "reward": float(batch.totals[i * G + j])} for i, p in enumerate(batch.problems) for j in range(G)]))
    return wants_stop


def save_step(run: Run, step: int) -> Path:
    if run.world.is_main:
        runs.check_present(run.dir, f"checkpoint-{step} not written")
    path = ckpt.save_checkpoint(run.dir, step, run.model, run.optimizer, run.scheduler, run.state(step),
                                dump_yaml(run.cfg), run.cfg.trainer.save_total_limit, run.world,  # rank 0 writes
                                run.synced_reference)
    run.world.barrier()  # nobody moves on (or exits) before the checkpoint is complete
    return path


# --- the summary and the report ------------------------------------------------------------------------------


def _write_report(run: Path) -> None:
    from .report import write_report

    md, _ = write_report(run)
    print(f"report: {md}")


def summarize(run: Path, names: list[str], window: int = 10, judge: tuple | None = None) -> dict:
    """First vs last `window` steps' rewards, the mean step time; with judge=(cfg, [(reward, weight)]) the
    findings of diagnose.py on the last steps (a run learning nothing says why)."""
    rows = read_jsonl(run / "metrics.jsonl")
    first, last = rows[:window], rows[-window:]
    out = {"run_dir": str(run), "steps": len(rows), "window": window}
    for key in [M.REWARD] + [M.reward_mean(n) for n in names]:
        vals = lambda rs: [r[key] for r in rs if r.get(key) is not None]  # noqa: E731
        f, l_ = vals(first), vals(last)
        out[key] = {"first": float(np.mean(f)) if f else None, "last": float(np.mean(l_)) if l_ else None}
    out["step_time_mean"] = float(np.mean([r[M.STEP_TIME] for r in rows])) if rows else None
    out["diagnosis"] = [f.message for f in diagnose(rows, *judge)] if judge else []
    return out


def format_summary(s: dict) -> str:
    lines = [f"summary of {s['run_dir']} ({s['steps']} steps): mean of the first {s['window']} vs last {s['window']} steps"]
    for key, v in s.items():
        if isinstance(v, dict) and v.get("first") is not None:
            lines.append(f"  {key:<28} {v['first']:.3f} -> {v['last']:.3f}")
    return "\n".join(lines)  # (the diagnosis was said in the log as it arose; summary.json and the report keep it)


# --- the pieces the stages share ----------------------------------------------------------------------------


def at_step(cfg: Config, step: int) -> Config:
    """cfg with generation.max_new_tokens at its value for `step` (an int; a length curriculum resolved)."""
    return replace(cfg, generation=replace(cfg.generation, max_new_tokens=max_new_tokens_at(
        cfg.generation.max_new_tokens, step)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def prepare_policy(model, cfg: Config, world: World = SINGLE) -> Reference:
    """The KL reference, then FSDP2 sharding of the policy and of a full fine-tuning reference copy when
    trainer.fsdp asks for it (distributed.py); the reference comes first since FSDP modules cannot be copied."""
    ref = Reference(model, cfg.grpo.beta, cfg.model.lora)
    if cfg.grpo.ref_sync_steps and ref.copy is None:
        raise ConfigError(f"grpo.ref_sync_steps={cfg.grpo.ref_sync_steps} needs full fine-tuning (model.lora=false): "
                          f"with LoRA the reference is the base model with the adapters off, which training does not "
                          f"move (TRL refuses sync_ref_model with PEFT too); set grpo.ref_sync_steps=0")
    if use_fsdp(cfg.trainer.fsdp, cfg.model.lora, world):
        if cfg.grpo.ref_sync_steps:
            raise ConfigError("grpo.ref_sync_steps with a sharded model (trainer.fsdp): its checkpoints do not carry "
                              "the reference yet; set trainer.fsdp=off or grpo.ref_sync_steps=0")
        for m in (model, ref.copy):
            if m is not None:
                shard_model(m, world)
    return ref


def make_run_dir(cfg: Config) -> tuple[Path, Path | None]:
    """(run dir, checkpoint to resume from or None)."""
    t = cfg.trainer
    if t.resume:
        start = ckpt.find_resume(t.resume, Path(t.output_dir))
        return start.parent.parent, start
    return runs.create_run_dir(cfg), None  # claimed exclusively, config.yaml written


def step_metrics(world: World, batch: RolloutBatch, names: list[str], group: int, update: dict, times: dict) -> dict:
    """Metrics of the global step: rollout statistics over every rank's rows (whole groups, rank order),
    update metrics averaged over ranks, times of the slowest rank. One rank: this rank's numbers."""
    comp = batch.completions
    parts = world.gather_objects([(comp.lengths.cpu().numpy(), comp.truncated.cpu().numpy(), batch.scores,
                                   batch.totals)])
    lengths, truncated, per_all, total_all = (np.concatenate(x) for x in zip(*parts))
    times = world.reduce_metrics(times, op="max")
    return {**rollout_metrics(lengths, truncated, names, per_all, total_all, group), **world.reduce_metrics(update),
            **times, M.TOKENS_PER_S: float(lengths.sum()) / times[M.STEP_TIME]}


def _longest_prompt(prompts: PromptBuilder, problems: list, sample: int = 32) -> int:
    """Tokens of the longest training prompt, for the context check: the `sample` longest problems by characters are
    tokenized (tokenizing every problem of a large set would cost seconds at start-up for a bound this close)."""
    longest = sorted(problems, key=lambda p: len(p.problem))[-sample:]
    return max((len(prompts.ids(p.problem)) for p in longest), default=1)
