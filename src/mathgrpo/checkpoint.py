"""Checkpoints: adapter (or full weights), optimizer, scheduler, RNG states, data position, config.

Written atomically (a temp folder renamed into place) so a crash never leaves a half checkpoint;
only the last `save_total_limit` are kept. `find_resume(...)` turns `--resume` / `trainer.resume`
(a checkpoint, a run dir, or "latest") into a checkpoint folder.

Under torchrun every rank calls the save and load functions with its `world`; rank 0 writes. A model
sharded with FSDP2 is gathered to rank 0 on save and scattered from it on load, and the files are the
same as those of a replicated run (a HF model folder, `optimizer.state_dict()` keyed by parameter index),
so a run resumes on any number of ranks, sharded or not.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .distributed import SINGLE, World
from .fsdp import full_state_dicts, is_sharded, load_full_state_dicts


class CheckpointError(ValueError):
    pass


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
    if hasattr(model, "peft_config"):
        model.save_pretrained(path)  # a peft adapter folder, loadable with PeftModel.from_pretrained
    else:
        model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, trainer_state: dict,
                    config_yaml: str, keep: int, world: World = SINGLE) -> Path | None:
    """checkpoint-<step>/ in run_dir; its path on rank 0, None on the other ranks (which only help gather)."""
    weights, optim = full_state_dicts(model, optimizer) if is_sharded(model) else (None, None)
    if not world.is_main:
        return None
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(model, tmp / ("adapter" if hasattr(model, "peft_config") else "model"), state_dict=weights)
    torch.save({"optimizer": optim if optim is not None else optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng_state()}, tmp / "training_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    (tmp / "config.yaml").write_text(config_yaml)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    ckpts = list_checkpoints(root.parent)
    for old in ckpts[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[-1]))


def find_resume(spec: str, output_dir: Path) -> Path:
    """'latest' -> newest checkpoint of the newest run under output_dir; a run dir -> its last checkpoint."""
    if spec == "latest":
        runs = [r for r in Path(output_dir).glob("*") if list_checkpoints(r)]
        if not runs:
            raise CheckpointError(f"trainer.resume=latest: no run with a checkpoint under {output_dir}")
        newest = max(runs, key=lambda r: (list_checkpoints(r)[-1] / "trainer_state.json").stat().st_mtime)
        return list_checkpoints(newest)[-1]
    p = Path(spec)
    if (p / "trainer_state.json").is_file():
        return p
    ckpts = list_checkpoints(p)
    if ckpts:
        return ckpts[-1]
    raise CheckpointError(f"trainer.resume={spec}: not a checkpoint and no checkpoints/checkpoint-* inside")


def load_checkpoint(path: Path, model, optimizer, scheduler, world: World = SINGLE) -> dict:
    """Restore weights, optimizer, scheduler and RNG in place; returns the trainer state dict. With a sharded
    model every rank must call this: rank 0 reads the weights and optimizer state, every rank keeps its shard."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    sharded = is_sharded(model)
    weights = None
    if (path / "adapter").is_dir():
        if not hasattr(model, "peft_config"):
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
    set_rng_state(state["rng"])
    return json.loads((path / "trainer_state.json").read_text())
