"""Final-answer handling: `\\boxed{}` extraction, normalisation and equivalence.

Pure functions (no torch) used by the reward functions, the data loader (gold extraction) and the
evaluator. Nothing to run on its own; `pytest tests/test_answers.py` exercises it.

Equivalence runs in tiers, cheapest first: exact string after `normalize_answer`, then an
integer fast path, then a plain-rational fast path (`0.5` == `\\frac12`), and only then
math-verify (sympy). Math-verify can take unbounded time on adversarial input (`9^{9^{9^9}}`),
so it always runs under a deadline:
  * main thread, SIGALRM free: in-process, under a float `setitimer` alarm;
  * any other thread (signals only work in the main thread), or SIGALRM already taken by
    someone else: in a long-lived helper process (`python -c ...` over pipes); the parent
    waits at most `timeout + _GRACE_S` and kills (then lazily restarts) the helper on overrun,
    which also stops hangs inside C code that no signal can interrupt.
A timed-out comparison counts as "not equivalent". POSIX only (signals, select on pipes).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from functools import lru_cache

__all__ = [
    "extract_boxed", "extract_gsm8k", "normalize_answer", "as_int", "is_equivalent", "is_equivalent_lenient",
    "lenient_value", "apply_answer_mod", "is_aimo_integer",
]

# ----------------------------------------------------------------------------------- extraction

_BOX_COMMANDS = ("\\boxed", "\\fbox")
# Escaped braces and `\\` are skipped so `\boxed{\{1,2\}}` balances on the bare braces only.
_BRACE_TOKEN = re.compile(r"\\[{}\\]|[{}]")


def _balanced_group(text: str, open_pos: int, stop: int | None = None) -> str | None:
    """Content of the `{...}` group opening at `open_pos`; None when it does not close before `stop`."""
    depth = 0
    for m in _BRACE_TOKEN.finditer(text, open_pos, len(text) if stop is None else stop):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : m.start()]
    return None


def _box_argument(text: str, pos: int, stop: int) -> tuple[str | None, int | None]:
    """(argument, brace position) of a box command whose name ends at `pos`.

    Brace form or `\\boxed 5` form; the brace position is returned for an unclosed group
    (None argument) so the caller can bound earlier scans.
    """
    n = len(text)
    if pos < n and text[pos].isalpha():  # another command, e.g. `\fboxsep`
        return None, None
    k = pos
    while k < n and text[k].isspace():
        k += 1
    if k >= n:
        return None, None
    if text[k] == "{":
        return _balanced_group(text, k, stop), k
    if k == pos:  # `\boxed5` is not a form we accept: require the space
        return None, None
    end = k
    while end < n and not text[end].isspace() and text[end] != "$":
        end += 1
    token = text[k:end]
    if token.startswith(_BOX_COMMANDS):  # `\boxed \boxed`: a stutter, not an answer
        return None, None
    return token, None


def extract_boxed(text: str | None) -> str | None:
    """Stripped content of the last complete, non-empty `\\boxed{}` / `\\fbox{}` in `text`.

    Nested braces balance (`\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`); `\\boxed 5` (space form)
    takes the token up to whitespace or `$`. Boxes that never close (truncated output) or are
    empty are skipped in favour of an earlier one. For nested boxes the innermost wins.
    Linear time: candidates are found backwards with `str.rfind`, and once a group starting at
    brace b is known never to close, no earlier group can close after b either (it would
    contain b's open group), so earlier scans stop at b.
    """
    if not text:
        return None
    found = {cmd: text.rfind(cmd) for cmd in _BOX_COMMANDS}
    stop = len(text)
    while True:
        cmd = max(found, key=found.__getitem__)
        start = found[cmd]
        if start < 0:
            return None
        arg, brace = _box_argument(text, start + len(cmd), stop)
        if arg is not None:
            arg = arg.strip()
            if arg:
                return arg
        elif brace is not None:
            stop = min(stop, brace)
        found[cmd] = text.rfind(cmd, 0, start)


def extract_gsm8k(text: str | None) -> str | None:
    """GSM8K gold answer after the last `####` (`#### 1,234.` -> `1234`); None if absent/empty."""
    if not text:
        return None
    idx = text.rfind("####")
    if idx < 0:
        return None
    ans = text[idx + 4 :].split("\n", 1)[0]
    ans = ans.replace(",", "").replace("$", "").strip().rstrip(".").strip()
    return ans or None


# -------------------------------------------------------------------------------- normalisation

_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textit|textrm|textsf|textup|textnormal|mbox)\s*(?=\{)")
# One pass per rule; order matters (text unwrapped before `$` and spacing are removed).
_REWRITES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\\\$|\$"), ""),  # `\$32` (LaTeX dollar sign) and math delimiters
    (re.compile(r"(?<=\d),\\!\s*(?=\d)"), ","),  # `11,\! 111` thousands idiom -> `11,111`
    (re.compile(r"(?<=\d)\{,\}(?=\d)"), ","),  # `1{,}000` -> `1,000`
    (re.compile(r"\\[!,]"), ""),  # thin / negative thin space
    (re.compile(r"\\[;: ]|\\q?quad(?![a-zA-Z])|~"), " "),  # wider spaces become plain spaces
    (re.compile(r"\\(?:left|right)(?![a-zA-Z])"), ""),  # keep delimiters; `\rightarrow` untouched
    (re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![a-zA-Z])|°|\\degree(?![a-zA-Z])"), ""),
    (re.compile(r"\\[dt]frac(?![a-zA-Z])"), r"\\frac"),
    (re.compile(r"\s+"), " "),
]
_TRAILING_PERIOD = re.compile(r"(?<!\.)\.\s*$")  # one final `.`, not an ellipsis
_CHOICE_LETTER = re.compile(r"^\(([A-E])\)$")  # multiple choice `(A)` -> `A`
_BRACKETS = re.compile(r"[()\[\]]|\\[{}]")
_THOUSANDS = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d,])")


def _unwrap_text_commands(s: str) -> str:
    """`\\text{ cm}` -> ` cm`, for every text-like command, nested ones included."""
    while True:
        m = _TEXT_COMMAND.search(s)
        if m is None:
            return s
        inner = _balanced_group(s, m.end())
        if inner is None:  # unbalanced: drop just the command name
            return s[: m.start()] + s[m.end() :]
        s = s[: m.start()] + inner + s[m.end() + len(inner) + 2 :]


@lru_cache(maxsize=1 << 16)  # golds repeat once per group member; predictions repeat too
def normalize_answer(s: str) -> str:
    """Canonical string form of an answer, for exact comparison and as math-verify input.

    Removes: `$` and `\\$`; spacing commands `\\! \\, \\; \\: \\ ` and `\\quad` (the first two
    vanish, the others become one space); text wrappers `\\text{}` `\\textbf{}` `\\textit{}`
    `\\textrm{}` `\\mbox{}` ... (inner text kept); `\\left`/`\\right` (the delimiter itself
    stays); degree marks `^\\circ`, `^{\\circ}`, `°`; one trailing `.`; surrounding whitespace
    (inner runs collapse to one space). Rewrites `\\dfrac`/`\\tfrac` -> `\\frac`, `(A)` -> `A`
    (a lone multiple-choice letter A-E), and thousands separators `1,234,567` -> `1234567` but
    only when the answer holds no bracket (`(1,234)` is a tuple) and every comma sits in a
    group of exactly 3 digits (`1,23`, `3, 5, 7`, `1,000, 2,000` stay lists). Variable
    assignments (`x=3`) are left to math-verify, which already treats `x=3` and `3` as equal.
    """
    s = _unwrap_text_commands(s.strip())
    for pattern, repl in _REWRITES:
        s = pattern.sub(repl, s)
    s = _TRAILING_PERIOD.sub("", s).strip()
    if "," in s and not _BRACKETS.search(s):
        ungrouped = _THOUSANDS.sub(lambda m: m.group().replace(",", ""), s)
        if "," not in ungrouped:  # a comma left over means the answer is a list
            s = ungrouped
    return _CHOICE_LETTER.sub(r"\1", s)


# ------------------------------------------------------------------------------------- integers

_INT = re.compile(r"([+-]?)(\d{1,3}(?:,\d{3})+|\d+)(?:\.0*)?")


def as_int(s: str | None) -> int | None:
    """Integer value of `42`, `042`, `+42`, `-7`, `42.0`, `42.`, `1,000`, `$42$`; else None.

    Purely syntactic (no `\\frac{4}{2}` evaluation); surrounding whitespace and `$` are ignored.
    """
    if s is None:
        return None
    t = s.replace("$", "").replace("\u2212", "-").strip()
    m = _INT.fullmatch(t)
    if m is None:
        return None
    return int(m.group(1) + m.group(2).replace(",", ""))


def apply_answer_mod(gold: str, mod: int | None) -> str:
    """`str(int(gold) % mod)` when `mod` is set and `gold` is an integer; `gold` unchanged otherwise."""
    if mod is None:
        return gold
    if isinstance(mod, bool) or not isinstance(mod, int) or mod <= 0:
        raise ValueError(f"answer mod must be a positive integer, got {mod!r}")
    value = as_int(gold)
    return gold if value is None else str(value % mod)


def is_aimo_integer(s: str | None) -> bool:
    """True for integers 0..999 (AIMO answer format); `042` and `42.0` are accepted."""
    value = as_int(s)
    return value is not None and 0 <= value <= 999


# ---------------------------------------------------------------------------------- equivalence

_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
_FRAC = re.compile(r"([+-]?)\\frac(?:\{\s*([+-]?\d+)\s*\}|(\d))(?:\{\s*([+-]?\d+)\s*\}|(\d))")
_SLASH = re.compile(r"([+-]?\d+)\s*/\s*([+-]?\d+)")
_ROUNDING_WINDOW = Fraction(1, 10**6)  # math-verify's default float_rounding=6


def _as_fraction(s: str) -> Fraction | None:
    """Exact value of a plain rational: `-3`, `0.25`, `\\frac{1}{2}`, `\\frac12`, `3/4`."""
    try:
        if _DECIMAL.fullmatch(s):
            return Fraction(s)
        m = _FRAC.fullmatch(s)
        if m:
            num, den = int(m.group(2) or m.group(3)), int(m.group(4) or m.group(5))
            value = Fraction(num, den)
            return -value if m.group(1) == "-" else value
        m = _SLASH.fullmatch(s)
        if m:
            return Fraction(int(m.group(1)), int(m.group(2)))
    except (ValueError, ZeroDivisionError):
        return None
    return None


class _Deadline(BaseException):
    """Raised by our SIGALRM handler; a BaseException so `except Exception` in sympy can't eat it."""


_GRACE_S = 0.5  # helper-process slack over the in-helper alarm before it is killed
_STARTUP_TIMEOUT_S = 120.0  # importing sympy + math-verify in a fresh helper
_MV_LOCK = threading.Lock()
_MV: dict = {}  # math-verify's parse/verify once loaded and warmed up


def _math_verify() -> dict:
    """Import and warm up math-verify once, outside any deadline.

    The first import (sympy) and first parse (grammar set-up) take a second or more; under an
    alarm they would eat the budget, and an import interrupted half-way leaves broken modules.
    Its one-off "timeout is disabled" warning is dropped: we enforce the deadline ourselves.
    """
    with _MV_LOCK:
        if not _MV:
            from math_verify import parse, verify

            class _DropTimeoutDisabled(logging.Filter):
                def filter(self, record: logging.LogRecord) -> bool:
                    return not str(record.msg).startswith("Timeout is disabled")

            for name in ("math_verify.parser", "math_verify.grader"):
                logging.getLogger(name).addFilter(_DropTimeoutDisabled())
            verify(parse("$x+1$", parsing_timeout=None), parse("$1+x$", parsing_timeout=None), timeout_seconds=None)
            _MV.update(parse=parse, verify=verify)
    return _MV


def _verify_unbounded(pred: str, gold: str) -> bool:
    """math-verify on two normalised answers, without any time limit of its own."""
    mv = _math_verify()
    gold_parsed = mv["parse"](f"${gold}$", parsing_timeout=None)
    pred_parsed = mv["parse"](f"${pred}$", parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(mv["verify"](gold_parsed, pred_parsed, timeout_seconds=None))


def _alarm_usable() -> bool:
    if threading.current_thread() is not threading.main_thread():
        return False
    # A handler someone else installed (or one set from C: None) is theirs; don't clobber it.
    free = signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.SIG_IGN)
    return free and signal.getitimer(signal.ITIMER_REAL)[0] == 0.0


def _verify_with_alarm(pred: str, gold: str, timeout: float) -> bool:
    """`_verify_unbounded` under a one-shot SIGALRM deadline (main thread only)."""
    armed = [True]

    def on_alarm(signum, frame):
        if armed[0]:
            armed[0] = False  # raise at most once, so the cleanup below cannot be interrupted
            raise _Deadline()

    _math_verify()  # loading is not part of the budget
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(timeout, 1e-3))
    try:
        try:
            result = _verify_unbounded(pred, gold)
        finally:
            armed[0] = False
    except _Deadline:
        result = False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        signal.signal(signal.SIGALRM, previous)
    return result


def _worker_loop() -> None:
    """Helper-process main: one JSON request per stdin line, one JSON bool per reply line."""
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
    _math_verify()  # pay the import before announcing readiness

    channel.write("ready\n")
    channel.flush()
    for line in sys.stdin:
        req = json.loads(line)
        ok = _verify_with_alarm(req["p"], req["g"], float(req["t"]))
        channel.write("true\n" if ok else "false\n")
        channel.flush()


class _VerifyWorker:
    """Owns the helper process; one request at a time (a lock serialises threads)."""

    def __init__(self, command: list[str] | None = None) -> None:
        self._command = command or [
            sys.executable, "-c", "from mathgrpo.answers import _worker_loop; _worker_loop()",
        ]
        self._forget()

    def _forget(self) -> None:
        """Drop the handle without killing: after fork() the helper belongs to the parent."""
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._buffer = b""

    def start(self) -> None:
        with self._lock:
            self._ensure_started()

    def _ensure_started(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self._proc = subprocess.Popen(self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._buffer = b""
        if self._read_line(_STARTUP_TIMEOUT_S) != "ready":
            self._kill()
            raise RuntimeError("mathgrpo.answers: the math-verify helper process failed to start")

    def _read_line(self, timeout: float) -> str | None:
        """One reply line, or None on deadline or EOF."""
        deadline = time.monotonic() + timeout
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc.stdin.close()
            self._proc.stdout.close()
            self._proc = None

    def verify(self, pred: str, gold: str, timeout: float) -> bool:
        with self._lock:
            self._ensure_started()
            request = json.dumps({"p": pred, "g": gold, "t": timeout}) + "\n"
            try:
                self._proc.stdin.write(request.encode())
                self._proc.stdin.flush()
            except BrokenPipeError:
                self._kill()
                return False
            reply = self._read_line(timeout + _GRACE_S)
            if reply is None:  # overran its own alarm (stuck in C) or died: start afresh next time
                self._kill()
                return False
            return reply == "true"

    def close(self) -> None:
        with self._lock:
            self._kill()


_WORKER = _VerifyWorker()
atexit.register(_WORKER.close)
os.register_at_fork(after_in_child=_WORKER._forget)


# A digit, an arithmetic operator, a digit: "11 - 3", "2^{10}", "3 \\times 4".
_UNEVALUATED = re.compile(r"\d\s*(?:[-+*/^×÷]|\\times|\\cdot|\\div)\s*\{?\s*\d")


@lru_cache(maxsize=1 << 16)
def _equivalent_normalized(pred: str, gold: str, timeout: float) -> bool:
    pi, gi = as_int(pred), as_int(gold)
    if pi is not None and gi is not None:
        return pi == gi
    if gi is not None and _UNEVALUATED.search(pred):
        # math-verify evaluates "11 - 3" to 8; an integer answer that is still the computation would let a
        # policy earn accuracy by boxing the question (seen in GRPO on arithmetic), so it does not count.
        return False
    pf, gf = _as_fraction(pred), _as_fraction(gold)
    if pf is not None and gf is not None:
        if pf == gf:
            return True
        # math-verify rounds to 6 decimals when a float is involved (0.333333 == 1/3), so only
        # a near miss with a decimal point needs it; anything else is a plain "no".
        if ("." not in pred and "." not in gold) or abs(pf - gf) >= _ROUNDING_WINDOW:
            return False
    if _alarm_usable():
        return _verify_with_alarm(pred, gold, timeout)
    return _WORKER.verify(pred, gold, timeout)


def is_equivalent(pred: str | None, gold: str | None, timeout: float = 2.0) -> bool:
    """Whether answer `pred` equals `gold` mathematically (both raw strings, e.g. box contents).

    None or empty -> False. Both are normalised; equal strings, equal integers or equal plain
    rationals decide at once, the rest goes to math-verify under a `timeout`-second deadline
    (timed out -> False). Results are cached on the normalised pair (groups repeat answers).
    Safe from any thread.
    """
    if pred is None or gold is None:
        return False
    p, g = normalize_answer(str(pred)), normalize_answer(str(gold))  # str(): tolerate int columns
    if not p or not g:
        return False
    if p == g:
        return True
    return _equivalent_normalized(p, g, float(timeout))


# ------------------------------------------------------------------------------ lenient judging (evaluation)

_NUMBER = r"[+-]?(?:\d+(?:\.\d+)?|\.\d+)"
_SCIENTIFIC = re.compile(rf"({_NUMBER})\s*(?:\\times|\\cdot|\*|×)\s*10\s*\^\s*\{{?\s*([+-]?\d{{1,3}})\s*\}}?")
_POWER_OF_TEN = re.compile(r"10\s*\^\s*\{?\s*([+-]?\d{1,3})\s*\}?")
_UNIT_WORD = r"[a-zA-Z]+\.?(?:\s*\^\s*\{?\s*[23]\s*\}?)?"
_WITH_UNIT = re.compile(rf"({_NUMBER})\s*{_UNIT_WORD}(?:\s*/\s*{_UNIT_WORD})?(?:\s+{_UNIT_WORD})*")


def _plain(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def lenient_value(answer: str | None) -> str | None:
    """The plain value of an answer written in a form a grader reads unambiguously, else the answer unchanged:
    the right-hand side of a final `=` (`3\\times4=12` -> `12`), a number followed by units (`8\\text{ cm}^2`,
    `5 m/s` -> the number), scientific notation and powers of ten (`1.5\\times10^3` -> `1500`, `10^3` -> `1000`).
    Arithmetic left undone (`11 - 3`, `3\\times 4`) stays as it is, so the strict guard still refuses it."""
    if answer is None:
        return None
    s = normalize_answer(str(answer))
    if "=" in s:
        s = s.rsplit("=", 1)[1].strip()
    if m := _WITH_UNIT.fullmatch(s):
        s = m.group(1)
    if m := _SCIENTIFIC.fullmatch(s):
        s = _plain(Fraction(m.group(1)) * Fraction(10) ** int(m.group(2)))
    elif m := _POWER_OF_TEN.fullmatch(s):
        s = _plain(Fraction(10) ** int(m.group(1)))
    return s


def is_equivalent_lenient(pred: str | None, gold: str | None, timeout: float = 2.0) -> bool:
    """`is_equivalent`, or the same on `lenient_value(pred)` when the gold has no `=` of its own: the judge of
    pass@k and maj@k (evaluate.py). Training rewards keep `is_equivalent`, whose guard refuses every unevaluated
    expression (a policy learns to box `2^{10}` or the question itself when that pays)."""
    if is_equivalent(pred, gold, timeout):
        return True
    if pred is None or gold is None or "=" in str(gold):
        return False
    value = lenient_value(pred)
    return value != normalize_answer(str(pred)) and is_equivalent(value, gold, timeout)
