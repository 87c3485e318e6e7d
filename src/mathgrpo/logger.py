"""Where a run's numbers go: metrics.jsonl (every step), the trackers of trainer.report_to (TensorBoard, W&B,
MLflow, Trackio: trackers.py), completions.jsonl, the terminal.

Under torchrun only rank 0 holds a RunLogger; the other ranks get a NullLogger and write nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

from . import metrics as M


class RunLogger:
    def __init__(self, run_dir: Path, tensorboard: bool, max_steps: int, first_step: int = 0, quiet: bool = False,
                 cfg=None):
        """`cfg` (the run's Config) opens the trackers of cfg.trainer.report_to with its run name and values."""
        from .trackers import Trackers, tracker_names

        self.run_dir = run_dir
        t = getattr(cfg, "trainer", None)
        name = (t.tracker_run_name or t.run_name) if t is not None else None
        self.trackers = Trackers(tracker_names(t.report_to if t is not None else [], tensorboard), run_dir,
                                 name or Path(run_dir).name, dataclasses.asdict(cfg) if cfg is not None else {},
                                 resume=first_step > 0)
        self.metrics = open(run_dir / "metrics.jsonl", "a")
        self.completions = open(run_dir / "completions.jsonl", "a")
        self.bar = None
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=first_step, desc="train", dynamic_ncols=True, file=sys.stderr)

    def log(self, step: int, metrics: dict, summary_line: bool) -> None:
        from .runs import check_present

        check_present(self.run_dir, f"step {step} not logged")  # open files would write into a deleted folder
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        _append(self.metrics, json.dumps({"step": step, **clean}) + "\n")
        self.trackers.log(step, metrics)
        if self.bar is not None:
            self.bar.update(1)
            reward, length, secs = metrics[M.REWARD], metrics[M.COMPLETION_LENGTH_MEAN], metrics[M.STEP_TIME]
            self.bar.set_postfix(reward=f"{reward:.3f}", len=f"{length:.0f}", s=f"{secs:.1f}")
            if summary_line:
                parts = [f"{k.split('/')[1]} {metrics[k]:.3f}" for k in metrics if M.is_reward_mean(k)]
                self.bar.write(f"step {step}: reward {reward:.3f} ({', '.join(parts)}) "
                               f"kl {metrics.get(M.KL, 0.0):.4f} len {length:.0f} {secs:.1f}s")

    def log_completions(self, step: int, records: list[dict]) -> None:
        _append(self.completions, "".join(json.dumps({"step": step, **r}) + "\n" for r in records))

    def write(self, text: str) -> None:
        (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()
        self.completions.close()
        self.trackers.close()


def _append(f, text: str) -> None:
    """Write and flush; an OSError (a full disk) names the file, which a file object's write error does not."""
    try:
        f.write(text)
        f.flush()
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), f.name) from None


class NullLogger:
    """The logger of ranks other than 0: same calls, no files, no output."""

    def log(self, step: int, metrics: dict, summary_line: bool) -> None:
        pass

    def log_completions(self, step: int, records: list[dict]) -> None:
        pass

    def write(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True):
    """A tqdm bar on stderr, like training's (evaluation: problems done); a no-op bar when not enabled."""
    from tqdm import tqdm

    # every update is drawn (mininterval=0): an update is a whole generation batch, seconds apart
    return tqdm(total=total, desc=desc, unit=f" {unit}", dynamic_ncols=True, file=sys.stderr, disable=not enabled,
                mininterval=0)
