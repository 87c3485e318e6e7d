"""Tests for mathgrpo.answers: extraction, normalisation, integer helpers, equivalence, time limits."""

from __future__ import annotations

import json
import random
import signal
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest

from mathgrpo import answers, timed_verify
from mathgrpo.answers import (
    apply_answer_mod,
    as_int,
    extract_boxed,
    extract_gsm8k,
    is_aimo_integer,
    is_equivalent,
    is_equivalent_lenient,
    normalize_answer,
)

MATH500 = Path("/work/shared/data/math500/test.jsonl")
GSM8K_TEST = Path("/work/shared/data/gsm8k/test.jsonl")


@pytest.fixture(autouse=True)
def _fresh_cache():
    answers._equivalent_normalized.cache_clear()
    yield
    answers._equivalent_normalized.cache_clear()


# ------------------------------------------------------------------------------ extract_boxed


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so $\boxed{42}$.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\sqrt{\frac{a}{b^{2}}}} done", r"\sqrt{\frac{a}{b^{2}}}"),
        (r"\boxed{1} then \boxed{2} finally \boxed{3}", "3"),
        (r"\fbox{7}", "7"),
        (r"\fbox{1} and \boxed{2}", "2"),
        (r"\boxed{1} and \fbox{2}", "2"),
        (r"answer: \boxed 5$ ok", "5"),
        (r"answer: \boxed 5 ok", "5"),
        (r"answer: \boxed   -12.5", "-12.5"),
        (r"\boxed {9}", "9"),
        (r"\boxed{  x + 1 }", "x + 1"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),
        (r"\boxed{3} and then \boxed{4", "3"),  # truncated last box: previous wins
        (r"\boxed{3} \boxed{}", "3"),  # empty box skipped
        (r"\boxed{\boxed{5}}", "5"),
        (r"\fboxsep=2pt \boxed{8}", "8"),
        (r"\boxed{8} \fboxsep=2pt", "8"),
        ("no box here", None),
        (r"\boxed{}", None),
        (r"\boxed{unclosed", None),
        (r"\boxed5", None),
        (r"\boxed", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_boxed_cases(text, expected):
    assert extract_boxed(text) == expected


def _reference_boxed(text: str) -> str | None:
    """Slow, obvious version: try every box start, keep the latest complete non-empty one."""
    best = None
    for cmd in ("\\boxed", "\\fbox"):
        start = text.find(cmd)
        while start >= 0:
            pos = start + len(cmd)
            arg = None
            if pos < len(text) and not text[pos].isalpha():
                k = pos
                while k < len(text) and text[k].isspace():
                    k += 1
                if k < len(text) and text[k] == "{":
                    depth, j = 0, k
                    while j < len(text):
                        if text[j] == "\\" and j + 1 < len(text) and text[j + 1] in "{}\\":
                            j += 2
                            continue
                        if text[j] == "{":
                            depth += 1
                        elif text[j] == "}":
                            depth -= 1
                            if depth == 0:
                                arg = text[k + 1 : j]
                                break
                        j += 1
                elif k > pos and k < len(text):
                    e = k
                    while e < len(text) and not text[e].isspace() and text[e] != "$":
                        e += 1
                    arg = text[k:e]
                    if arg.startswith(("\\boxed", "\\fbox")):
                        arg = None
            if arg is not None and arg.strip() and (best is None or start > best[0]):
                best = (start, arg.strip())
            start = text.find(cmd, start + 1)
    return None if best is None else best[1]


def test_extract_boxed_matches_reference_on_random_text():
    rng = random.Random(0)
    pieces = ["\\boxed", "\\fbox", "{", "}", "{", "}", " ", "x", "12", "\\{", "\\}", "$", "\\fboxsep", "\\\\", "\n"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        assert extract_boxed(text) == _reference_boxed(text), text


def test_extract_boxed_is_linear_on_degenerate_output():
    # A repetition loop of unclosed boxes must not go quadratic.
    text = "\\boxed{" * 20000
    t0 = time.perf_counter()
    assert extract_boxed(text) is None
    assert extract_boxed("\\boxed{1} " + "\\boxed{ {" * 20000) == "1"
    assert time.perf_counter() - t0 < 3.0


# ------------------------------------------------------------------------------ extract_gsm8k


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so 3+4=7\n#### 7", "7"),
        ("#### 1,234", "1234"),
        ("#### 1,234.", "1234"),
        ("#### -5\n", "-5"),
        ("#### 2.5", "2.5"),
        ("#### $18", "18"),
        ("first #### 3\nthen #### 4", "4"),
        ("#### 12\nextra line", "12"),
        ("no marker", None),
        ("####   ", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_gsm8k_cases(text, expected):
    assert extract_gsm8k(text) == expected


@pytest.mark.skipif(not GSM8K_TEST.exists(), reason="GSM8K test split not present")
def test_extract_gsm8k_gives_an_integer_for_every_real_row():
    rows = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines()]
    golds = [extract_gsm8k(r["answer"]) for r in rows]
    assert all(as_int(g) is not None for g in golds)
    # The value also matches a plain reading of the last line.
    for r, g in zip(rows[:200], golds):
        last = r["answer"].strip().splitlines()[-1]
        assert int(last.split("####")[1].replace(",", "")) == int(g)


# ---------------------------------------------------------------------------- normalize_answer


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("  42  ", "42"),
        ("$42$", "42"),
        (r"\$32,\!348", "32348"),
        (r"10,\!080", "10080"),
        (r"11,\! 111,\! 111,\! 100", "11111111100"),
        ("1{,}000", "1000"),
        ("1,234", "1234"),
        ("1,234,567.5", "1234567.5"),
        ("(1,234)", "(1,234)"),  # tuple, not a thousands separator
        ("[1,234]", "[1,234]"),
        ("1,23", "1,23"),
        ("3, 5, 7", "3, 5, 7"),
        ("1,-2", "1,-2"),
        ("1,000, 2,000", "1,000, 2,000"),  # a list of grouped numbers stays a list
        (r"\text{Evelyn}", "Evelyn"),
        (r"\textbf{yes}", "yes"),
        (r"864 \mbox{ inches}^2", "864 inches^2"),
        (r"5.4 \text{ cents}", "5.4 cents"),
        (r"\text{\textbf{x}}", "x"),
        (r"\text{(C)}", "C"),
        ("(B)", "B"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"( 3, \frac{\pi}{2} )"),
        (r"\left\{1,2\right\}", r"\{1,2\}"),
        (r"x \rightarrow \infty", r"x \rightarrow \infty"),
        (r"\leftarrow", r"\leftarrow"),
        (r"90^\circ", "90"),
        (r"90^{\circ}", "90"),
        (r"90 ^ { \circ }", "90"),
        ("90°", "90"),
        (r"\dfrac{17}{50}", r"\frac{17}{50}"),
        (r"\tfrac12", r"\frac12"),
        ("5.", "5"),
        ("1, 2, 3, ...", "1, 2, 3, ..."),  # an ellipsis is not a full stop
        (r"3\!\cdot\!4", r"3\cdot4"),
        (r"1\,000", "1000"),
        (r"a\;b\:c\ d\quad e", "a b c d e"),
        ("x=3", "x=3"),
        ("", ""),
    ],
)
def test_normalize_answer_cases(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_answer_is_idempotent():
    for raw in [r"\$32,\!348", r"\left( 3, \frac{\pi}{2} \right)", r"\text{(C)}", r"90^\circ.", "1{,}000"]:
        once = normalize_answer(raw)
        assert normalize_answer(once) == once


# ------------------------------------------------------------------------------- integer helpers


@pytest.mark.parametrize(
    "s, expected",
    [
        ("42", 42), ("042", 42), ("42.0", 42), ("42.", 42), ("-7", -7), ("+7", 7), ("1,000", 1000),
        ("12,345,678", 12345678), (" $5$ ", 5), ("\u22123", -3), ("0", 0),
        ("42.5", None), ("1,00", None), ("4 2", None), ("1e3", None), ("x", None), ("", None),
        (r"\frac{4}{2}", None), ("--1", None), (None, None),
    ],
)
def test_as_int_cases(s, expected):
    assert as_int(s) == expected


def test_as_int_round_trips_python_formats():
    rng = random.Random(1)
    for _ in range(500):
        n = rng.randint(-10**9, 10**9)
        assert as_int(str(n)) == n
        assert as_int(f"{n:,}") == n
        assert as_int(f"{n}.0") == n
        if n >= 0:
            assert as_int("00" + str(n)) == n


@pytest.mark.parametrize(
    "gold, mod, expected",
    [("1234", 1000, "234"), ("-7", 1000, "993"), ("042", 10, "2"), ("1,500", 1000, "500"),
     ("42", None, "42"), (r"\frac{1}{2}", 1000, r"\frac{1}{2}"), ("12.0", 5, "2")],
)
def test_apply_answer_mod(gold, mod, expected):
    assert apply_answer_mod(gold, mod) == expected


@pytest.mark.parametrize("mod", [0, -5, 2.5, True])
def test_apply_answer_mod_rejects_bad_mod(mod):
    with pytest.raises(ValueError, match="mod"):
        apply_answer_mod("12", mod)


@pytest.mark.parametrize(
    "s, expected",
    [("42", True), ("042", True), ("42.0", True), ("0", True), ("999", True), ("1000", False),
     ("-1", False), ("4.5", False), ("x", False), (None, False)],
)
def test_is_aimo_integer(s, expected):
    assert is_aimo_integer(s) is expected


# ---------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("0.5", r"\frac{1}{2}"), (r"\frac12", r"\frac{1}{2}"), (r"\dfrac{1}{2}", "0.5"), ("1/2", r"\frac12"),
        ("1,000", "1000"), ("42.0", "42"), ("042", "42"), (r"10^\circ", "10"), (r"\text{(A)}", "A"),
        (r"\text{(A)}", "(A)"), (r"\$18.90", "18.9"), (r"\sqrt{8}", r"2\sqrt{2}"),
        (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt3}{2}"), ("x=3", "3"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"), (r"2\pi", r"\pi \cdot 2"),
        ("-0.25", r"-\frac{1}{4}"), ("0.333333", r"\frac13"),  # math-verify rounds floats to 6 places
        (42, "42.0"),  # non-string columns are read as text
    ],
)
def test_equivalent_pairs(pred, gold):
    assert is_equivalent(pred, gold)


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("3", "4"), ("0.5", r"\frac{1}{3}"), (r"\frac{1}{2}", r"\frac{2}{3}"), ("0.333", r"\frac13"),
        ("(1,2)", "(2,1)"), (r"\sqrt{2}", "2"), ("1000", "100"), ("A", "B"), ("", "1"), ("1", ""),
        (None, "1"), ("1", None), (None, None),
    ],
)
def test_not_equivalent_pairs(pred, gold):
    assert not is_equivalent(pred, gold)


def test_int_and_fraction_fast_paths_never_call_math_verify(monkeypatch):
    def boom(*args):
        raise AssertionError("math-verify reached")

    monkeypatch.setattr(timed_verify, "_verify_unbounded", boom)
    monkeypatch.setattr(timed_verify._WORKER, "verify", boom)
    rng = random.Random(2)
    for _ in range(300):
        a, b = rng.randint(-50, 50), rng.randint(-50, 50)
        assert is_equivalent(str(a), f"{b}.0") is (a == b)
        p, q, r, s = rng.randint(-9, 9), rng.randint(1, 9), rng.randint(-9, 9), rng.randint(1, 9)
        assert is_equivalent(f"\\frac{{{p}}}{{{q}}}", f"{r}/{s}") is (Fraction(p, q) == Fraction(r, s))
        x, y = rng.randint(0, 10**4), rng.randint(0, 10**4)  # decimals apart by >= 1e-4
        assert is_equivalent(f"{x / 10**4}", f"{y / 10**4}") is (x == y)
        sign = "-" if p < 0 else ""
        assert is_equivalent(f"{sign}\\frac{abs(p)}{q}", f"\\dfrac{{{r}}}{{{s}}}") is (Fraction(p, q) == Fraction(r, s))


def test_results_are_cached_on_the_normalised_pair(monkeypatch):
    calls = []
    real = timed_verify._verify_unbounded

    def counting(pred, gold):
        calls.append((pred, gold))
        return real(pred, gold)

    monkeypatch.setattr(timed_verify, "_verify_unbounded", counting)
    assert is_equivalent(r"\sqrt{8}", r"2\sqrt{2}")
    assert is_equivalent(r"$\sqrt{8}$", r"2\sqrt{2}.")  # same after normalisation
    assert len(calls) == 1


def test_adversarial_expression_is_cut_off_by_the_deadline():
    t0 = time.perf_counter()
    assert not is_equivalent(r"9^{9^{9^9}}", "1", timeout=1.0)
    assert time.perf_counter() - t0 < 2.0
    # the alarm is fully cleaned up
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0.0
    assert signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.SIG_IGN)


def _in_thread(fn):
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # surfaced to the test below
            box["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert not t.is_alive()
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_works_from_a_worker_thread():
    timed_verify._WORKER.start()  # pay the helper's start-up outside the timed part
    assert _in_thread(lambda: is_equivalent(r"\sqrt{8}", r"2\sqrt{2}")) is True
    assert _in_thread(lambda: is_equivalent(r"\sqrt{8}", "3")) is False
    t0 = time.perf_counter()
    assert _in_thread(lambda: is_equivalent(r"9^{9^{9^9}}", "2", timeout=1.0)) is False
    assert time.perf_counter() - t0 < 2.0
    # the helper survives a timeout it handled itself
    assert _in_thread(lambda: is_equivalent(r"\sqrt{18}", r"3\sqrt{2}")) is True


def test_foreign_sigalrm_handler_is_left_alone():
    fired = []

    def theirs(signum, frame):
        fired.append(signum)

    previous = signal.signal(signal.SIGALRM, theirs)
    try:
        assert is_equivalent(r"\sqrt{12}", r"2\sqrt{3}")  # routed to the helper process
        assert signal.getsignal(signal.SIGALRM) is theirs
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert fired == []


def test_helper_that_hangs_is_killed_at_the_deadline():
    # A helper that never answers stands in for math-verify stuck inside C code.
    script = "import sys, time; print('ready', flush=True); time.sleep(120)"
    worker = timed_verify._VerifyWorker(command=[sys.executable, "-c", script])
    try:
        t0 = time.perf_counter()
        assert worker.verify("a", "b", 0.5) is False
        assert time.perf_counter() - t0 < 0.5 + timed_verify._GRACE_S + 1.0
        assert worker._proc is None  # killed; a later call starts a fresh one
    finally:
        worker.close()


def test_helper_that_cannot_start_raises_clearly():
    worker = timed_verify._VerifyWorker(command=[sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(RuntimeError, match="helper process failed to start"):
        worker.verify("a", "b", 1.0)


# ------------------------------------------------------------------------------------ MATH-500


@pytest.mark.skipif(not MATH500.exists(), reason="MATH-500 not present")
def test_math500_boxed_solution_matches_answer():
    rows = [json.loads(line) for line in MATH500.read_text().splitlines() if line.strip()]
    ok = 0
    for r in rows:
        boxed = extract_boxed(r["solution"])
        if boxed is not None and (
            normalize_answer(boxed) == normalize_answer(r["answer"]) or is_equivalent(boxed, r["answer"])
        ):
            ok += 1
    fraction = ok / len(rows)
    print(f"MATH-500: {ok}/{len(rows)} = {fraction:.4f}")
    assert ok == len(rows) == 500  # measured: every boxed solution equals its answer column


@pytest.mark.parametrize("pred", ["11 - 3", "2^{10}", "3 \\times 4", "4 \\cdot 2", "16 / 2"])
def test_an_unevaluated_computation_is_not_an_integer_answer(pred):
    gold = {"11 - 3": "8", "2^{10}": "1024", "3 \\times 4": "12", "4 \\cdot 2": "8", "16 / 2": "8"}[pred]
    assert not is_equivalent(pred, gold)  # math-verify alone would say equal: boxing the question is no answer
    assert is_equivalent(gold, gold) and is_equivalent("\\frac{16}{2}", "8") and is_equivalent("-8", "-8")


@pytest.mark.parametrize("pred,gold", [("10^3", "1000"), ("1.5\\times10^3", "1500"), ("3\\times4=12", "12"),
                                       ("8\\text{ cm}^2", "8"), ("1.5 \\times 10^{3}", "1500"), ("5 m/s", "5"),
                                       ("10^{-2}", "0.01"), ("$12$ apples", "12"), ("2+2=4", "4")])
def test_the_evaluation_judge_reads_unambiguous_values(pred, gold):
    assert is_equivalent_lenient(pred, gold)
    if as_int(gold) is not None and pred not in ("$12$ apples",):
        assert not is_equivalent(pred, gold)  # the training reward's strict guard refuses every one of them


@pytest.mark.parametrize("pred,gold", [("3\\times 4", "12"), ("11 - 3", "8"), ("2^{10}", "1024"), ("2+2=5", "4"),
                                       ("8 cm^2", "9"), ("10^3", "100"), (None, "1"), ("x = 5", "x = 6")])
def test_the_evaluation_judge_still_refuses_undone_arithmetic_and_wrong_values(pred, gold):
    assert not is_equivalent_lenient(pred, gold)
