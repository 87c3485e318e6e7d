"""Tests for mathgrpo.data: sources, column mapping, gold extraction, filters, split, arithmetic, errors."""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from mathgrpo.config import DataConfig
from mathgrpo.data import DataError, Problem, ProblemSet, generate_arithmetic, inspect_source, load_problems
from mathgrpo.sources import read_rows

SHARED = Path("/work/shared/data")
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared data folder absent")
ALL = dict(max_problems=None, test_fraction=0.0)  # keep every filtered row in train


def cfg(**kw) -> DataConfig:
    return dataclasses.replace(DataConfig(), **kw)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def by_id(problems: list) -> list:
    return sorted(problems, key=lambda p: int(p.id))


def ref_gsm8k(text: str) -> str:
    return text.split("####")[-1].strip().replace(",", "")


def ref_last_boxed(text: str) -> str | None:
    """Plain reference: scan for the last \\boxed{ and match braces by counting."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    j = i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i:j - 1].strip() if depth == 0 else None


ROWS = [  # gold via answer column, boxed (nested, last), gsm8k, none; an int, a leading zero, a non-integer
    {"problem": "p0", "solution": "so \\boxed{3} then \\boxed{\\frac{1}{2}}", "answer": "", "src": "a"},
    {"problem": "p1", "solution": "work\n#### 1,234", "answer": "", "src": "b"},
    {"problem": "p2", "solution": "no answer here", "answer": "042", "src": "c"},
    {"problem": "p3", "solution": "no answer here", "answer": "", "src": "d"},
    {"problem": "  p0 ", "solution": "\\boxed{7}", "answer": "", "src": "e"},  # duplicate of p0 up to spaces
    {"problem": "", "solution": "\\boxed{1}", "answer": "", "src": "f"},
]


# --- the shared data sets ---------------------------------------------------------------------------------

@needs_shared
def test_gsm8k_test_jsonl_gold_from_hashes():
    path = SHARED / "gsm8k/test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    ps = load_problems(cfg(source=str(path), problem_column="question", solution_column="answer", **ALL))
    assert len(ps.train) == len(rows) and ps.test == []
    for p in ps.train:
        row = rows[int(p.id)]
        assert p.problem == row["question"].strip()
        assert p.gold == ref_gsm8k(row["answer"])
        assert p.solution == row["answer"].strip()
    assert f"kept {len(rows)} of {len(rows)}" in ps.report


@needs_shared
def test_math500_answer_column_and_solution_only():
    path = SHARED / "math500/test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    with_col = load_problems(cfg(source=str(path), answer_column="answer", **ALL)).train
    assert len(with_col) == len(rows)
    for p in with_col:
        assert p.gold == rows[int(p.id)]["answer"].strip()
        assert set(p.extra) == {"subject", "level", "unique_id"}  # every unmapped column, passed on
        assert p.extra["unique_id"] == rows[int(p.id)]["unique_id"]
    solution_only = load_problems(cfg(source=str(path), **ALL)).train
    exact = sum(p.gold == rows[int(p.id)]["answer"] for p in solution_only)
    assert exact == len(rows) == 500, f"only {exact}/{len(rows)} solutions give the answer column"
    for p in solution_only:  # agrees with the plain brace-counting reference wherever that one applies
        ref = ref_last_boxed(rows[int(p.id)]["solution"])
        if ref is not None and "\\fbox" not in rows[int(p.id)]["solution"]:
            assert p.gold == ref


@needs_shared
def test_math_problems_parquet_matches_math500_answers():
    import pyarrow.parquet as pq

    path = SHARED / "math_problems.parquet"
    columns = pq.read_schema(path).names
    assert "problem" in columns and "solution" in columns
    answers = {json.loads(line)["problem"].strip(): json.loads(line)["answer"]
               for line in (SHARED / "math500/test.jsonl").read_text().splitlines()}
    ps = load_problems(cfg(source=str(path), answer_column="answer" if "answer" in columns else None, **ALL))
    common = [p for p in ps.train if p.problem in answers]
    assert len(common) == len(ps.train) == 500  # measured: all 500 are MATH-500 problems
    assert sum(p.gold == answers[p.problem] for p in common) == 500


@needs_shared
def test_gsm8k_folder_reads_the_requested_split_only():
    base = cfg(source=str(SHARED / "gsm8k"), problem_column="question", solution_column="answer", **ALL)
    for split in ("train", "test"):
        n = sum(1 for line in (SHARED / f"gsm8k/{split}.jsonl").read_text().splitlines() if line.strip())
        ps = load_problems(dataclasses.replace(base, hf_split=split))
        assert len(ps.train) == n and "not read" in ps.report


# --- file formats, folders, saved datasets -----------------------------------------------------------------

def write_all_formats(tmp_path: Path, rows: list[dict]) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {ext: tmp_path / f"d.{ext}" for ext in ("jsonl", "json", "csv", "parquet")}
    write_jsonl(paths["jsonl"], rows)
    paths["json"].write_text(json.dumps(rows))
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"])
    return paths


def test_every_file_format_reads_the_same_rows(tmp_path):
    for ext, path in write_all_formats(tmp_path, ROWS).items():
        assert read_rows(str(path)) == ROWS, ext
        ps = load_problems(cfg(source=str(path), answer_column="answer", **ALL))
        kept, _ = ref_keep(ROWS)
        assert [(p.problem, p.gold) for p in by_id(ps.train)] == kept, ext


def test_json_variants(tmp_path):
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"data": ROWS}))
    columnar = tmp_path / "columnar.json"
    columnar.write_text(json.dumps({k: [r[k] for r in ROWS] for k in ROWS[0]}))
    lines = write_jsonl(tmp_path / "lines.json", ROWS)
    for path in (nested, columnar, lines):
        assert read_rows(str(path)) == ROWS, path.name


def test_folder_without_split_names_reads_every_file_in_order(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS[:2])
    (tmp_path / "b.json").write_text(json.dumps(ROWS[2:4]))
    (tmp_path / "notes.txt").write_text("ignored")
    assert read_rows(str(tmp_path)) == ROWS[:4]


def test_folder_with_split_names_and_config_subfolder(tmp_path):
    sub = tmp_path / "main"
    sub.mkdir()
    write_jsonl(sub / "train-00000-of-00001.jsonl", ROWS[:2])
    write_jsonl(sub / "validation-00000-of-00001.jsonl", ROWS[2:3])
    write_jsonl(tmp_path / "other.jsonl", ROWS[3:])
    assert read_rows(str(tmp_path), hf_config="main") == ROWS[:2]
    assert read_rows(str(tmp_path), hf_split="dev", hf_config="main") == ROWS[2:3]  # alias of validation
    with pytest.raises(DataError, match=r"no files for split 'test'.*train, validation"):
        read_rows(str(tmp_path), hf_split="test", hf_config="main")


def test_saved_hf_dataset_and_dataset_dict(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "single"))
    assert read_rows(str(tmp_path / "single")) == ROWS
    datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(ROWS[:2])}).save_to_disk(str(tmp_path / "dd"))
    assert read_rows(str(tmp_path / "dd"), hf_split="test") == ROWS[:2]
    ps = load_problems(cfg(source=str(tmp_path / "dd"), test_source=str(tmp_path / "dd"), answer_column="answer",
                           dedup=False, max_problems=None))
    assert len(ps.train) == len(ref_keep(ROWS, dedup=False)[0]) and len(ps.test) == 2  # test_source: split "test"
    with pytest.raises(DataError, match=r"no split 'validation'; splits found: train, test"):
        read_rows(str(tmp_path / "dd"), hf_split="validation")


def test_hub_id_goes_through_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert read_rows("some-org/some-set", hf_split="test", hf_config="main") == ROWS
    assert calls == [("some-org/some-set", "main", "test")]


def test_unreachable_hub_id_is_a_data_error(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="could not load 'no-such-org/no-such-set'"):
        read_rows("no-such-org/no-such-set")


# --- gold, filters, report ------------------------------------------------------------------------------

def ref_keep(rows, answer_column=True, aimo=False, mod=None, dedup=True):
    """Reference filter: (kept (problem, gold) pairs, drop counter)."""
    kept, drops, seen = [], Counter(), set()
    for r in rows:
        if not r["problem"].strip():
            drops["empty problem"] += 1
            continue
        ans = r["answer"].strip() if answer_column else ""
        gold = ans or ref_last_boxed(r["solution"]) or (ref_gsm8k(r["solution"]) if "####" in r["solution"] else None)
        if not gold:
            drops["no answer found"] += 1
            continue
        is_int = re.fullmatch(r"\d+", gold.replace(",", "")) is not None
        if mod and not is_int:  # answer_mod on a non-integer gold drops the row
            drops["answer not an integer (data.answer_mod is set)"] += 1
            continue
        if mod and is_int:
            gold = str(int(gold.replace(",", "")) % mod)
        if aimo:
            if not (is_int and int(gold.replace(",", "")) <= 999):
                drops["answer not an integer 0..999"] += 1
                continue
            gold = str(int(gold.replace(",", "")))
        key = " ".join(r["problem"].split())
        if dedup and key in seen:
            drops["duplicate problem"] += 1
            continue
        seen.add(key)
        kept.append((r["problem"].strip(), gold))
    return kept, drops


def random_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        g = rng.choice([str(rng.randint(0, 2000)), "0" + str(rng.randint(0, 99)), "\\frac{1}{3}", "x+1"])
        kind = rng.choice(["answer", "boxed", "gsm8k", "none"])
        rows.append({"problem": rng.choice(["", " "]) if rng.random() < 0.05 else f"q{rng.randint(0, n)}"
                     + rng.choice(["", " ", "  "]),
                     "solution": {"boxed": f"x \\boxed{{{g}}}", "gsm8k": f"y\n#### {g}"}.get(kind, "none"),
                     "answer": g if kind == "answer" else ""})
    return rows


@pytest.mark.parametrize("aimo,mod,dedup", [(False, None, True), (True, None, True), (True, 1000, True),
                                            (False, 7, False)])
def test_filters_and_report_counts_match_reference(tmp_path, aimo, mod, dedup):
    rows = random_rows(400, seed=1)
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    ps = load_problems(cfg(source=str(path), answer_column="answer", aimo_filter=aimo, answer_mod=mod, dedup=dedup,
                           **ALL))
    kept, drops = ref_keep(rows, aimo=aimo, mod=mod, dedup=dedup)
    assert [(p.problem, p.gold) for p in by_id(ps.train)] == kept
    line = f"kept {len(kept)} of {len(rows)}: " + ", ".join(f"{c} {r}" for r, c in drops.most_common())
    assert line in ps.report
    assert sum(drops.values()) + len(kept) == len(rows)


def test_gold_preference_and_row_fallback(tmp_path):
    rows = [{"problem": "a", "solution": "\\boxed{1}", "answer": "2"},  # answer column wins
            {"problem": "b", "solution": "\\boxed{3}", "answer": ""},  # empty answer: the solution's box
            {"problem": "c", "solution": "t", "answer": "so \\boxed{4}."},  # a box inside the answer column
            {"problem": "d", "solution": "t", "answer": "calc\n#### 5,000"}]  # GSM8K text as answer column
    path = write_jsonl(tmp_path / "g.jsonl", rows)
    golds = {p.problem: p.gold for p in load_problems(cfg(source=str(path), answer_column="answer", **ALL)).train}
    assert golds == {"a": "2", "b": "3", "c": "4", "d": "5000"}
    no_col = {p.problem: p.gold for p in load_problems(cfg(source=str(path), **ALL)).train}
    assert no_col == {"a": "1", "b": "3"}


def test_numeric_answer_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "n.parquet"
    pq.write_table(pa.table({"problem": ["a", "b", "c"], "answer": [42.0, None, 7.5]}), path)
    ps = load_problems(cfg(source=str(path), solution_column=None, answer_column="answer", **ALL))
    assert [p.gold for p in by_id(ps.train)] == ["42", "7.5"]
    assert "1 no answer found" in ps.report


# --- split --------------------------------------------------------------------------------------------

def test_split_is_deterministic_disjoint_and_follows_seed(tmp_path):
    rows = [{"problem": f"q{i}", "solution": f"\\boxed{{{i}}}"} for i in range(200)]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    c = cfg(source=str(path), test_fraction=0.15, max_problems=None)
    a, b, other = load_problems(c, seed=3), load_problems(c, seed=3), load_problems(c, seed=4)
    ids = lambda ps: ([p.id for p in ps.train], [p.id for p in ps.test])  # noqa: E731
    assert ids(a) == ids(b) and ids(a) != ids(other)
    train, test = ids(a)
    assert len(test) == round(200 * 0.15) and not set(train) & set(test) and len(set(train) | set(test)) == 200
    order = list(range(200))
    random.Random(3).shuffle(order)  # reference: seeded shuffle, the first n_test indices are test
    assert test == [str(i) for i in sorted(order[:30])] and train == [str(i) for i in order[30:]]
    assert all(p.gold == p.id for p in a.train + a.test)


def test_max_problems_caps_train_only(tmp_path):
    rows = [{"problem": f"q{i}", "solution": f"\\boxed{{{i}}}"} for i in range(100)]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    full = load_problems(cfg(source=str(path), test_fraction=0.2, max_problems=None))
    capped = load_problems(cfg(source=str(path), test_fraction=0.2, max_problems=10))
    assert capped.test == full.test and capped.train == full.train[:10]
    assert "train capped at 10 by max_problems (70 not used)" in capped.report
    with pytest.raises(DataError, match="max_problems"):
        load_problems(cfg(source=str(path), max_problems=0))


def test_test_source_and_overlap_removal(tmp_path):
    train_rows = [{"problem": f"q{i}", "solution": f"\\boxed{{{i}}}"} for i in range(20)]
    test_rows = [{"problem": f"q{i}", "solution": f"\\boxed{{{i}}}"} for i in range(15, 30)]
    src, tst = write_jsonl(tmp_path / "a.jsonl", train_rows), write_jsonl(tmp_path / "b.jsonl", test_rows)
    ps = load_problems(cfg(source=str(src), test_source=str(tst), max_problems=None))
    assert sorted(p.problem for p in ps.train) == sorted(r["problem"] for r in train_rows)
    assert [p.problem for p in ps.test] == [f"q{i}" for i in range(20, 30)]
    assert all(p.id.startswith("test-") for p in ps.test)
    assert "kept 10 of 15: 5 also in the train data" in ps.report


# --- bad input ----------------------------------------------------------------------------------------

def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(DataError, match=r"data file not found: .*nope\.jsonl"):
        load_problems(cfg(source=str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match="data file not found"):
        read_rows(str(tmp_path / "no_such_folder"))
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match=r"x\.txt: unsupported file type '\.txt'"):
        read_rows(str(tmp_path / "x.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no parquet/jsonl/json/csv files"):
        read_rows(str(tmp_path / "empty"))


def test_unreadable_files_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "a"}\n\n{"problem": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3: not valid JSON"):
        read_rows(str(bad))
    not_obj = write_jsonl(tmp_path / "list.jsonl", [{"a": 1}, [1, 2]])  # type: ignore[list-item]
    with pytest.raises(DataError, match=r"list\.jsonl: line 2: expected a JSON object"):
        read_rows(str(not_obj))
    badjson = tmp_path / "bad.json"
    badjson.write_text('[\n{"problem": "a"},\n{"problem" "b"}\n]')
    with pytest.raises(DataError, match=r"bad\.json: line 3: not valid JSON"):
        read_rows(str(badjson))
    parquet = tmp_path / "corrupt.parquet"
    parquet.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"corrupt\.parquet: not a readable parquet file"):
        read_rows(str(parquet))
    badcsv = tmp_path / "bad.csv"
    badcsv.write_text('problem,solution\na,b\n"c,d,e,f\n')
    with pytest.raises(DataError, match=r"bad\.csv: line 3: not a readable CSV file"):
        read_rows(str(badcsv))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows"):
        load_problems(cfg(source=str(tmp_path / "empty.jsonl")))


def test_missing_mapped_column_names_it_and_lists_columns(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"question": "q", "answer": "#### 1"}])
    with pytest.raises(DataError, match=r"c\.jsonl: column 'problem' \(data\.problem_column\) not found; "
                                        r"columns found: question, answer"):
        load_problems(cfg(source=str(path)))
    with pytest.raises(DataError, match=r"column 'solution' \(data\.solution_column\).*null"):
        load_problems(cfg(source=str(path), problem_column="question"))
    with pytest.raises(DataError, match=r"column 'gold' \(data\.answer_column\)"):
        load_problems(cfg(source=str(path), problem_column="question", solution_column=None, answer_column="gold"))


def test_empty_after_filtering_says_why(tmp_path):
    rows = [{"problem": "a", "solution": "\\boxed{1.5}"}, {"problem": "b", "solution": "none"}]
    path = write_jsonl(tmp_path / "e.jsonl", rows)
    with pytest.raises(DataError, match=r"e\.jsonl: no problems left after filtering \(kept 0 of 2: ") as e:
        load_problems(cfg(source=str(path), aimo_filter=True))
    assert "1 no answer found" in str(e.value) and "1 answer not an integer 0..999" in str(e.value)


# --- built-in arithmetic --------------------------------------------------------------------------------

def ref_value(problem: str) -> int:
    """Reference answer: evaluate the expression in the question with Python."""
    m = re.fullmatch(r"What is the remainder when (.+) is divided by (\d+)\?", problem)
    if m:
        return eval(m.group(1)) % int(m.group(2))  # noqa: S307 - digits, + - * and parentheses only
    m = re.fullmatch(r"What is (.+)\?", problem)
    return eval(m.group(1))  # noqa: S307


@pytest.mark.parametrize("steps,hi", [(1, 20), (2, 99), (4, 12)])
def test_arithmetic_answers_steps_and_operands(steps, hi):
    rows = generate_arithmetic(300, steps, hi, seed=5)
    assert len({r["problem"] for r in rows}) == 300
    assert any("remainder" in r["problem"] for r in rows) and any("remainder" not in r["problem"] for r in rows)
    for r in rows:
        assert re.fullmatch(r"What is [\d+\-*() ]+\?|What is the remainder when [\d+\-*() ]+ is divided by \d+\?",
                            r["problem"]), r["problem"]
        value = ref_value(r["problem"])
        assert value >= 0 and r["answer"] == str(value)
        assert r["solution"].endswith(f"\\boxed{{{value}}}.") and ref_last_boxed(r["solution"]) == str(value)
        expr = r["problem"]
        n_ops = len(re.findall(r" [+\-*] ", expr)) + ("remainder" in expr)
        assert n_ops == steps, expr
        operands = [int(x) for x in re.findall(r"\d+", expr)]
        assert max(operands) <= hi and min(operands) >= 1
        assert r["solution"].count("\n") == steps  # one line per operation, then the answer


def test_arithmetic_is_deterministic_and_loads():
    assert generate_arithmetic(50, 2, 30, seed=1) == generate_arithmetic(50, 2, 30, seed=1)
    assert generate_arithmetic(50, 2, 30, seed=1) != generate_arithmetic(50, 2, 30, seed=2)
    c = cfg(source="arithmetic", arithmetic_size=60, arithmetic_steps=2, arithmetic_max_operand=30,
            test_fraction=0.1, max_problems=None)
    ps = load_problems(c, seed=7)
    assert isinstance(ps, ProblemSet) and all(isinstance(p, Problem) for p in ps.train)
    assert len(ps.train) == 54 and len(ps.test) == 6
    rows = generate_arithmetic(60, 2, 30, seed=7)
    for p in ps.train + ps.test:
        assert (p.problem, p.gold, p.solution) == (rows[int(p.id)]["problem"], rows[int(p.id)]["answer"],
                                                   rows[int(p.id)]["solution"])
    assert load_problems(c, seed=7) == ps


def test_arithmetic_impossible_sizes():
    with pytest.raises(DataError, match="only .* distinct problems"):
        generate_arithmetic(10_000, 1, 3, seed=0)
    with pytest.raises(DataError, match="arithmetic_max_operand >= 2"):
        generate_arithmetic(10, 1, 1, seed=0)


# --- inspect --------------------------------------------------------------------------------------------

def test_inspect_source_shows_columns_rows_gold_and_drops(tmp_path):
    path = write_jsonl(tmp_path / "i.jsonl", ROWS)
    out = inspect_source(str(path), cfg(answer_column="answer", max_problems=None))
    assert "rows: 6" in out and "columns: problem, solution, answer, src" in out
    kept, drops = ref_keep(ROWS)
    assert f"kept {len(kept)} of 6: " + ", ".join(f"{c} {r}" for r, c in drops.most_common()) in out
    for problem, gold in kept:
        assert f"problem: {problem}" in out and f"gold: {gold}" in out
    assert "problem <- problem" in inspect_source("arithmetic", cfg(arithmetic_size=5))


# --- rows read wrongly without a word (issue 16) ----------------------------------------------------------

@pytest.mark.parametrize("text,line,fields", [
    ("problem,answer\nWhat is 1,000 + 2?,1002\nWhat is 3 + 4?,7\n", 2, 3),  # an unquoted comma in the first row
    ("problem,answer\nWhat is 3 + 4?,7\nWhat is 5 + 1?\n", 3, 1),  # a row cut short
])
def test_a_csv_row_whose_field_count_disagrees_with_the_header_names_file_and_line(tmp_path, text, line, fields):
    path = tmp_path / "shift.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=rf"shift\.csv: line {line}: {fields} fields, but the header has 2 "
                                        rf"\(problem, answer\); quote a value that holds a comma"):
        load_problems(cfg(source=str(path), solution_column=None, answer_column="answer", **ALL))
    path.write_text('problem,answer\n"What is 1,000 + 2?",1002\n')  # quoted: read as one field
    ps = load_problems(cfg(source=str(path), solution_column=None, answer_column="answer", **ALL))
    assert [(p.problem, p.gold) for p in ps.train] == [("What is 1,000 + 2?", "1002")]


def test_golds_that_are_not_scalars_are_dropped_and_named(tmp_path):
    rows = [{"problem": "a", "answer": True}, {"problem": "b", "answer": [9]}, {"problem": "c", "answer": "5"},
            {"problem": "d", "answer": {"a": 1}}, {"problem": "e", "answer": 7}, {"problem": "f", "answer": [1, 2]}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    ps = load_problems(cfg(source=str(path), solution_column=None, answer_column="answer", **ALL))
    assert sorted(p.gold for p in ps.train) == ["5", "7"]
    assert "kept 2 of 6: 2 answer not text or a number (answer holds a list), 1 answer not text or a number " \
           "(answer holds a bool), 1 answer not text or a number (answer holds a dict)" in ps.report
    assert "  dropped, answer not text or a number (answer holds a list): rows 1, 5" in ps.report
    assert "  dropped, answer not text or a number (answer holds a bool): row 0" in ps.report


@pytest.mark.parametrize("ext", ["jsonl", "csv", "json"])
def test_a_file_that_is_not_utf8_names_file_and_line(tmp_path, ext):
    path = tmp_path / f"latin1.{ext}"
    body = {"jsonl": b'{"problem": "a", "solution": "\\\\boxed{1}"}\n{"problem": "caf\xe9"}\n',
            "csv": b"problem,solution\ncaf\xe9,c\n", "json": b'[{"problem": "a"},\n{"problem": "caf\xe9"}]'}[ext]
    path.write_bytes(body)
    with pytest.raises(DataError, match=rf"latin1\.{ext}: line 2: not UTF-8 text \(byte 0xe9"):
        read_rows(str(path))


def test_the_report_names_dropped_rows_and_warns_of_conflicting_duplicates(tmp_path, caplog):
    rows = [{"problem": "p0", "solution": "\\boxed{4}"}, {"problem": "p1", "solution": "none"},
            {"problem": " p0 ", "solution": "\\boxed{5}"}, {"problem": "p0", "solution": "\\boxed{4}"}]
    rows += [{"problem": "", "solution": "\\boxed{1}"} for _ in range(7)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ps = load_problems(cfg(source=str(path), **ALL))
    assert "kept 1 of 11: 7 empty problem, 2 duplicate problem, 1 no answer found" in ps.report
    assert "  dropped, empty problem: rows 4, 5, 6, 7, 8 and 2 more" in ps.report
    assert "  dropped, duplicate problem: rows 2, 3" in ps.report and "  dropped, no answer found: row 1" in ps.report
    conflict = "1 duplicate problem(s) with another gold than their first occurrence (the first is kept): " \
               "row 2 (gold '5') repeats row 0 (gold '4')"
    assert conflict in ps.report and conflict in caplog.text  # row 3 repeats it with the same gold: no conflict


def test_answer_mod_on_a_non_integer_answer_drops_the_row_and_says_why(tmp_path):
    rows = [{"problem": "a", "solution": "\\boxed{2024}"}, {"problem": "b", "solution": "\\boxed{\\frac{1}{3}}"},
            {"problem": "c", "solution": "\\boxed{x+1}"}]
    ps = load_problems(cfg(source=str(write_jsonl(tmp_path / "m.jsonl", rows)), answer_mod=1000, **ALL))
    assert [p.gold for p in ps.train] == ["24"]
    assert "  dropped, answer not an integer (data.answer_mod is set): rows 1, 2" in ps.report
