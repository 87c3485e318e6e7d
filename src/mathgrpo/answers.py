"""Final-answer handling: `\\boxed{}` extraction, normalisation and equivalence.

Pure functions (no torch) used by the reward functions, the data loader (gold extraction) and the
evaluator. Nothing to run on its own; `pytest tests/test_answers.py` exercises it.

Equivalence runs in tiers, cheapest first: exact string after `normalize_answer`, then an
integer fast path, then a plain-rational fast path (`0.5` == `\\frac12`), and only then
math-verify (sympy). Math-verify can take unbounded time on adversarial input (`9^{9^{9^9}}`),
so it always runs under a deadline (timed_verify.py: an in-process alarm on the main thread, else a helper
process). A timed-out comparison counts as "not equivalent". POSIX only (signals, select on pipes).
"""

from __future__ import annotations

import re
from fractions import Fraction
from functools import lru_cache

from .timed_verify import verify_within

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
    return verify_within(pred, gold, timeout)


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


def clear_caches() -> None:
    """Forget the memoised normalisations and equivalence checks (benchmarks.rewards times cold runs)."""
    _equivalent_normalized.cache_clear()
    normalize_answer.cache_clear()


def checked_pairs() -> int:
    """Distinct (prediction, gold) pairs in the equivalence cache: those that needed more than a string compare."""
    return _equivalent_normalized.cache_info().currsize
