"""What transformers callbacks and TRL users see of a run: callbacks driven with a TrainerState / TrainerControl,
logs under TRL's metric names every logging_steps, the trackers fed as transformers' integrations feed them, and
checkpoints in TRL's layout (output_dir/checkpoint-<step>/: adapter or model, tokenizer, trainer_state.json)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

from .. import metrics as M
from ..files import atomic_dir, step_dirs
from .options import warn

# mathgrpo metric name -> the name TRL logs it under (the rest keep their names): metrics.py's one table.
TRL_METRIC_NAMES = M.TRL_NAMES
_LAST_NOT_MEAN = ("learning_rate", "grad_norm")  # as transformers logs them: the value at the logging step


class CallbackHost:
    """GRPOTrainer's transformers-facing half: its callbacks, `log`, the trackers, and mathgrpo's per-step
    callback that turns the engine's metrics into TRL's logs, saves and events. Needs args, cfg, state, control,
    model, processing_class, is_main, _train, _trackers, _report_to, _pending, _extra_metrics."""

    def add_callback(self, callback) -> None:
        self.callbacks.append(callback() if isinstance(callback, type) else callback)

    def pop_callback(self, callback):
        for cb in self.callbacks:
            if cb is callback or (isinstance(callback, type) and isinstance(cb, callback)):
                self.callbacks.remove(cb)
                return cb
        return None

    def remove_callback(self, callback) -> None:
        self.pop_callback(callback)

    def _event(self, name: str, **kwargs):
        for cb in self.callbacks:
            hook = getattr(cb, name, None)
            if hook is None:
                continue
            out = hook(self.args, self.state, self.control, model=self.model, processing_class=self.processing_class,
                       tokenizer=self.processing_class, optimizer=None, lr_scheduler=None, train_dataloader=None,
                       eval_dataloader=None, **kwargs)
            if out is not None:
                self.control = out
        return self.control

    def log(self, logs: dict) -> None:
        """Record `logs` in state.log_history and hand them to the callbacks' on_log, as transformers does."""
        if self.state.epoch is not None:
            logs = {**logs, "epoch": round(self.state.epoch, 4)}
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.control.should_log = False
        if self._trackers is not None:
            self._trackers.log(self.state.global_step, {(f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): v
                                                        for k, v in logs.items()}, prefix="")
        self._event("on_log", logs=logs)

    def _open_trackers(self, resume: bool):
        """The trackers of report_to (TensorBoard aside: the engine writes it), on rank 0, named run_name (default:
        output_dir's name), with TRL's options and the mathgrpo config they mean."""
        from ..trackers import Trackers

        if not self._report_to or not self.is_main:
            return None
        out = Path(self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = json.loads(json.dumps({"trl": self.args.to_dict(), **dataclasses.asdict(self.cfg)}, default=str))
        return Trackers(self._report_to, out, self.args.run_name or out.resolve().name, config, resume=resume)

    def _close_trackers(self) -> None:
        if self._trackers is not None:
            self._trackers.close()
            self._trackers = None

    def _reward_kwargs(self) -> dict:
        """TRL's extra reward arguments: trainer_state, log_extra(column, values), log_metric(name, value)."""
        def log_metric(name: str, value: float) -> None:
            self._extra_metrics.setdefault(name, []).append(float(value))

        def log_extra(column: str, values: list) -> None:
            self.extra_log_columns[column] = list(values)

        return {"trainer_state": self.state, "log_extra": log_extra, "log_metric": log_metric}

    def _after_step(self, step: int, metrics: dict):
        """mathgrpo's per-step callback: TRL-named logs every logging_steps, checkpoints in TRL's layout, hooks."""
        t = self.cfg.trainer
        prev_epoch = self.state.epoch or 0.0
        self.state.global_step = step
        self.state.epoch = step * t.prompts_per_step / len(self._train.rows)
        self._pending.append(self._trl_row(metrics))
        self._event("on_step_end")
        last = step == t.max_steps
        if step % t.logging_steps == 0 or last or (step == 1 and self.args.logging_first_step) or self.control.should_log:
            self.log(window_mean(self._pending))
            self._pending = []
        if self.args.save_strategy != "no" and (step % t.save_steps == 0 or last or self.control.should_save):
            if self.is_main:  # under torchrun every rank runs this callback; rank 0 writes
                save_trl_checkpoint(self, step)
            self.control.should_save = False
            self._event("on_save")
        if math.floor(self.state.epoch) > math.floor(prev_epoch):
            self._event("on_epoch_end")
            if not last:
                self._event("on_epoch_begin")
        if not last:
            self._event("on_step_begin")
        return self.control.should_training_stop

    def _trl_row(self, metrics: dict) -> dict:
        """One step's metrics under TRL's names, with what the rewards logged through log_metric (averaged)."""
        row = {TRL_METRIC_NAMES.get(k, k): v for k, v in metrics.items()}
        row.update({k: sum(v) / len(v) for k, v in self._extra_metrics.items()})
        self._extra_metrics.clear()
        return row


def window_mean(rows: list[dict]) -> dict:
    """Metrics averaged over the steps since the last log (NaN/None skipped), as TRL does; lr and grad norm are
    the last step's, as transformers logs them."""
    out = {}
    for key in dict.fromkeys(k for r in rows for k in r):
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if key in _LAST_NOT_MEAN:
            out[key] = vals[-1] if vals else None
        else:
            out[key] = sum(vals) / len(vals) if vals else None
    return out


# --- TRL's checkpoint layout -------------------------------------------------------------------------------------

def save_trl_checkpoint(trainer, step: int) -> Path:
    """output_dir/checkpoint-<step>/: the adapter (or model), tokenizer and trainer_state.json, as TRL writes
    them; written to a temp folder and renamed, and only the last save_total_limit are kept. mathgrpo's own
    resume state (optimizer, RNG, data position) lives in output_dir/checkpoints/checkpoint-<step>/."""
    out = Path(trainer.args.output_dir)
    final = out / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        save_weights_and_tokenizer(trainer.model, trainer.processing_class, tmp)
        trainer.state.save_to_json(str(tmp / "trainer_state.json"))
    keep = trainer.args.save_total_limit
    if keep:
        for old in trl_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_weights_and_tokenizer(model, tokenizer, path: Path) -> None:
    """The adapter (or full model) and the tokenizer into `path`, as TRL's save_model writes them."""
    from ..checkpoint import save_weights

    save_weights(model, path)
    tokenizer.save_pretrained(path)


def trl_checkpoints(out: Path) -> list[Path]:
    """output_dir/checkpoint-<step>/ folders (TRL's layout), oldest first."""
    return step_dirs(out)


def resume_dir(out: Path, spec) -> Path | None:
    """train(resume_from_checkpoint=spec) -> mathgrpo's resume folder (output_dir/checkpoints/checkpoint-<step>):
    True for the newest, a TRL-layout checkpoint-<step> folder for the state beside it, or the folder itself."""
    from ..checkpoint import list_checkpoints

    if spec in (None, False):
        return None
    if spec is True:
        if not list_checkpoints(out):
            raise ValueError(f"resume_from_checkpoint=True: no checkpoint in {out}/checkpoints (written by a "
                             f"previous GRPOTrainer.train() of mathgrpo)")
        return list_checkpoints(out)[-1]
    p = Path(spec)
    if p.name.startswith("checkpoint-") and (p.parent / "checkpoints" / p.name / "training_state.pt").is_file():
        return p.parent / "checkpoints" / p.name  # a TRL-layout folder: its resume state sits beside
    if (p / "training_state.pt").is_file():
        return p
    raise ValueError(f"resume_from_checkpoint={spec!r}: not a checkpoint written by mathgrpo's GRPOTrainer "
                     f"(it needs the optimizer/RNG state in <output_dir>/checkpoints/checkpoint-<step>)")


def log_history_until(out: Path, name: str, step: int) -> list[dict]:
    """The log_history of output_dir/<name>/trainer_state.json up to `step` (empty without the file)."""
    trl_state = out / name / "trainer_state.json"
    if not trl_state.is_file():
        return []
    return [h for h in json.loads(trl_state.read_text())["log_history"] if h["step"] <= step]


def clear_previous_run(out: Path, overwrite: bool) -> None:
    """A fresh run replaces an earlier one in output_dir (as TRL overwrites), so that its logs, checkpoints and
    pruning do not mix with the new run's."""
    old = [out / n for n in ("metrics.jsonl", "completions.jsonl", "summary.json", "checkpoints", "config.yaml",
                             "resumes.jsonl", "trackers.json") if (out / n).exists()]
    old += trl_checkpoints(out)
    if old and not overwrite:
        warn(f"output_dir {out} holds an earlier run: its logs and checkpoints are replaced (resume it instead "
             f"with trainer.train(resume_from_checkpoint=True))")
    for p in old:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
