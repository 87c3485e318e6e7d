"""Experiment trackers: `trainer.report_to` names which of TensorBoard, Weights & Biases, MLflow and Trackio get
the run, each through its own library.

    mathgrpo train cfg.yaml 'trainer.report_to=[wandb, mlflow]'
    pip install 'mathgrpo[wandb]'     # or [mlflow], [trackio]; TensorBoard comes with mathgrpo

Every tracker gets the run name (`trainer.run_name`, else the run directory's name), the resolved config, and
every step's metrics under `train/<name>` at the step number. Each library is configured as its users expect,
by its own environment variables: WANDB_PROJECT (default "mathgrpo"), WANDB_MODE=offline, WANDB_DIR (default the
run dir); MLFLOW_TRACKING_URI (mlflow's own default otherwise), MLFLOW_EXPERIMENT_NAME (default "mathgrpo");
TRACKIO_PROJECT (default "mathgrpo"), TRACKIO_DIR. A resumed run continues the same tracker runs: their ids are
kept in `<run dir>/trackers.json`. Only rank 0 (the RunLogger) opens trackers. Tests: tests/test_trackers.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable

from .registry import lookup

# name -> (module to import, the pip extra that installs it)
LIBRARIES = {"tensorboard": ("tensorboard", None), "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow"),
             "trackio": ("trackio", "trackio")}


class TrackerError(ValueError):
    """A tracker that cannot be used: its library is missing, or it refused the run."""


def _require(name: str):
    import importlib

    module, extra = LIBRARIES[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        how = f"pip install 'mathgrpo[{extra}]'" if extra else "pip install tensorboard"
        raise TrackerError(f"trainer.report_to lists {name!r} but the {module} library is not installed: {how} "
                           f"(or remove {name!r} from trainer.report_to)") from None


def scalars(metrics: dict, prefix: str = "train/") -> dict[str, float]:
    """The finite numeric metrics of a step, named `<prefix><name>` (None, NaN and text are left out)."""
    return {f"{prefix}{k}": float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _flat_config(config: dict) -> dict[str, object]:
    return {f"{sec}.{k}": v for sec, vals in config.items() for k, v in vals.items()}


def _quiet_writer_thread() -> None:
    """TensorBoard's writer thread keeps a failed write (a full disk, a deleted run folder) for the main thread,
    whose next log call raises it and is reported in one line; the thread's own traceback would come first."""
    previous = threading.excepthook
    if getattr(previous, "mathgrpo", False):
        return

    def hook(args):
        if not (type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError)):
            previous(args)

    hook.mathgrpo = True
    threading.excepthook = hook


class _TensorBoard:
    def __init__(self, run_dir: Path, name: str, config: dict, state: dict):
        _require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        import yaml

        _quiet_writer_thread()
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        if not state:  # once per run, not again on resume
            self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)
        state["name"] = name

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, run_dir: Path, name: str, config: dict, state: dict):
        wandb = _require("wandb")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mathgrpo"), name=name, config=config,
                              dir=os.environ.get("WANDB_DIR", str(run_dir)), id=state.get("id"),
                              resume="allow" if state.get("id") else None, reinit="create_new")
        state["id"] = self.run.id

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    # MLflow metric and param names allow letters, digits and _ - . / and space only (pass@1 does not pass)
    _bad = re.compile(r"[^\w\-./ ]")

    def __init__(self, run_dir: Path, name: str, config: dict, state: dict):
        _require("mlflow")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()  # MLFLOW_TRACKING_URI, else mlflow's default store
        try:
            if state.get("run_id"):
                self.run_id = state["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                return
            exp_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "mathgrpo")
            exp = self.client.get_experiment_by_name(exp_name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(exp_name)
            self.run_id = self.client.create_run(exp_id, run_name=name, tags={"run_dir": str(run_dir)}).info.run_id
        except Exception as e:  # noqa: BLE001 - mlflow raises its own exception types per store
            raise TrackerError(f"trainer.report_to 'mlflow': cannot open a run at tracking URI "
                               f"{self.client.tracking_uri!r}: {str(e)[:400]} (set MLFLOW_TRACKING_URI)") from None
        state["run_id"] = self.run_id
        params = [Param(self._bad.sub("_", k), str(v)[:6000]) for k, v in _flat_config(config).items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_dict(self.run_id, config, "config.yaml")

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(self._bad.sub("_", k), v, now, step)
                                                    for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _Trackio:
    def __init__(self, run_dir: Path, name: str, config: dict, state: dict):
        self.trackio = _require("trackio")
        project = state.get("project") or os.environ.get("TRACKIO_PROJECT", "mathgrpo")
        self.run = self.trackio.init(project=project, name=state.get("name", name), config=config,
                                     resume="allow" if state else "never", embed=False)
        state.update(project=project, name=state.get("name", name))

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS: dict[str, Callable] = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _MLflow,
                                 "trackio": _Trackio}


class Trackers:
    """The run's open trackers: `log(step, metrics)` to all of them, `close()` at the end. With `resume`, the
    tracker runs recorded in run_dir/trackers.json are continued; otherwise new ones start (and are recorded)."""

    def __init__(self, names: list[str], run_dir: Path, run_name: str, config: dict, resume: bool = False):
        self.run_dir = Path(run_dir)
        saved = self.run_dir / "trackers.json"
        states = json.loads(saved.read_text()) if resume and saved.is_file() else {}
        self.open: list = []
        try:
            for name in dict.fromkeys(names):  # each once, in the order given
                start = lookup(TRACKERS, name, "trainer.report_to", error=TrackerError)
                self.open.append(start(self.run_dir, run_name, config, states.setdefault(name, {})))
        except BaseException:
            self.close()  # the ones already open must not linger
            raise
        if self.open:
            saved.write_text(json.dumps(states, indent=1) + "\n")

    def log(self, step: int, metrics: dict, prefix: str = "train/") -> None:
        values = scalars(metrics, prefix)
        for t in self.open:
            t.log(step, values)

    def close(self) -> None:
        while self.open:
            self.open.pop().close()


def tracker_names(report_to: list[str], tensorboard: bool) -> list[str]:
    """trainer.report_to plus TensorBoard while trainer.tensorboard is on (its default)."""
    return (["tensorboard"] if tensorboard else []) + list(report_to)


def check_installed(report_to: list[str]) -> None:
    """Fail before any work (model loading) when a tracker cannot start: its library missing (the error names its
    extra), or W&B online without a login."""
    import importlib.util

    for name in report_to:
        if name in LIBRARIES and importlib.util.find_spec(LIBRARIES[name][0]) is None:
            _require(name)  # raises, naming the extra
    if "wandb" in report_to and not wandb_login_found():
        raise TrackerError("trainer.report_to lists 'wandb' but no W&B login was found (WANDB_API_KEY, ~/.netrc, "
                           "wandb's settings file): run `wandb login`, or set WANDB_MODE=offline to write the run "
                           "locally (`wandb sync` uploads it later)")


def wandb_login_found() -> bool:
    """True when W&B need not log in: offline or disabled mode, or credentials where wandb looks for them (the
    environment, a netrc entry for its host, a settings file holding an API key). Looked up without the network."""
    import netrc
    from urllib.parse import urlparse

    env = os.environ
    if env.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled") or \
            env.get("WANDB_DISABLED", "").lower() in ("1", "true") or env.get("WANDB_API_KEY") or \
            env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    for path in [env.get("NETRC"), Path.home() / ".netrc", Path.home() / "_netrc"]:
        try:
            if path and Path(path).is_file() and netrc.netrc(str(path)).authenticators(host):
                return True
        except (OSError, netrc.NetrcParseError):
            pass
    config_dir = Path(env.get("WANDB_CONFIG_DIR", Path.home() / ".config" / "wandb"))
    return any(p.is_file() and "api_key" in p.read_text(errors="replace")
               for p in (config_dir / "settings", Path("wandb") / "settings"))


def report_eval(run_dir: Path, cfg, metrics: dict[str, dict]) -> None:
    """An evaluation of a training run (the end of training, or `mathgrpo eval --adapter RUN`) into the run's
    trackers, continued: `eval/<model>/<metric>` (model: base, trained) at the run's last step."""
    import dataclasses

    names = tracker_names(cfg.trainer.report_to, cfg.trainer.tensorboard)
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    if not names or not lines:
        return
    step = json.loads(lines[-1])["step"]
    name = cfg.trainer.tracker_run_name or cfg.trainer.run_name or Path(run_dir).name
    trackers = Trackers(names, Path(run_dir), name, dataclasses.asdict(cfg), resume=True)
    try:
        trackers.log(step, {f"{label}/{k}": v for label, m in metrics.items() for k, v in m.items()}, prefix="eval/")
    finally:
        trackers.close()
