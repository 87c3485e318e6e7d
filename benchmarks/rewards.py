"""Benchmark: score 10,000 synthetic ~2,000-char completions with every built-in reward.

Run: `PYTHONPATH=src python -m benchmarks.rewards [--n 10000] [--group 8] [--seed 0]`. Prints seconds per
reward and for the whole `RewardSet.score` call, on one core (set OMP/MKL threads as you like;
the rewards are pure Python + rapidfuzz and use one core anyway).

Completions look like R1-style outputs: `<think>` reasoning of filler math prose, `</think>`, a
short write-up and (mostly) a `\\boxed{}` answer. Gold answers mix integers (GSM8K-like),
fractions/decimals, and symbolic answers (`\\frac{\\sqrt{3}}{2}`, `3\\pi`) that only
math-verify can decide; predictions are right, right in another form, or wrong.
"""

from __future__ import annotations

import argparse
import random
import time

from mathgrpo import answers
from mathgrpo.rewards import REWARDS
from mathgrpo.scoring import RewardSet

WORDS = (
    "we compute the sum of terms so that x equals twice y plus three then substitute into the "
    "equation and simplify both sides carefully noting that the product is positive hence"
).split()


def _prose(rng: random.Random, n_chars: int) -> str:
    out, size = [], 0
    while size < n_chars:
        if rng.random() < 0.15:
            piece = f"${rng.randint(2, 99)} \\times {rng.randint(2, 99)} = {rng.randint(4, 9801)}$"
        else:
            piece = rng.choice(WORDS)
        out.append(piece)
        size += len(piece) + 1
    return " ".join(out)


def _gold_and_preds(rng: random.Random, kind: str) -> tuple[str, list[str]]:
    """A gold answer and candidate predictions (right, re-written right, wrong) for it."""
    if kind == "int":
        g = rng.randint(0, 5000)
        return str(g), [str(g), f"{g}.0", str(g + rng.randint(1, 9)), str(rng.randint(0, 5000))]
    if kind == "frac":
        a, b = rng.randint(1, 20), rng.randint(21, 40)
        gold = f"\\frac{{{a}}}{{{b}}}"
        return gold, [gold, f"\\dfrac{{{2 * a}}}{{{2 * b}}}", f"{a}/{b}", f"\\frac{{{a + 1}}}{{{b}}}"]
    k = rng.randint(2, 9)
    return f"{k}\\sqrt{{3}}", [f"{k}\\sqrt{{3}}", f"\\sqrt{{{3 * k * k}}}", f"{k + 1}\\sqrt{{3}}", f"{k}\\sqrt{{2}}"]


def make_batch(n: int, group: int, seed: int) -> dict:
    rng = random.Random(seed)
    completions, golds, solutions, problems, ids = [], [], [], [], []
    for p in range(0, n, group):
        kind = rng.choices(["int", "frac", "sym"], weights=[6, 3, 1])[0]
        gold, preds = _gold_and_preds(rng, kind)
        problem = f"Problem {p // group}: " + _prose(rng, 200)
        solution = _prose(rng, 480) + f" so the answer is $\\boxed{{{gold}}}$."
        for _ in range(min(group, n - p)):
            think = _prose(rng, rng.randint(1400, 2000))
            tail = _prose(rng, rng.randint(150, 300))
            r = rng.random()
            if r < 0.75:
                tail += f" Therefore the answer is $\\boxed{{{rng.choice(preds)}}}$."
            elif r < 0.85:
                tail += f" So the answer is {rng.choice(preds)}."  # no box
            text = f"{think}\n</think>\n{tail}"
            if rng.random() < 0.05:
                text = text[: rng.randint(500, len(text))]  # truncated mid-way
            completions.append(text)
            golds.append(gold)
            solutions.append(solution)
            problems.append(problem)
            ids.append([0] * (len(text) // 4))
    n = len(completions)
    return dict(
        completions=completions, gold=golds, solution=solutions, problem=problems,
        prompts=problems, prefill=["<think>\n"] * n, truncated=[False] * n, completion_ids=ids,
    )


def _clear_caches() -> None:
    """Forget every memo (ours and math-verify's parse caches): each timing starts cold."""
    from math_verify import parser

    answers.clear_caches()
    parser.parse_latex_cached.cache_clear()
    parser.parse_expr_cached.cache_clear()


def _best_of(repeat: int, fn) -> tuple[float, float]:
    """(best, median) seconds of `repeat` cold runs; best is the least disturbed by other load."""
    times = []
    for _ in range(repeat):
        _clear_caches()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[0], times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="cold runs per timing (best and median shown)")
    args = ap.parse_args()

    batch = make_batch(args.n, args.group, args.seed)
    completions = batch.pop("completions")
    mean_len = sum(map(len, completions)) / len(completions)
    print(f"{len(completions)} completions, mean {mean_len:.0f} chars, group size {args.group}")

    answers.is_equivalent("\\sqrt{2}", "2")  # import sympy/math-verify outside the timings

    names = sorted(REWARDS)
    rs = RewardSet([(name, 1.0) for name in names])
    _clear_caches()
    per_reward, total = rs.score(completions, **batch)
    pairs = answers.checked_pairs()
    for j, name in enumerate(names):
        print(f"  mean {name:<10} {per_reward[:, j].mean():+.3f}")
    print(f"{pairs} distinct answer pairs needed more than a string compare")

    print(f"seconds, cold caches, best / median of {args.repeat}:")
    for name in names:
        best, med = _best_of(args.repeat, lambda: REWARDS[name](completions, **batch))
        print(f"  {name:<12} {best:6.2f} / {med:6.2f}")
    best, med = _best_of(args.repeat, lambda: rs.score(completions, **batch))
    print(f"  {'ALL (RewardSet.score)':<12} {best:6.2f} / {med:6.2f}")


if __name__ == "__main__":
    main()
