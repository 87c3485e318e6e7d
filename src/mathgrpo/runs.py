"""Run folders and what a resume must match: never mix two runs, never resume into other settings.

    run = create_run_dir(cfg)                       # <output_dir>/<run_name or timestamp>, claimed exclusively
    deps = fingerprints(problems)                   # {"data": ..., "split": ..., "n_train": ..., "n_test": ...}
    changes = check_resume(ckpt_dir, cfg, deps)     # refused (ResumeError) unless every change is allowed

A run folder is claimed by creating its `config.yaml` with O_EXCL, so two runs started in the same second
get two folders (the second one a `-2` suffix) and a fresh run never appends to an existing one: a
`trainer.run_name` that already holds a run is an error that says how to resume it instead.

A checkpoint records the resolved config (its `config.yaml`) and fingerprints of the kept problems (as a
multiset: `data`) and of the split and train order (`split`) in `trainer_state.json["depends"]`. A resume
compares them with the current ones and refuses any difference, listed, unless the key is named in
`trainer.resume_changing` (`--resume-changing KEY`) and is one whose change is meaningful mid-run
(`CHANGEABLE`); accepted changes are appended to the run's `resumes.jsonl` and `config.yaml` is rewritten
to the config now in force (never silently).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shlex
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from .config import Config, ConfigError, dump_yaml, to_dict
from .data import ProblemSet
from .files import JsonlError, append_jsonl, atomic_write_text, jsonl_rows

log = logging.getLogger(__name__)

# Not what the run depends on: where it is and how this command asked to resume it.
IGNORED = ("trainer.resume", "trainer.resume_changing", "trainer.output_dir", "trainer.run_name")
# Keys whose change mid-run is meaningful (length, bookkeeping, where and how fast it runs), allowed with
# trainer.resume_changing; a key ending in "." allows its whole section. Anything else (model, rewards,
# sampling, loss, optimizer: the restored optimizer and scheduler would silently keep the old values) is refused.
CHANGEABLE = ("trainer.max_steps", "trainer.save_steps", "trainer.save_total_limit", "trainer.logging_steps",
              "trainer.log_completions_steps", "trainer.tensorboard", "trainer.eval_at_end",
              "trainer.max_tokens_per_microbatch", "trainer.logprob_chunk_size", "trainer.fsdp",
              "model.device", "model.attn_implementation", "model.gradient_checkpointing", "model.fuse_kernels",
              "generation.backend", "generation.max_batch", "generation.lora_merge", "generation.fuse_weights",
              "generation.release_memory", "data.source", "data.test_source", "eval.")
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints")  # a folder holding any of these holds a run


class RunDirError(ValueError):
    """A run folder that cannot be created or used; the message names the path and the reason."""


class ResumeError(ValueError):
    """A resume whose checkpoint was made with other settings or data; the message lists the differences."""


# --- file-system errors as one line --------------------------------------------------------------------

def os_reason(e: BaseException, path: Path | str | None = None) -> str:
    """'No space left on device' etc.; for a path below a file, which file is in the way."""
    if isinstance(e, OSError) and e.errno in (errno.EEXIST, errno.ENOTDIR) and path is not None:
        for p in [Path(path), *Path(path).parents]:
            if p.exists() and not p.is_dir():
                return f"{p} is a file, not a folder"
    if isinstance(e, OSError) and e.strerror:  # the file at fault, unless it is the path itself or inside it
        inside = path is not None and str(e.filename or "").startswith(str(path))
        return e.strerror + (f" ({e.filename})" if e.filename and not inside else "")
    return str(e) or type(e).__name__


def resume_command(run: Path) -> str:
    """The command that resumes `run`, quoted for a POSIX shell (a path with spaces or quotes pastes as is)."""
    return f"mathgrpo train {shlex.quote(str(run / 'config.yaml'))} --resume {shlex.quote(str(run))}"


# --- run folders ----------------------------------------------------------------------------------------

def create_run_dir(cfg: Config, clock=time.strftime) -> Path:
    """A new run folder under trainer.output_dir, claimed by writing its config.yaml exclusively."""
    t = cfg.trainer
    out = Path(t.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"trainer.output_dir={out}: cannot create the folder: {os_reason(e, out)}") from None
    if t.run_name:
        run = out / t.run_name
        if _claim(run, cfg):
            return run
        if any((run / f).exists() for f in RUN_FILES[1:]):
            raise RunDirError(f"trainer.run_name={t.run_name}: {run} already holds a run; resume it with "
                              f"--resume {shlex.quote(str(run))}, or choose another run_name (a new run never reuses "
                              f"a folder)")
        raise RunDirError(f"trainer.run_name={t.run_name}: {run} holds a run that has not logged a step (it is "
                          f"starting now, or it failed before its first step): delete that folder or choose "
                          f"another run_name")
    stamp = clock("%Y%m%d-%H%M%S")
    for i in range(1, 1000):  # runs started in the same second: -2, -3, ...
        run = out / (stamp if i == 1 else f"{stamp}-{i}")
        if _claim(run, cfg):
            return run
    raise RunDirError(f"{out}: 999 run folders named {stamp}*; set trainer.run_name")


def check_present(run: Path, what: str) -> None:
    """RunDirError when the run folder was deleted under a running run (`what`: what is not done, e.g. a step
    not logged): writing on would recreate a folder holding a fragment of the run."""
    if not run.is_dir():
        raise RunDirError(f"{run} was deleted while the run was training ({what}): nothing more can be written "
                          f"there; start a new run")


def _claim(run: Path, cfg: Config) -> bool:
    """True when this process now owns `run` (config.yaml created with O_EXCL); False when another run has it."""
    try:
        run.mkdir(exist_ok=True)
        if any((run / f).exists() for f in RUN_FILES[1:]):
            return False
        with open(run / "config.yaml", "x") as f:
            f.write(dump_yaml(cfg))
    except FileExistsError:
        if run.is_dir():
            return False
        raise RunDirError(f"{run}: cannot create the run folder: {run} is a file, not a folder") from None
    except OSError as e:
        raise RunDirError(f"{run}: cannot create the run folder: {os_reason(e, run)}") from None
    return True


def lock_run(run: Path):
    """An exclusive lock on `run` for this process (flock on RUN/.lock, released by the OS when the process ends,
    so a crashed run leaves no stale lock); RunDirError naming the holder when another process has it.
    Close the returned file to release it."""
    f = open(run / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunDirError(f"{run} is in use by {holder}: two processes would write the same checkpoints and logs; "
                          f"wait for it to end or stop it, then resume") from None
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


# --- what a run depends on ------------------------------------------------------------------------------

def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False).encode()).hexdigest()[:16]


def fingerprints(data: ProblemSet) -> dict:
    """`data`: the kept problems and golds (before split and cap) in any order; `split`: which are train (in
    sampling order) and test."""
    pairs = lambda ps: [[p.problem, p.gold] for p in ps]  # noqa: E731
    return {"data": _digest(sorted(pairs(data.pool or data.train + data.test))),
            "split": _digest([pairs(data.train), pairs(data.test)]),
            "n_train": len(data.train), "n_test": len(data.test)}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _changeable(key: str) -> bool:
    return any(key == c or (c.endswith(".") and key.startswith(c)) for c in CHANGEABLE)


def config_changes(old: dict, cfg: Config) -> dict[str, tuple]:
    """{key: (checkpoint value, current value)} over every key but IGNORED; a key the checkpoint lacks
    (written before it existed) counts at its default."""
    now = _flat(yaml.safe_load(dump_yaml(cfg)))  # through YAML, as the checkpoint's copy went
    before = {**_flat(to_dict(Config())), **_flat(old)}
    return {k: (before.get(k), v) for k, v in now.items() if k not in IGNORED and before.get(k) != v}


def check_resume(ckpt: Path, cfg: Config, depends: dict) -> dict[str, tuple]:
    """The accepted config changes of resuming `ckpt` with `cfg` and data of fingerprints `depends`;
    ResumeError listing every refused difference."""
    ckpt = Path(ckpt)
    allowed = list(cfg.trainer.resume_changing)
    for key in allowed:
        if key not in _flat(to_dict(cfg)):
            raise ConfigError(f"trainer.resume_changing: unknown key '{key}'")
        if not _changeable(key):
            raise ConfigError(f"trainer.resume_changing: '{key}' cannot change on resume (the checkpoint's "
                              f"weights, optimizer, scheduler and data position were made for it); keys that "
                              f"can: {', '.join(c + '*' if c.endswith('.') else c for c in CHANGEABLE)}")
    try:
        old_cfg = yaml.safe_load((ckpt / "config.yaml").read_text()) or {}
        state = json.loads((ckpt / "trainer_state.json").read_text())
    except (OSError, yaml.YAMLError, json.JSONDecodeError) as e:
        raise ResumeError(f"{ckpt}: cannot read its config.yaml / trainer_state.json: {e}") from None
    if cfg.trainer.max_steps < state.get("step", 0):
        raise ResumeError(f"resume from {ckpt} refused: trainer.max_steps={cfg.trainer.max_steps} but the run has "
                          f"trained {state['step']} steps already; a resume can only lengthen a run (to train "
                          f"fewer steps, start a new run, or take the weights of an earlier checkpoint)")
    changes = config_changes(old_cfg, cfg)
    refused = [f"  {k}: {a!r} in the checkpoint, {b!r} now" + ("" if _changeable(k) else " (cannot change on resume)")
               for k, (a, b) in changes.items() if k not in allowed]
    old = state.get("depends")
    if old is None:
        log.warning("%s was written before checkpoints recorded their data; the data is not checked", ckpt)
    elif old["data"] != depends["data"]:
        refused.append(f"  data: other problems or golds than the checkpoint's ({old['n_train']} train + "
                       f"{old['n_test']} test then, {depends['n_train']} + {depends['n_test']} now): the data "
                       f"source changed")
    elif old["split"] != depends["split"]:
        refused.append("  split: the same problems, split or ordered differently (a reordered data file, or another "
                       "seed / test_fraction / max_problems): test problems could move into training")
    if refused:
        hint = ", or allow a change with --resume-changing KEY" if any(_changeable(k) for k in changes) else ""
        raise ResumeError(f"resume from {ckpt} refused: it was made with other settings or data:\n"
                          + "\n".join(refused) + f"\nResume with the run's own settings "
                          f"({resume_command(ckpt.parent.parent)}){hint}.")
    return changes


def record_resume(run: Path, ckpt: Path, step: int, changes: dict[str, tuple], cfg: Config) -> None:
    """Append the resume to resumes.jsonl; with accepted changes, config.yaml becomes the config now in force."""
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "from": str(ckpt), "step": step,
             "changes": {k: list(v) for k, v in changes.items()}}
    append_jsonl(run / "resumes.jsonl", entry)
    if changes:
        atomic_write_text(run / "config.yaml", dump_yaml(cfg))


# --- where the data was ----------------------------------------------------------------------------------

DATA_RECORD = "data.json"  # the data paths resolved where the run trained, and the data's fingerprints


def _absolute(source: str | None) -> str | None:
    """A data path resolved against the current folder; hub ids, `arithmetic` and missing paths as given."""
    return str(Path(source).expanduser().resolve()) if source and Path(source).expanduser().exists() else source


def record_data(run: Path, cfg: Config, depends: dict) -> None:
    """RUN/data.json: data.source and data.test_source as absolute paths, and the fingerprints of the data read,
    so that an evaluation started from another folder reads the same files (or is refused)."""
    atomic_write_text(run / DATA_RECORD, json.dumps({"source": _absolute(cfg.data.source), "test_source":
                                                     _absolute(cfg.data.test_source), "fingerprints": depends}))


def place_data(run: Path, cfg: Config) -> dict | None:
    """For an evaluation of `run`'s adapter: when cfg's data settings are the run's own (not overridden), its
    relative data paths are replaced by the absolute ones the run recorded (a note says so), and the recorded
    fingerprints are returned for `check_data`; None when the data was overridden or the run recorded none."""
    try:
        rec = json.loads((run / DATA_RECORD).read_text())
        old = _flat(yaml.safe_load((run / "config.yaml").read_text()) or {})
    except (OSError, ValueError, yaml.YAMLError):
        return None
    before, now = {**_flat(to_dict(Config())), **old}, _flat(to_dict(cfg))
    if any(before.get(k) != v for k, v in now.items() if k.startswith("data.") or k == "trainer.seed"):
        return None  # other data or split on purpose: nothing to match
    for key in ("source", "test_source"):
        here, there = getattr(cfg.data, key), rec.get(key)
        if here and there and _absolute(here) != there and Path(there).exists():
            print(f"data.{key}={here}: the run read {there} (relative to the folder it was trained in); using it")
            setattr(cfg.data, key, there)
    return rec["fingerprints"]


def check_data(run: Path, recorded: dict | None, data: ProblemSet, cfg: Config) -> None:
    """Refuse an evaluation of `run` whose data (read with the run's own settings) is not the data it trained on:
    its test split would be other problems, some of them perhaps trained on."""
    if recorded is None or fingerprints(data)["split"] == recorded["split"]:
        return
    raise RunDirError(f"{run}: data.source={cfg.data.source} ({_absolute(cfg.data.source)} here) is not the data "
                      f"this run was trained on ({recorded['n_train']} train + {recorded['n_test']} test problems "
                      f"then, {len(data.train)} + {len(data.test)} now), so its held-out test problems would "
                      f"differ; pass the run's data as data.source=PATH, or other test data as data.test_source=PATH")


# --- logs on resume -------------------------------------------------------------------------------------

def truncate_logs(run: Path, last_step: int) -> None:
    """Forget steps logged after the checkpoint (they are about to be redone); a partial last line (a crash
    while writing it) is dropped with a warning, a damaged line elsewhere is an error naming file and line."""
    for name in ("metrics.jsonl", "completions.jsonl"):
        p = run / name
        if not p.is_file():
            continue
        lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
        try:
            rows = list(jsonl_rows(lines[:-1], p))
        except JsonlError as e:
            raise RunDirError(f"{p}: line {e.line} is not valid JSON lines ({e.why}); remove or fix it") from None
        try:
            rows += list(jsonl_rows(lines[-1:], p, first=len(lines)))
        except JsonlError:
            log.warning("%s: line %d was cut short (a crash while writing it); dropped", p, len(lines))
        atomic_write_text(p, "".join(line + "\n" for _, line, row in rows if row.get("step", 0) <= last_step))
