"""Load math problems: read a source, map its columns, extract gold answers, filter, split.

    problems = load_problems(cfg.data, seed=cfg.trainer.seed)    # -> ProblemSet(train, test, report)
    mathgrpo data inspect data/gsm8k/test.jsonl data.problem_column=question data.solution_column=answer

Sources (`data.source`, `data.test_source`; read by sources.py):
- a `.parquet`, `.jsonl`, `.json` or `.csv` file;
- a folder of such files. When file or folder names carry split names (`train.jsonl`, `test-0000.parquet`,
  `data/validation/x.csv`) only the files of `data.hf_split` are read; otherwise every file is read, in sorted
  order. A sub-folder named `data.hf_config` is entered first (the layout of hub repositories);
- a folder written by `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` (read with `load_from_disk`);
- `arithmetic`: the built-in generated set (`generate_arithmetic`), no files needed;
- anything else is passed to `datasets.load_dataset(source, hf_config, split=hf_split)` (a hub id or spec).
  A `test_source` that has splits is read at split `test`.

Gold answer, in order of preference: the answer column when mapped and non-empty (a `\\boxed{}` or GSM8K
`####` inside it is extracted); else the LAST `\\boxed{}`/`\\fbox{}` of the solution; else GSM8K's `#### 72`.
`answer_mod` is applied to the gold, then the filters run: empty problem, no answer found, the AIMO filter
(gold an integer 0..999 after `answer_mod`), duplicate problems (same text up to whitespace). A problem,
solution or answer cell that is not text or a number (a list, a mapping, a boolean) drops its row, and so
does a gold that is not an integer when `answer_mod` is set. Every dropped row is counted by reason in
`ProblemSet.report`, which also names the first rows of each reason (rows counted from 0 in the order read,
as `Problem.id`) and the duplicates whose gold differs from the kept first occurrence (conflicts).
A CSV row whose field count differs from the header's, and a file that is not UTF-8, are errors naming
the file and line.

Split: the filtered rows are shuffled with `random.Random(seed)`; `round(n * test_fraction)` of them form the
test split (source order), the rest the train split (shuffled order). `max_problems` then caps the TRAIN split
only: the test split keeps its fraction of the filtered data (cap evaluation with `eval.max_problems`). With
`test_source`, every filtered source row is train and the test_source rows are test (minus any problem that is
also in the train data, when `dedup` is on).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .answers import apply_answer_mod, as_int, extract_boxed, extract_gsm8k, is_aimo_integer
from .config import DataConfig
from .sources import DataError, read_source

BUILTIN_ARITHMETIC = "arithmetic"
log = logging.getLogger(__name__)


@dataclass
class Problem:
    id: str  # "<row index>" for source rows, "test-<row index>" for test_source rows
    problem: str
    gold: str  # gold answer, after answer_mod
    solution: str  # reference solution, "" if none
    extra: dict = field(default_factory=dict)  # the row's other columns (not the mapped ones)


@dataclass
class ProblemSet:
    train: list[Problem]
    test: list[Problem]
    report: str  # what was read, kept and dropped (by reason), and how it was split
    pool: list[Problem] = field(default_factory=list)  # every kept problem before the split and the cap


# --- built-in arithmetic ----------------------------------------------------------------------------------

_OPS: dict[str, Callable[[int, int], int]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
                                              "*": lambda a, b: a * b}


def _operand(rng: random.Random, op: str, value: int, hi: int) -> tuple[int, bool]:
    """(operand, goes first?) for `value op b` / `b op value`, avoiding trivial and negative results."""
    if op == "-":  # b - value with b > value, or value - b with 0 < b < value
        if value < hi and (value < 2 or rng.random() < 0.5):
            return rng.randint(value + 1, hi), True
        return rng.randint(1, min(value - 1, hi)), False
    return rng.randint(2 if op == "*" else 1, hi), rng.random() < 0.5


ARITHMETIC_OPS = ("+", "-", "*", "%")


def _arithmetic_one(rng: random.Random, steps: int, hi: int, ops: Sequence[str] = ARITHMETIC_OPS) -> dict:
    value = rng.randint(1, hi)
    expr, lines = str(value), []
    inner_ops = [o for o in ops if o != "%"] or ["%"]  # a remainder only ever comes last
    for step in range(steps):
        op = rng.choice(list(ops) if step == steps - 1 else inner_ops)
        if op == "%":
            b = rng.randint(2, max(2, min(hi, value)))  # divisor <= dividend: no trivial "2 mod 8"
            q, r = divmod(value, b)
            lines.append(f"{value} = {b} * {q} + {r}, so the remainder when {value} is divided by {b} is {r}.")
            what = expr if step == 0 else f"({expr})"
            return {"problem": f"What is the remainder when {what} is divided by {b}?",
                    "solution": _worked(lines, r), "answer": str(r)}
        b, first = _operand(rng, op, value, hi)
        inner = expr if step == 0 else f"({expr})"
        left, right = (b, value) if first else (value, b)
        new = _OPS[op](left, right)
        expr = f"{b} {op} {inner}" if first else f"{inner} {op} {b}"
        lines.append(f"{left} {op} {right} = {new}.")
        value = new
    return {"problem": f"What is {expr}?", "solution": _worked(lines, value), "answer": str(value)}


def _worked(lines: list[str], answer: int) -> str:
    steps = lines if len(lines) == 1 else [f"Step {i}: {s}" for i, s in enumerate(lines, 1)]
    return "\n".join(steps) + f"\nThe answer is \\boxed{{{answer}}}."


def generate_arithmetic(n: int, steps: int, max_operand: int, seed: int,
                        ops: Sequence[str] = ARITHMETIC_OPS) -> list[dict]:
    """`n` distinct seeded problems of `steps` operations drawn from `ops` (+, -, *, and % as a final
    remainder) on operands 1..max_operand, with worked solutions ending in `\\boxed{n}`; every answer
    is a non-negative integer."""
    if n < 0 or steps < 1 or max_operand < 2:
        raise DataError(f"arithmetic: need arithmetic_size >= 0, arithmetic_steps >= 1 and "
                        f"arithmetic_max_operand >= 2; got {n}, {steps}, {max_operand}")
    bad = [o for o in ops if o not in ARITHMETIC_OPS]
    if bad or not ops or (steps > 1 and list(ops) == ["%"]):
        raise DataError(f"data.arithmetic_ops: {list(ops)} must be a non-empty subset of {list(ARITHMETIC_OPS)} "
                        f"(and more than % alone when arithmetic_steps > 1)")
    rng, rows, seen, misses = random.Random(seed), [], set(), 0
    while len(rows) < n and misses < 10_000:  # that many repeats in a row: the space is used up
        row = _arithmetic_one(rng, steps, max_operand, ops)
        if row["problem"] in seen:
            misses += 1
            continue
        seen.add(row["problem"])
        rows.append(row)
        misses = 0
    if len(rows) < n:
        raise DataError(f"arithmetic: found only {len(rows)} distinct problems with arithmetic_steps={steps}, "
                        f"arithmetic_max_operand={max_operand}; lower arithmetic_size or raise the others")
    return rows


# --- column mapping, gold, filters, split -------------------------------------------------------------

def _text(value: Any) -> str | None:
    """A cell as stripped text; None for missing, NaN and empty cells."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a numeric answer column with gaps is read as float: 42.0 -> "42"
    text = str(value).strip()
    return text or None


def _not_scalar(value: Any) -> str | None:
    """The type name of a cell that is not text, a number or missing (a list, a mapping, a boolean)."""
    if value is None or (isinstance(value, (str, int, float)) and not isinstance(value, bool)):
        return None
    return type(value).__name__


def _rows_named(ids: list[str], n: int = 5) -> str:
    more = f" and {len(ids) - n} more" if len(ids) > n else ""
    return f"row{'s' if len(ids) > 1 else ''} {', '.join(ids[:n])}{more}"


def _gold(answer: str | None, solution: str) -> str | None:
    if answer is not None:
        if "\\boxed" in answer or "\\fbox" in answer:
            return extract_boxed(answer)
        return extract_gsm8k(answer) if "####" in answer else answer
    return extract_boxed(solution) or extract_gsm8k(solution)


def _columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for row in rows for k in row))


def _check_columns(rows: list[dict], cfg: DataConfig, origin: str) -> None:
    found = _columns(rows)
    for key in ("problem_column", "solution_column", "answer_column"):
        col = getattr(cfg, key)
        if col is not None and col not in found:
            hint = " (or null if there is none)" if key != "problem_column" else ""
            raise DataError(f"{origin}: column '{col}' (data.{key}) not found; columns found: "
                            f"{', '.join(found) or '(none)'}. Set data.{key} to one of them{hint}")


def _filter(rows: list[dict], cfg: DataConfig, origin: str, id_prefix: str = "",
            exclude: set[str] | None = None) -> tuple[list[Problem], str]:
    """Rows -> kept Problems (source order) and the `kept K of N: ...` report line."""
    if not rows:
        raise DataError(f"{origin}: no rows")
    if cfg.answer_mod is not None and (isinstance(cfg.answer_mod, bool) or cfg.answer_mod < 1):
        raise DataError(f"data.answer_mod must be a positive integer or null, got {cfg.answer_mod!r}")
    _check_columns(rows, cfg, origin)
    mapped = {cfg.problem_column, cfg.solution_column, cfg.answer_column} - {None}
    others = [c for c in _columns(rows) if c not in mapped]  # every Problem.extra gets the same keys
    drops: dict[str, list[str]] = {}  # reason -> ids of the rows dropped for it
    seen = {k: None for k in exclude or ()}  # problem key -> (id, gold) of its kept first occurrence
    conflicts: list[str] = []
    kept = []
    for i, row in enumerate(rows):
        rid = f"{id_prefix}{i}"
        odd = [(role, col, t) for role, col in (("problem", cfg.problem_column), ("solution", cfg.solution_column),
                                                 ("answer", cfg.answer_column))
               if col and (t := _not_scalar(row.get(col)))]
        if odd:
            drops.setdefault(f"{odd[0][0]} not text or a number ({odd[0][1]} holds a {odd[0][2]})", []).append(rid)
            continue
        problem = _text(row.get(cfg.problem_column))
        if problem is None:
            drops.setdefault("empty problem", []).append(rid)
            continue
        solution = _text(row.get(cfg.solution_column)) if cfg.solution_column else None
        answer = _text(row.get(cfg.answer_column)) if cfg.answer_column else None
        gold = (_gold(answer, solution or "") or "").strip()
        if not gold:
            drops.setdefault("no answer found", []).append(rid)
            continue
        if cfg.answer_mod is not None and as_int(gold) is None:  # "x mod 1000" of 1/3 means nothing
            drops.setdefault("answer not an integer (data.answer_mod is set)", []).append(rid)
            continue
        gold = apply_answer_mod(gold, cfg.answer_mod)
        if cfg.aimo_filter:
            if not is_aimo_integer(gold):
                drops.setdefault("answer not an integer 0..999", []).append(rid)
                continue
            gold = str(as_int(gold))  # "042", "42.0" -> "42"
        key = " ".join(problem.split())
        if cfg.dedup and key in seen:
            drops.setdefault("also in the train data" if seen[key] is None else "duplicate problem", []).append(rid)
            if seen[key] is not None and seen[key][1] != gold:
                conflicts.append(f"row {rid} (gold {gold!r}) repeats row {seen[key][0]} (gold {seen[key][1]!r})")
            continue
        seen[key] = (rid, gold)
        extra = {k: row.get(k) for k in others}
        kept.append(Problem(rid, problem, gold, solution or "", extra))
    ranked = sorted(drops.items(), key=lambda kv: -len(kv[1]))  # most common first, ties in order of appearance
    counts = f"kept {len(kept)} of {len(rows)}"
    if drops:
        counts += ": " + ", ".join(f"{len(ids)} {reason}" for reason, ids in ranked)
    if not kept:
        raise DataError(f"{origin}: no problems left after filtering ({counts}). Check data.problem_column, "
                        f"data.solution_column, data.answer_column, data.aimo_filter and data.answer_mod")
    lines = [f"{origin}: {counts}"] + [f"  dropped, {reason}: {_rows_named(ids)}" for reason, ids in ranked]
    if conflicts:
        warn = (f"{origin}: {len(conflicts)} duplicate problem(s) with another gold than their first occurrence "
                f"(the first is kept): {'; '.join(conflicts[:3])}{' ...' if len(conflicts) > 3 else ''}")
        log.warning("%s", warn)
        lines.append(f"  conflicts: {warn.split(': ', 1)[1]}")
    return kept, "\n".join(lines)


def _source_rows(source: str, cfg: DataConfig, seed: int, split: str) -> tuple[list[dict], DataConfig, str]:
    """Rows, the config that maps them (the built-in set has fixed columns) and a description."""
    if source == BUILTIN_ARITHMETIC:
        rows = generate_arithmetic(cfg.arithmetic_size, cfg.arithmetic_steps, cfg.arithmetic_max_operand, seed,
                                   cfg.arithmetic_ops)
        cfg = dataclasses.replace(cfg, problem_column="problem", solution_column="solution", answer_column="answer")
        return rows, cfg, (f"built-in arithmetic (size {cfg.arithmetic_size}, steps {cfg.arithmetic_steps}, "
                           f"max operand {cfg.arithmetic_max_operand}, ops {' '.join(cfg.arithmetic_ops)}, seed {seed})")
    mapped = {f"data.{k}": getattr(cfg, k) for k in ("problem_column", "solution_column", "answer_column")
              if getattr(cfg, k) is not None}
    rows, desc = read_source(source, split, cfg.hf_config, mapped)
    return rows, cfg, desc


def _split(kept: list[Problem], cfg: DataConfig, seed: int) -> tuple[list[Problem], list[Problem], str]:
    order = list(range(len(kept)))
    random.Random(seed).shuffle(order)
    n_test = round(len(kept) * cfg.test_fraction)
    if cfg.test_fraction > 0 and n_test == 0 and len(kept) > 1:
        n_test = 1  # a non-zero fraction asks for a test split
    n_test = min(n_test, len(kept) - 1)  # the train split is never empty
    test = [kept[i] for i in sorted(order[:n_test])]
    train = [kept[i] for i in order[n_test:]]
    return train, test, f"split (seed {seed}, test_fraction {cfg.test_fraction}): {len(train)} train, {len(test)} test"


def _cap(train: list[Problem], cfg: DataConfig) -> tuple[list[Problem], str]:
    cap = cfg.max_problems
    if cap is None or len(train) <= cap:
        return train, ""
    if cap < 1:
        raise DataError(f"data.max_problems must be >= 1 or null, got {cap}")
    return train[:cap], f"train capped at {cap} by max_problems ({len(train) - cap} not used)"


def load_problems(cfg: DataConfig, seed: int = 42) -> ProblemSet:
    """Read `cfg.source` (and `cfg.test_source`), extract gold answers, filter, split and cap; see module doc."""
    rows, src_cfg, desc = _source_rows(cfg.source, cfg, seed, cfg.hf_split)
    kept, kept_line = _filter(rows, src_cfg, cfg.source)
    lines = [f"read {desc}", kept_line]
    if cfg.test_source is None:
        train, test, split_line = _split(kept, cfg, seed)
        lines.append(split_line)
    else:
        train = kept[:]
        random.Random(seed).shuffle(train)  # max_problems then takes a seeded sample
        t_rows, t_cfg, t_desc = _source_rows(cfg.test_source, cfg, seed + 1, "test")
        exclude = {" ".join(p.problem.split()) for p in kept} if cfg.dedup else None
        test, t_line = _filter(t_rows, t_cfg, cfg.test_source, "test-", exclude)
        lines += [f"read test data {t_desc}", t_line, f"split: {len(train)} train (source), {len(test)} test (test_source)"]
    train, cap_line = _cap(train, cfg)
    lines += [cap_line] if cap_line else []
    pool = kept if cfg.test_source is None else kept + test
    return ProblemSet(train=train, test=test, report="\n".join(lines), pool=pool)


def _clip(text: str, n: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def inspect_source(source: str, cfg: DataConfig, n_rows: int = 3, seed: int = 42) -> str:
    """What the loader sees in `source` with `cfg`'s mapping: columns, rows, first problems + gold, drops."""
    cfg = dataclasses.replace(cfg, source=source)
    rows, src_cfg, desc = _source_rows(source, cfg, seed, cfg.hf_split)
    out = [f"source: {desc}", f"rows: {len(rows)}", f"columns: {', '.join(_columns(rows)) or '(none)'}",
           f"mapping: problem <- {src_cfg.problem_column}, solution <- {src_cfg.solution_column}, "
           f"answer <- {src_cfg.answer_column or '(extracted from the solution)'}"]
    kept, kept_line = _filter(rows, src_cfg, source)
    out.append(kept_line)
    if cfg.test_source is None:
        train, test, split_line = _split(kept, cfg, seed)
        out.append(split_line)
        out += [c for c in [_cap(train, cfg)[1]] if c]
    for p in kept[:n_rows]:
        out += [f"[{p.id}] problem: {_clip(p.problem)}", f"     gold: {p.gold}"]
    return "\n".join(out)

