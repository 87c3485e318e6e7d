"""Reports: report.md and report.html for a training run (plots + the base-vs-trained table).

    mathgrpo report runs/x            # -> runs/x/report.md, runs/x/report.html, runs/x/plots/*.png
    write_report("runs/x")            # the same from Python; training and `mathgrpo eval` call it at the end

Reads metrics.jsonl (one JSON object a step), eval_summary.json (when an evaluation ran), completions.jsonl
and eval*.jsonl (completion lengths). The markdown links the PNGs under plots/; the HTML embeds them
(base64), so it is one self-contained file (documents.py renders both). Plots use matplotlib's Agg canvas
directly (no pyplot state).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from . import metrics as M
from .documents import table_cells, write_documents
from .files import JsonlError
from .files import read_jsonl as _read_jsonl
from .registry import lookup


class ReportError(ValueError):
    """A run directory that cannot be reported on; the message names the file at fault."""


# --- reading ----------------------------------------------------------------------------------------------

def read_jsonl(path: Path, *, what: str) -> list[dict]:
    try:
        return _read_jsonl(path)
    except JsonlError as e:
        raise ReportError(f"{e.path}, line {e.line}: {e.why}; {what} must hold one object a line") from None


# --- metrics ----------------------------------------------------------------------------------------------

def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        raise ReportError(f"run directory not found: {run_dir}")
    if not path.is_file():
        raise ReportError(f"{path} not found: `mathgrpo report` needs a training run directory "
                          f"(one written by `mathgrpo train`)")
    rows = read_jsonl(path, what="metrics.jsonl")
    if not rows:
        raise ReportError(f"{path} is empty: the run logged no step yet")
    return rows


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) for one metric; missing/None values become NaN."""
    steps = np.array([r.get("step", i + 1) for i, r in enumerate(rows)], dtype=np.float64)
    vals = np.array([_float(r.get(key)) for r in rows], dtype=np.float64)
    return steps, vals


def _float(v) -> float:
    try:
        return math.nan if v is None else float(v)
    except (TypeError, ValueError):
        return math.nan


def ema(values: np.ndarray, span: int) -> np.ndarray:
    """Exponential moving average with alpha = 2/(span+1), bias-corrected at the start; NaNs are skipped
    (they keep the previous smoothed value)."""
    alpha = 2.0 / (span + 1.0)
    out = np.full(len(values), np.nan)
    acc, norm = 0.0, 0.0
    for i, v in enumerate(values):
        if not math.isnan(v):
            acc = (1 - alpha) * acc + alpha * v
            norm = (1 - alpha) * norm + alpha
        out[i] = acc / norm if norm > 0 else math.nan
    return out


def smoothing_span(n_steps: int) -> int:
    return max(3, n_steps // 8)


def reward_keys(rows: list[dict]) -> list[str]:
    """`reward` (the weighted total) first, then `rewards/<name>/mean` in logged order."""
    names = []
    for r in rows:
        for k in r:
            if M.is_reward_mean(k) and k not in names:
                names.append(k)
    return ([M.REWARD] if any(M.REWARD in r for r in rows) else []) + names


def _label(key: str) -> str:
    return "total reward" if key == M.REWARD else key.split("/")[1]


def first_last(rows: list[dict], window: int = 10) -> tuple[int, list[list[str]]]:
    """Mean of each reward over the first and the last `window` steps (halved for short runs so the two
    windows do not overlap): (window used, [[name, first, last, change]])."""
    w = max(1, min(window, len(rows) // 2))
    out = []
    for key in reward_keys(rows):
        _, v = series(rows, key)
        a, b = _safe_mean(v[:w]), _safe_mean(v[-w:])
        out.append([_label(key), _f(a), _f(b), _f(b - a, signed=True)])
    return w, out


def _safe_mean(v: np.ndarray) -> float:
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else math.nan


def _f(x: float, signed: bool = False) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def completion_lengths(run_dir: Path) -> list[int]:
    """Token lengths logged in completions.jsonl (`length`, `completion_length` or `num_tokens`, a number or
    a list per row)."""
    path = run_dir / "completions.jsonl"
    if not path.is_file():
        return []
    out = []
    for row in read_jsonl(path, what="completions.jsonl"):
        for key in ("length", "lengths", "completion_length", "completion_lengths", "num_tokens"):
            v = row.get(key)
            if isinstance(v, (int, float)):
                out.append(int(v))
            elif isinstance(v, list):
                out += [int(x) for x in v if isinstance(x, (int, float))]
    return out


def eval_lengths(out_dir: Path, summary: dict | None) -> dict[str, list[int]]:
    """Sample lengths per evaluated model, from the eval jsonl files named in the summary."""
    files = {}
    for label, m in ((summary or {}).get("models") or {}).items():
        if m.get("file"):
            p = Path(m["file"])
            files[label] = p if p.is_file() else out_dir / p.name
    out = {}
    for label, p in files.items():
        if p.is_file():
            recs = read_jsonl(p, what="eval.jsonl")
            out[label] = [s.get("length", 0) for rec in recs for s in rec.get("samples", [])]
    return out


# --- plots ------------------------------------------------------------------------------------------------

def _figure(ncols: int = 1, nrows: int = 1, w: float = 5.0, h: float = 3.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w * ncols, h * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False).ravel()


def _smoothed(ax, steps, vals, label: str, color=None) -> None:
    line, = ax.plot(steps, vals, alpha=0.35, lw=1, marker=".", ms=3, color=color)
    ax.plot(steps, ema(vals, smoothing_span(len(vals))), lw=2, color=line.get_color(), label=f"{label} (EMA)")


def plot_rewards(rows, ctx):
    keys = reward_keys(rows)
    if not keys:
        return None
    cols = min(3, len(keys))
    fig, axes = _figure(cols, math.ceil(len(keys) / cols))
    for ax, key in zip(axes, keys):
        steps, v = series(rows, key)
        std_key = M.REWARD_STD if key == M.REWARD else key[: -len("mean")] + "std"
        _, sd = series(rows, std_key)
        if np.isfinite(sd).any():
            ax.fill_between(steps, v - sd, v + sd, alpha=0.12, lw=0)
        _smoothed(ax, steps, v, _label(key))
        ax.set_title(_label(key))
        ax.set_xlabel("step")
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    return fig, "Reward per step (faint: per step, band: ±1 std within the step; bold: EMA)"


def plot_kl(rows, ctx):
    present = [k for k in (M.KL, M.CLIP_REGION) if np.isfinite(series(rows, k)[1]).any()]
    if not present:
        return None
    fig, axes = _figure(len(present))
    for ax, key in zip(axes, present):
        steps, v = series(rows, key)
        _smoothed(ax, steps, v, key)
        ax.set_title({M.KL: "KL to the reference", M.CLIP_REGION: "clipped fraction of tokens"}[key])
        ax.set_xlabel("step")
    return fig, "KL divergence to the reference policy" + (" and clip ratio" if len(present) > 1 else "")


def plot_lengths(rows, ctx):
    steps, mean = series(rows, M.COMPLETION_LENGTH_MEAN)
    _, mx = series(rows, M.COMPLETION_LENGTH_MAX)
    if not (np.isfinite(mean).any() or np.isfinite(mx).any()):
        return None
    fig, (ax,) = _figure()
    _smoothed(ax, steps, mean, "mean")
    ax.plot(steps, mx, lw=1, ls="--", label="max")
    _, trunc = series(rows, M.TRUNCATED_FRAC)
    if np.isfinite(trunc).any():
        ax2 = ax.twinx()
        ax2.plot(steps, trunc, lw=1, color="tab:red", alpha=0.6, label="truncated fraction")
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("truncated fraction")
        ax2.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("tokens")
    ax.legend(loc="upper left", fontsize=8)
    return fig, "Completion length per step (tokens)"


def plot_step_time(rows, ctx):
    steps, gen = series(rows, M.GEN_TIME)
    _, upd = series(rows, M.UPDATE_TIME)
    _, tot = series(rows, M.STEP_TIME)
    if not (np.isfinite(gen).any() or np.isfinite(tot).any()):
        return None
    fig, (ax,) = _figure()
    if np.isfinite(gen).any() and np.isfinite(upd).any():
        ax.stackplot(steps, np.nan_to_num(gen), np.nan_to_num(upd), labels=["generation", "update"], alpha=0.7)
    if np.isfinite(tot).any():
        ax.plot(steps, tot, color="black", lw=1, label="step total")
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8)
    return fig, "Time per step: generation vs update"


def plot_length_hist(rows, ctx):
    groups = {"training": ctx["train_lengths"]} if ctx["train_lengths"] else {}
    groups.update({f"eval: {k}": v for k, v in ctx["eval_lengths"].items() if v})
    if not groups:
        return None
    fig, (ax,) = _figure()
    hi = max(max(v) for v in groups.values())
    bins = np.linspace(0, max(hi, 1), 31)
    for label, v in groups.items():
        ax.hist(v, bins=bins, alpha=0.5, label=f"{label} (n={len(v)})")
    ax.set_xlabel("completion length (tokens)")
    ax.set_ylabel("completions")
    ax.legend(fontsize=8)
    return fig, "Histogram of completion lengths"


# name -> plot function(rows, ctx) -> (figure, caption) or None when the run lacks the data.
PLOTS: dict[str, Callable] = {
    "rewards": plot_rewards,
    "kl": plot_kl,
    "completion_length": plot_lengths,
    "step_time": plot_step_time,
    "length_hist": plot_length_hist,
}


def render_plots(rows: list[dict], ctx: dict, plot_dir: Path, names=None) -> list[tuple[Path, str]]:
    plot_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for name in names or PLOTS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN stretches in a series
            out = lookup(PLOTS, name, "render_plots: names")(rows, ctx)
        if out is None:
            continue
        fig, caption = out
        path = plot_dir / f"{name}.png"
        fig.savefig(path)
        made.append((path, caption))
    return made


# --- the reports ------------------------------------------------------------------------------------------

def _eval_blocks(summary: dict | None, run_dir: Path | None = None) -> list[tuple[str, object]]:
    if not summary or not summary.get("table"):
        held_out = _held_out(run_dir) if run_dir is not None else None
        extra = " data.test_source=PATH" if held_out == 0 else ""
        why = " (the run holds out no test problems: give some)" if held_out == 0 else ""
        return [("h2", "Evaluation"), ("p", f"No evaluation yet{why}: run `mathgrpo eval --adapter <run_dir> "
                                            f"--baseline{extra}`.")]
    s = summary.get("settings", {})
    title = "Base vs trained" if summary.get("comparison") else "Evaluation"
    note = (f"{s.get('num_samples', '?')} samples per problem at temperature {s.get('temperature', '?')}, seed "
            f"{s.get('seed', '?')}, data {s.get('test_source') or s.get('data', '?')}.")
    if summary.get("comparison"):
        note += (f" diff = trained - base; 95% CI from {s.get('bootstrap', '?')} bootstrap resamples of the "
                 f"problems (paired).")
    return [("h2", title), ("p", note), ("table", table_cells(summary["table"]))]


def _load_summary(out_dir: Path, eval_summary: dict | None) -> dict | None:
    if eval_summary is not None:
        return eval_summary
    path = out_dir / "eval_summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e.msg})") from None


def _diagnosis_blocks(run_dir: Path) -> list[tuple[str, object]]:
    """summary.json's findings (diagnose.py: why the run may have learned nothing), first in the report."""
    path = run_dir / "summary.json"
    try:
        found = json.loads(path.read_text()).get("diagnosis") if path.is_file() else None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e.msg})") from None
    return [("h2", "Learning nothing?")] + [("p", m) for m in found] if found else []


def _run_facts(run_dir: Path, rows: list[dict]) -> str:
    import yaml

    facts = [f"{len(rows)} steps logged"]
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        try:
            cfg = yaml.safe_load(cfg_path.read_text()) or {}
            facts.append(f"model {cfg.get('model', {}).get('name_or_path', '?')}")
            facts.append(f"data {cfg.get('data', {}).get('source', '?')}")
        except yaml.YAMLError:
            facts.append("config.yaml unreadable")
    _, t = series(rows, "step_time")
    if np.isfinite(t).any():
        facts.append(f"training time {np.nansum(t) / 60:.1f} min")
    return "; ".join(facts) + "."


def _held_out(run_dir: Path) -> int | None:
    """The number of test problems the run held out (its data.json), None when unknown."""
    try:
        return json.loads((run_dir / "data.json").read_text())["fingerprints"]["n_test"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_report(run_dir: str | Path, eval_summary: dict | None = None) -> tuple[Path, Path]:
    """report.md + report.html for a training run; returns their paths."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    summary = _load_summary(run_dir, eval_summary)
    ctx = {"train_lengths": completion_lengths(run_dir), "eval_lengths": eval_lengths(run_dir, summary)}
    plots = render_plots(rows, ctx, run_dir / "plots")
    w, fl = first_last(rows)
    blocks = [("h1", f"Training report: {run_dir.name}"), ("p", _run_facts(run_dir, rows))]
    blocks += _diagnosis_blocks(run_dir)
    blocks += _eval_blocks(summary, run_dir)
    if fl:
        blocks += [("h2", f"Rewards: first {w} vs last {w} steps"),
                   ("table", (["reward", f"first {w}", f"last {w}", "change"], fl))]
    blocks += [("h2", "Training curves")] + [("img", p) for p in plots]
    return write_documents(blocks, run_dir, f"mathgrpo report: {run_dir.name}")


def write_eval_report(out_dir: str | Path, eval_summary: dict | None = None) -> tuple[Path, Path]:
    """report.md + report.html for an evaluation without a training run (table + length histogram)."""
    out_dir = Path(out_dir)
    summary = _load_summary(out_dir, eval_summary)
    if summary is None:
        raise ReportError(f"{out_dir / 'eval_summary.json'} not found: run `mathgrpo eval` first")
    ctx = {"train_lengths": [], "eval_lengths": eval_lengths(out_dir, summary)}
    plots = render_plots([], ctx, out_dir / "plots", names=["length_hist"])
    blocks = [("h1", f"Evaluation report: {out_dir.name}")] + _eval_blocks(summary)
    blocks += [("img", p) for p in plots]
    return write_documents(blocks, out_dir, f"mathgrpo eval: {out_dir.name}")
