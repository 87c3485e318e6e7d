"""Checkpoints: adapter (or full weights), optimizer, scheduler, RNG states, data position, config.

Written atomically (a temp folder renamed into place) so a crash never leaves a half checkpoint;
only the last `save_total_limit` are kept. The last file written is `manifest.json`: every file's size
(and sha256 up to HASH_LIMIT bytes), so a damaged checkpoint is recognised (`verify`) before it is loaded.
`find_resume(...)` turns `--resume` / `trainer.resume` (a checkpoint, a run dir, or "latest") into a
checkpoint folder, falling back from damaged checkpoints to the newest complete one (and saying so).
A write that fails (a full disk) removes its temp folder, keeps the previous checkpoint and says so;
leftover temp folders of a killed save are removed at the next save. Two guards wrap the loop: `StopFlag`
(SIGINT/SIGTERM stop after the current step, with a checkpoint) and `SaveOnError` (an exception in a step saves
what was trained so far before it propagates, as a signal would).

Under torchrun every rank calls the save and load functions with its `world`; rank 0 writes. A model
sharded with FSDP2 is gathered to rank 0 on save and scattered from it on load, and the files are the
same as those of a replicated run (a HF model folder, `optimizer.state_dict()` keyed by parameter index),
so a run resumes on any number of ranks, sharded or not.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from .config import Config, dump_yaml
from .distributed import SINGLE, World
from .files import atomic_dir, step_dirs
from .fsdp import full_state_dicts, is_sharded, load_full_state_dicts
from .modelinfo import is_peft
from .runs import os_reason, resume_command

log = logging.getLogger(__name__)
HASH_LIMIT = 64 << 20  # files up to 64 MiB (states, configs, LoRA adapters) are hashed, larger ones sized only


class CheckpointError(ValueError):
    pass


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (its temp folder is removed; the previous one is kept)."""


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_weights(model, path: Path, world: World = SINGLE, state_dict: dict | None = None) -> None:
    """A peft adapter folder or a HF model folder; rank 0 writes. A sharded model is gathered first (pass its
    full `state_dict` when it is at hand), so with one every rank must call this."""
    if state_dict is None and is_sharded(model):
        state_dict, _ = full_state_dicts(model)
    if not world.is_main:
        return
    if is_peft(model):
        model.save_pretrained(path)  # a peft adapter folder, loadable with PeftModel.from_pretrained
    else:
        model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, trainer_state: dict,
                    config_yaml: str, keep: int, world: World = SINGLE, reference=None) -> Path | None:
    """checkpoint-<step>/ in run_dir; its path on rank 0, None on the other ranks (which only help gather).
    reference: a KL reference copy that training changes (grpo.ref_sync_steps), saved beside the weights."""
    weights, optim = full_state_dicts(model, optimizer) if is_sharded(model) else (None, None)
    if not world.is_main:
        return None
    root = run_dir / "checkpoints"
    final = root / f"checkpoint-{step}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for old in root.glob(".tmp-checkpoint-*"):  # a save killed halfway (the run folder is this run's alone)
            shutil.rmtree(old, ignore_errors=True)
        with atomic_dir(final) as tmp:  # (.tmp-checkpoint-<step>-<pid>, removed if the write fails)
            tmp.mkdir()
            save_weights(model, tmp / ("adapter" if is_peft(model) else "model"), state_dict=weights)
            if reference is not None:
                save_weights(reference, tmp / "reference")
            scaler = getattr(optimizer, "loss_scaler", None)  # fp16 loss scaling (update.make_loss_scaler)
            torch.save({"optimizer": optim if optim is not None else optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "rng": rng_state(),
                        **({"loss_scaler": scaler.state_dict()} if scaler is not None else {})},
                       tmp / "training_state.pt")
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
            (tmp / "config.yaml").write_text(config_yaml)
            _write_manifest(tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        prev = list_checkpoints(run_dir)
        kept = f"the previous checkpoint {prev[-1]} is kept" if prev else "there is no earlier checkpoint"
        raise CheckpointWriteError(f"could not write checkpoint-{step} in {root}: {os_reason(e, root)}; {kept}") from e
    _prune(root, keep)
    return final


def _file_digest(p: Path) -> str | None:
    if p.stat().st_size > HASH_LIMIT:
        return None
    with open(p, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_manifest(folder: Path) -> None:
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _file_digest(p)}
             for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / "manifest.json").write_text(json.dumps({"files": files}, indent=1))


def verify(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from (a missing, truncated or altered file), or None when it is complete.
    A checkpoint of an older version (no manifest.json) is accepted when its trainer_state.json reads."""
    ckpt = Path(ckpt)
    try:
        json.loads((ckpt / "trainer_state.json").read_text())
    except FileNotFoundError:
        return "trainer_state.json is missing"
    except (OSError, ValueError) as e:
        return f"trainer_state.json is damaged ({e})"
    if not (ckpt / "manifest.json").is_file():
        return None
    try:
        files = json.loads((ckpt / "manifest.json").read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"manifest.json is damaged ({e})"
    for rel, want in files.items():
        p = ckpt / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != want["size"]:
            return f"{rel} has {p.stat().st_size} bytes, {want['size']} were written (truncated or replaced)"
        if want.get("sha256") and _file_digest(p) != want["sha256"]:
            return f"{rel} does not match the sha256 written with it (altered or damaged)"
    return None


def newest_complete(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint of a run that verifies, and a line for each newer one skipped (and why)."""
    skipped = []
    for c in reversed(list_checkpoints(run_dir)):
        why = verify(c)
        if why is None:
            return c, skipped
        skipped.append(f"skipped {c}: {why}")
    return None, skipped


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    ckpts = list_checkpoints(root.parent)
    for old in ckpts[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The complete-looking checkpoints of a run (a trainer_state.json written), oldest first."""
    return [p for p in step_dirs(Path(run_dir) / "checkpoints") if (p / "trainer_state.json").is_file()]


def find_resume(spec: str, output_dir: Path) -> Path:
    """'latest' -> newest complete checkpoint of the newest run under output_dir; a run dir -> its newest
    complete checkpoint; damaged newer ones are skipped with a warning naming them and the reason."""
    if spec == "latest":
        runs = [r for r in Path(output_dir).glob("*") if list_checkpoints(r)]
        if not runs:
            raise CheckpointError(f"trainer.resume=latest: no run with a checkpoint under {output_dir}")
        run = max(runs, key=lambda r: (list_checkpoints(r)[-1] / "trainer_state.json").stat().st_mtime)
    else:
        p = Path(spec)
        if (p / "trainer_state.json").is_file():  # one checkpoint, asked for by name: no fallback
            why = verify(p)
            if why is not None:
                good, _ = newest_complete(p.parent.parent)
                alt = f"; the newest complete one is {good}" if good else ""
                raise CheckpointError(f"trainer.resume={spec}: cannot resume from it: {why}{alt}")
            return p
        if not list_checkpoints(p):
            raise CheckpointError(f"trainer.resume={spec}: not a checkpoint and no checkpoints/checkpoint-* inside")
        run = p
    good, skipped = newest_complete(run)
    for line in skipped:
        log.warning("resume: %s", line)
    if good is None:
        raise CheckpointError(f"trainer.resume={spec}: no complete checkpoint in {run}:\n  " + "\n  ".join(skipped))
    return good


def load_checkpoint(path: Path, model, optimizer, scheduler, world: World = SINGLE, reference=None) -> dict:
    """Restore weights, optimizer, scheduler and RNG in place; returns the trainer state dict. With a sharded
    model every rank must call this: rank 0 reads the weights and optimizer state, every rank keeps its shard.
    reference: the KL reference copy, restored from the checkpoint's own when it has one (grpo.ref_sync_steps)."""
    path = Path(path)
    try:
        if reference is not None and (path / "reference").is_dir():
            from transformers import AutoModelForCausalLM

            reference.load_state_dict(AutoModelForCausalLM.from_pretrained(
                path / "reference", dtype=next(reference.parameters()).dtype).state_dict())
        return _load(path, model, optimizer, scheduler, world)
    except (OSError, RuntimeError, EOFError, ValueError, KeyError) as e:
        if isinstance(e, CheckpointError):
            raise
        why = verify(path) or f"{type(e).__name__}: {e}"
        raise CheckpointError(f"cannot resume from {path}: {why}; resume from an earlier checkpoint "
                              f"(--resume {path.parent / 'checkpoint-<step>'})") from e


def _load(path: Path, model, optimizer, scheduler, world: World) -> dict:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    sharded = is_sharded(model)
    weights = None
    if (path / "adapter").is_dir():
        if not is_peft(model):
            raise CheckpointError(f"{path} holds a LoRA adapter but model.lora is off in this config")
        set_peft_model_state_dict(model, load_file(str(path / "adapter" / "adapter_model.safetensors")))
    elif world.is_main or not sharded:
        from transformers import AutoModelForCausalLM

        src = AutoModelForCausalLM.from_pretrained(path / "model", dtype=next(model.parameters()).dtype)
        weights = src.state_dict()
        if not sharded:
            model.load_state_dict(weights)
    # under FSDP the other ranks only need the scheduler and RNG: map the file instead of reading its optimizer state
    state = torch.load(path / "training_state.pt", weights_only=False, mmap=sharded and not world.is_main)
    if sharded:
        load_full_state_dicts(model, optimizer, weights, state["optimizer"] if world.is_main else None)
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler = getattr(optimizer, "loss_scaler", None)
    if scaler is not None and "loss_scaler" in state:
        scaler.load_state_dict(state["loss_scaler"])
    set_rng_state(state["rng"])
    return json.loads((path / "trainer_state.json").read_text())


class SaveOnError:
    """Around the training loop: an exception in a step saves what was trained so far, as a signal does,
    before it propagates. Call `begin(step, sampler_state)` first thing in every step.

    Which state is saved follows from the scheduler's count (it steps once per optimizer step): the
    previous step's (with its sampler position: the exact resume point) when the step failed before its
    update, this step's when it failed after it, only the weights when it failed in the middle of an update
    (num_iterations x mini_batches > 1). (A failure between `optimizer.step()` and `scheduler.step()`, two adjacent calls,
    would pass for "before the update".) A failed checkpoint write is not retried, and nothing is saved when
    nothing was trained since the run (or resume) began, or when the model is sharded (the save needs every
    rank)."""

    def __init__(self, run: Path, model, optimizer, scheduler, cfg: Config, world: World, state_of, start: int,
                 reference=None):
        self.run, self.model, self.optimizer, self.scheduler = run, model, optimizer, scheduler
        self.cfg, self.world, self.state_of, self.start, self.reference = cfg, world, state_of, start, reference
        self.step, self.sampler = None, None

    def begin(self, step: int, sampler_state: dict) -> None:
        self.step, self.sampler = step, copy.deepcopy(sampler_state)

    def __enter__(self):
        return self

    def __exit__(self, tp, exc, tb):
        if not isinstance(exc, Exception) or isinstance(exc, CheckpointWriteError) or self.step is None:
            return False
        if not self.run.is_dir():  # deleted under the run: saving would make a folder holding a checkpoint alone
            log.error("step %d failed; the run folder %s is gone, so nothing is saved", self.step, self.run)
            return False
        if is_sharded(self.model):
            log.error("step %d failed; a sharded model is not saved on an error (every rank would have to join)",
                      self.step)
            return False
        k, mu = self.step, self.cfg.grpo.num_iterations * self.cfg.grpo.mini_batches  # optimizer steps per step
        updates = self.scheduler.last_epoch  # LambdaLR: optimizer steps so far
        at = {(k - 1) * mu: k - 1, k * mu: k}.get(updates)
        what = []
        try:
            if at is not None and at > self.start:
                state = self.state_of(at) if at == k else {**self.state_of(at), "sampler": self.sampler}
                path = save_checkpoint(self.run, at, self.model, self.optimizer, self.scheduler, state,
                                       dump_yaml(self.cfg), self.cfg.trainer.save_total_limit, self.world,
                                       self.reference)
                what.append(f"checkpoint {path}")
            if at is None or at > self.start:
                name = "adapter" if is_peft(self.model) else "model"
                save_weights(self.model, self.run / name, self.world)
                what.append(f"the weights so far in {self.run / name}")
        except Exception as e:  # noqa: BLE001 - the original error is the one to report
            log.error("step %d failed, and saving what was trained failed too: %s", k, e)
            return False
        if what and self.world.is_main:
            log.error("step %d failed (%s); saved %s; resume with: %s", k, type(exc).__name__, " and ".join(what),
                      resume_command(self.run))
        return False


class StopFlag:
    """SIGINT/SIGTERM ask the loop to stop after the current step (with a checkpoint)."""

    def __init__(self):
        self.requested = False
        self.signal: signal.Signals | None = None  # the signal that asked to stop
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
        self.signal = signal.Signals(signum)
        print(f"\n{self.signal.name}: stopping after this step, with a checkpoint (Ctrl-C again: stop now)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
