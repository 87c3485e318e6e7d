"""Evaluation: did training help? pass@1, pass@k, maj@k and rewards, base vs trained, with bootstrap CIs.

    mathgrpo eval --adapter runs/x --baseline         # trained adapter and its base on the run's test split
    run_eval(None, adapter="runs/x", baseline=True)   # the same from Python
    evaluate_trained_run(cfg, run_dir, model, tok, problems)   # the end of training

Writes eval_base.jsonl / eval_trained.jsonl (eval.jsonl for a single model), eval_summary.json, prints the
comparison table and writes report.md / report.html (report.py).

All k samples of all problems go through the rollout engine in a few large batches (never one problem
at a time), with fixed seeds (`eval.seed`) so the base and the trained model see the same sampling
seeds. The pure metric functions (`pass_at_k`, `majority_vote`, `bootstrap_ci`) live in eval_stats.py, checked
against reference implementations in tests/test_evaluate.py.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .answers import extract_boxed
from .config import Config, load_config, max_new_tokens_at
from .documents import markdown_table, table_cells
from .eval_stats import bootstrap_ci, majority_vote, pass_at_k
from .memory_plan import value
from .modelinfo import check_context, is_peft
from .registry import lookup
from .rewards import final_answer
from .scoring import reward_inputs

log = logging.getLogger(__name__)


# --- evaluating one model ---------------------------------------------------------------------------------

@dataclass
class EvalResult:
    label: str
    k: int
    metrics: dict[str, float]  # means over problems
    per_problem: dict[str, np.ndarray]  # metric -> [P], the basis of the bootstrap
    records: list[dict]  # one per problem, written to eval_<label>.jsonl
    problem_ids: list[str]
    reward_names: list[str]
    lengths: np.ndarray  # [P*k] completion lengths in tokens
    settings: dict = field(default_factory=dict)


# Per-problem metrics in table order; reward columns are inserted after maj@k.
HEAD_METRICS = ["pass@1", "pass@k", "maj@k"]
TAIL_METRICS = ["reward", "completion_length", "truncated_frac"]


def _reward_set(cfg: Config):
    from .scoring import RewardSet

    weights = cfg.rewards.weights or [1.0] * len(cfg.rewards.functions)
    return RewardSet(list(zip(cfg.rewards.functions, weights)), cfg.rewards.time_limit)


# eval.answer -> what counts as a completion's answer for pass@k and maj@k
ANSWER_EXTRACTORS = {"boxed": extract_boxed, "final": final_answer}


def evaluate(model, tokenizer, problems: list, cfg: Config, *, rollout=None, label: str = "model",
             world=None) -> EvalResult:
    """Sample eval.num_samples completions per problem and score them (see module docstring). Under torchrun
    (`world` with several ranks) each rank samples a contiguous share of the problems and every rank gets
    the whole result; rank r > 0 seeds its batches apart from rank 0, which seeds them as one process does."""
    import torch

    from .answers import is_equivalent_lenient, lenient_value
    from .distributed import SINGLE, shard
    from .logger import progress_bar
    from .prompts import PromptBuilder
    from .rollout import make_rollout, sampling_from

    ev = cfg.eval
    if ev.max_problems is not None:
        problems = problems[:ev.max_problems]
    if not problems:
        raise ValueError(f"evaluate({label}): no problems to evaluate (check data.source / data.test_source "
                         f"and eval.max_problems)")
    k = ev.num_samples
    if ev.temperature == 0 and k > 1:
        log.warning("eval.temperature=0 (greedy) with eval.num_samples=%d: the %d samples of a problem are "
                    "identical, so pass@k = maj@k = pass@1; set eval.num_samples=1 to save time", k, k)
    builder = PromptBuilder(tokenizer, cfg.prompt, cfg.data.answer_mod)
    prompt_ids = [builder.ids(p.problem) for p in problems]
    prompt_texts = [builder.text(p.problem) for p in problems]
    sampling = sampling_from(cfg.generation, seed=ev.seed, temperature=ev.temperature,
                             max_new_tokens=ev.max_new_tokens or max_new_tokens_at(cfg.generation.max_new_tokens,
                                                                                   cfg.trainer.max_steps))
    check_context(model, sampling.max_new_tokens, "eval.max_new_tokens" if ev.max_new_tokens else
                  "generation.max_new_tokens", max(map(len, prompt_ids)))
    rollout = rollout if rollout is not None else make_rollout(cfg.generation, model, tokenizer)

    # Batches of generation.max_batch completions; batch b always gets seed eval.seed + b (+ a rank offset).
    world = world or SINGLE
    mine = shard(prompt_ids, world.rank, world.size)  # contiguous: gathering in rank order restores the order
    per_call = max(1, value(cfg.generation.max_batch, "generation.max_batch") // k)
    rows: list[tuple] = []  # (text, truncated, length, completion ids) per completion, problem-major
    t0 = time.perf_counter()
    bar = progress_bar(len(mine), f"eval {label}", "problems", world.is_main)
    with torch.random.fork_rng():  # the caller's (trainer's) RNG streams continue untouched
        for b, start in enumerate(range(0, len(mine), per_call)):
            sampling.seed = ev.seed + b + 100_003 * world.rank
            torch.manual_seed(sampling.seed)  # for backends that ignore sampling.seed
            out = rollout.generate(mine[start:start + per_call], k, sampling)
            rows += zip(out.texts, [bool(t) for t in out.truncated], out.lengths.tolist(),
                        [row[m.bool()].tolist() for row, m in zip(out.completion_ids, out.completion_mask)])
            bar.update(min(per_call, len(mine) - start))
            log.info("eval %s: %d/%d problems generated (%.0f s)", label, min(start + per_call, len(mine)),
                     len(mine), time.perf_counter() - t0)
    bar.close()
    gen_seconds = time.perf_counter() - t0
    rows = world.gather_objects(rows)
    texts, truncated, lengths, comp_ids = (list(x) for x in zip(*rows))

    rewards = _reward_set(cfg)
    per_reward, total = rewards.score(texts, **reward_inputs(  # as in training (overlong, cosine)
        problems, k, prompts=prompt_texts, completion_ids=comp_ids, truncated=truncated, prefill=builder.prefill,
        max_completion_len=sampling.max_new_tokens, overlong_buffer=cfg.rewards.overlong_buffer))
    P, R = len(problems), len(rewards.names)
    per_reward = np.asarray(per_reward, dtype=np.float64).reshape(P, k, R)  # [P, k, R]
    total = np.asarray(total, dtype=np.float64).reshape(P, k)  # [P, k]

    records = []
    per_problem: dict[str, list] = {m: [] for m in ("pass@1", "pass@k", "maj@k")}
    extract = lookup(ANSWER_EXTRACTORS, ev.answer, "eval.answer")
    for i, p in enumerate(problems):
        rows = range(i * k, (i + 1) * k)
        answers = [extract(texts[j]) for j in rows]
        # judged as a grader would: `10^3`, `3\times4=12`, `8\text{ cm}^2` are values (rewards stay strict)
        correct = [a is not None and p.gold is not None and is_equivalent_lenient(a, p.gold) for a in answers]
        values = [lenient_value(a) for a in answers]  # votes count `10^3` and `1000` as one answer
        maj = majority_vote(values)
        maj_ok = maj is not None and correct[values.index(maj)]  # the winner is one of the answers
        c = sum(correct)
        per_problem["pass@1"].append(c / k)
        per_problem["pass@k"].append(pass_at_k(k, c, k))
        per_problem["maj@k"].append(float(maj_ok))
        samples = [{"text": texts[j], "answer": answers[s], "correct": correct[s], "length": int(lengths[j]),
                    "truncated": truncated[j],
                    "rewards": {**{n: _num(per_reward[i, s, r]) for r, n in enumerate(rewards.names)},
                                "total": _num(total[i, s])}}
                   for s, j in enumerate(rows)]
        records.append({"id": p.id, "problem": p.problem, "gold": p.gold, "n_correct": c, "pass@1": c / k,
                        f"pass@{k}": pass_at_k(k, c, k), "maj_answer": maj, f"maj@{k}": maj_ok, "samples": samples})

    pp = {m: np.asarray(v, dtype=np.float64) for m, v in per_problem.items()}
    for r, n in enumerate(rewards.names):
        pp[f"rewards/{n}"] = _rowmean(per_reward[:, :, r])
    pp["reward"] = _rowmean(total)
    pp["completion_length"] = np.asarray(lengths, dtype=np.float64).reshape(P, k).mean(axis=1)
    pp["truncated_frac"] = np.asarray(truncated, dtype=np.float64).reshape(P, k).mean(axis=1)
    metrics: dict = {m: _num(np.nanmean(v)) if np.isfinite(v).any() else None for m, v in pp.items()}
    metrics["n_problems"] = P
    metrics["k"] = k
    settings = {"num_samples": k, "temperature": ev.temperature, "seed": ev.seed,
                "max_new_tokens": sampling.max_new_tokens, "rewards": list(rewards.names),
                "gen_seconds": round(gen_seconds, 2), "score_seconds": round(time.perf_counter() - t0 - gen_seconds, 2)}
    return EvalResult(label=label, k=k, metrics=metrics, per_problem=pp, records=records,
                      problem_ids=[str(p.id) for p in problems], reward_names=list(rewards.names),
                      lengths=np.asarray(lengths), settings=settings)


def _rowmean(x: np.ndarray) -> np.ndarray:  # [P, k] -> [P]; NaN (reward not applicable) ignored
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows stay NaN, silently
        return np.nanmean(x, axis=1)


def _num(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def write_eval_jsonl(result: EvalResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for rec in result.records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


# --- base vs trained ----------------------------------------------------------------------------------------

def _display(metric: str, k: int) -> str:
    return {"pass@k": f"pass@{k}", "maj@k": f"maj@{k}", "reward": "reward (total)"}.get(metric, metric)


def metric_order(result: EvalResult) -> list[str]:
    return HEAD_METRICS + [f"rewards/{n}" for n in result.reward_names] + TAIL_METRICS


def compare(base: EvalResult, trained: EvalResult, n_boot: int, seed: int) -> list[dict]:
    """One row per per-problem metric: base and trained means, their difference and a 95% bootstrap CI of
    the paired per-problem difference (problems resampled). Both results must cover the same problems."""
    if base.problem_ids != trained.problem_ids:
        raise ValueError(f"compare: '{base.label}' and '{trained.label}' were evaluated on different problems "
                         f"({len(base.problem_ids)} vs {len(trained.problem_ids)}); evaluate both on one list")
    rows = []
    for m in metric_order(trained):
        if m not in base.per_problem or m not in trained.per_problem:
            continue
        diff = trained.per_problem[m] - base.per_problem[m]  # [P], paired by problem
        lo, hi = bootstrap_ci(diff, n_boot, seed)
        b, t = base.metrics.get(m), trained.metrics.get(m)
        rows.append({"metric": _display(m, trained.k), "key": m, "base": b, "trained": t,
                     "diff": None if b is None or t is None else t - b, "ci_low": _num(lo), "ci_high": _num(hi)})
    rows.append({"metric": "problems", "key": "n_problems", "base": base.metrics["n_problems"],
                 "trained": trained.metrics["n_problems"], "diff": None, "ci_low": None, "ci_high": None})
    return rows


def single_rows(result: EvalResult) -> list[dict]:
    """Rows for one model alone (no comparison)."""
    rows = [{"metric": _display(m, result.k), "key": m, "value": result.metrics.get(m)}
            for m in metric_order(result) if m in result.metrics]
    return rows + [{"metric": "problems", "key": "n_problems", "value": result.metrics["n_problems"]}]


def format_comparison_table(rows: list[dict]) -> str:
    """A markdown table (readable as plain text) of `compare` rows, or of `single_rows` rows."""
    return markdown_table(*table_cells(rows))


def eval_and_report(model, tokenizer, problems: list, cfg: Config, out_dir: str | Path, *, rollout=None,
                    baseline: bool = True, base_model=None, sources: dict | None = None, world=None) -> dict:
    """Evaluate `model` and, when `baseline`, its base: `base_model` if given (full fine-tuning), else the
    same peft model with its adapters off (the same weights in memory, no second load). Writes the eval
    files and eval_summary.json into out_dir, prints the table and writes the report; returns the summary.
    The end of training and `mathgrpo eval` both call this."""
    from .rollout import make_rollout

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rollout = rollout if rollout is not None else make_rollout(cfg.generation, model, tokenizer)
    if baseline and base_model is None and not is_peft(model):
        log.warning("baseline requested but the model has no adapter to switch off and no base_model was "
                    "given; evaluating it alone")
        baseline = False
    label = "trained" if baseline else "model"
    results = {label: evaluate(model, tokenizer, problems, cfg, rollout=rollout, label=label, world=world)}
    if baseline and base_model is not None:
        results["base"] = evaluate(base_model, tokenizer, problems, cfg, label="base", world=world)
    elif baseline:
        try:
            with model.disable_adapter():
                rollout.sync_weights(model)  # backends holding their own weight copy must see the base
                results["base"] = evaluate(model, tokenizer, problems, cfg, rollout=rollout, label="base",
                                           world=world)
        finally:
            rollout.sync_weights(model)
    if world is not None and not world.is_main:
        return {"models": {k: {"metrics": r.metrics} for k, r in results.items()}}  # rank 0 writes the files
    return write_eval_outputs(results, cfg, out, sources=sources)


def write_eval_outputs(results: dict[str, EvalResult], cfg: Config, out: Path, sources: dict | None = None) -> dict:
    """eval.jsonl (one model) or eval_<label>.jsonl (several), eval_summary.json, table on stdout, report."""
    from .report import write_eval_report, write_report

    files = {}
    for label, res in results.items():
        name = "eval.jsonl" if len(results) == 1 else f"eval_{label}.jsonl"
        files[label] = str(write_eval_jsonl(res, out / name))
    pair = {"base", "trained"} <= results.keys()
    if pair:
        rows = compare(results["base"], results["trained"], cfg.eval.bootstrap, cfg.eval.seed)
    else:
        rows = single_rows(next(iter(results.values())))
    first = next(iter(results.values()))
    summary = {"models": {label: {"metrics": r.metrics, "file": files[label], "source": (sources or {}).get(label)}
                          for label, r in results.items()},
               "comparison": rows if pair else None, "table": rows,
               "settings": {**first.settings, "bootstrap": cfg.eval.bootstrap, "data": cfg.data.source,
                            "test_source": cfg.data.test_source, "model": cfg.model.name_or_path}}
    (out / "eval_summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    if (out / "metrics.jsonl").is_file():  # a training run's evaluation: into its trackers too
        from .trackers import report_eval

        try:
            report_eval(out, cfg, {label: r.metrics for label, r in results.items()})
        except Exception as e:  # noqa: BLE001 - the numbers are written already; a tracker failure must not lose them
            log.warning("could not report the evaluation to trainer.report_to's trackers: %s", e)
    print(format_comparison_table(rows))
    try:
        md, html = (write_report if (out / "metrics.jsonl").is_file() else write_eval_report)(out, summary)
        summary["report"] = {"md": str(md), "html": str(html)}
    except Exception as e:  # the numbers are written already; a plotting failure must not lose them
        log.warning("could not write the report in %s: %s", out, e)
    return summary


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


# --- the CLI entry ---------------------------------------------------------------------------------------------

RUN_MARKERS = ("metrics.jsonl", "checkpoints", "summary.json")


def find_run_config(path: str | Path) -> Path | None:
    """config.yaml of the run that `path` (a run dir, checkpoint dir or adapter folder inside one) belongs
    to; None for a free-standing adapter folder. A run dir without config.yaml is an error."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"adapter path not found: {p}")
    for cand in (p, p.parent, p.parent.parent, p.parent.parent.parent):
        # A config.yaml above the adapter counts only inside a run (not a project folder's own config).
        if (cand / "config.yaml").is_file() and (cand == p or any((cand / m).exists() for m in RUN_MARKERS)):
            return cand / "config.yaml"
        if cand == p and any((cand / m).exists() for m in RUN_MARKERS):
            raise FileNotFoundError(f"{cand} looks like a training run (it has "
                                    f"{', '.join(m for m in RUN_MARKERS if (cand / m).exists())}) but has no "
                                    f"config.yaml, so its model and data settings are unknown; pass a config file")
    return None


def eval_config(adapter: str | None = None, path: str | None = None, overrides: list[str] | None = None) -> Config:
    """The config `mathgrpo eval` runs with: an explicit config file (`path`) if given, else the config.yaml of
    the run the adapter belongs to (so the test split is the one held out in training), else the embedded
    default (the documented defaults when overrides are given: `load_config`); then the dotted overrides."""
    run_cfg = find_run_config(adapter) if adapter and path is None else None
    if run_cfg is not None:
        log.info("eval: model, data and eval settings from %s", run_cfg)
    return load_config(path or run_cfg, overrides=overrides)


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in (*RUN_MARKERS, "config.yaml"))


def run_eval(cfg: Config | None, *, model_path: str | None = None, adapter: str | None = None,
             baseline: bool = False, out_dir: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """`mathgrpo eval`: evaluate a model (and/or adapter) on the test split; see `eval_and_report`.

    cfg None: built by `eval_config(adapter, overrides=overrides)`; a given cfg is used as is. `model_path`
    replaces model.name_or_path. Output goes to out_dir, by default the run/checkpoint dir of the adapter,
    else <trainer.output_dir>/eval-<time>.
    """
    from .data import load_problems
    from .models import load_model, resolve_adapter
    from .runs import check_data, place_data

    if baseline and not adapter:
        raise ValueError("--baseline compares a trained adapter with its base model: pass --adapter RUN_DIR "
                         "(a model without an adapter has no base to compare against)")
    if adapter and not Path(adapter).exists():
        raise FileNotFoundError(f"adapter path not found: {adapter}")
    cfg = eval_config(adapter, overrides=overrides) if cfg is None else copy.deepcopy(cfg)
    if model_path:
        if model_path != cfg.model.name_or_path:
            cfg.model.gguf_file = None
        cfg.model.name_or_path = model_path
    adapter_dir = resolve_adapter(adapter) if adapter else None
    if out_dir is None:
        out_dir = Path(adapter) if adapter and _is_run_dir(Path(adapter)) else \
            Path(cfg.trainer.output_dir) / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    run_cfg = find_run_config(adapter) if adapter else None
    recorded = place_data(run_cfg.parent, cfg) if run_cfg is not None else None  # the run's data files
    data = load_problems(cfg.data, seed=cfg.trainer.seed)
    if run_cfg is not None:
        check_data(run_cfg.parent, recorded, data, cfg)
    problems = data.test
    if not problems:
        raise ValueError(f"no test problems in data source '{cfg.data.source}' (data.test_fraction="
                         f"{cfg.data.test_fraction}); set data.test_source or data.test_fraction > 0")
    sources = {"trained": adapter_dir, "base": cfg.model.name_or_path, "model": adapter_dir or cfg.model.name_or_path}
    model, tok = load_model(cfg.model, adapter=adapter_dir)
    return eval_and_report(model, tok, problems, cfg, out_dir, baseline=baseline, sources=sources)


def evaluate_trained_run(cfg: Config, run_dir: str | Path, model, tokenizer, problems: list, *,
                         rollout=None, world=None) -> dict:
    """The end of training: the trained policy and its base (adapters off) on the run's test split, results
    and report in run_dir. Under torchrun every rank calls it with its `world` (sampling is sharded); rank 0
    writes."""
    sources = {"trained": str(Path(run_dir) / "adapter"), "base": cfg.model.name_or_path}
    return eval_and_report(model, tokenizer, problems, cfg, run_dir, rollout=rollout, baseline=True, sources=sources,
                           world=world)
