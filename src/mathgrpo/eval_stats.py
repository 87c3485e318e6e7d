"""The pure statistics of evaluation: unbiased pass@k, the majority vote up to answer equivalence (maj@k), and
the percentile bootstrap CI of a paired per-problem difference. Numbers in, numbers out; evaluate.py applies
them to sampled completions. Checked against reference implementations in tests/test_evaluate.py.
"""

from __future__ import annotations

import math

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c,k)/C(n,k),
    as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass_at_k: k={k} exceeds the number of samples n={n}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_vote(answers: list[str | None]) -> str | None:
    """The most frequent answer up to equivalence (`1/2`, `0.5`, `\\frac12` form one class).

    Each answer joins the first class whose representative (its first member) it equals; None answers
    never vote. Ties go to the class seen first, so the result does not depend on set ordering.
    """
    from .answers import is_equivalent, normalize_answer

    reps: list[str] = []
    keys: list[str] = []
    counts: list[int] = []
    for a in answers:
        if a is None:
            continue
        key = normalize_answer(a)
        for i, rep in enumerate(reps):
            if key == keys[i] or is_equivalent(a, rep):
                counts[i] += 1
                break
        else:
            reps.append(a)
            keys.append(key)
            counts.append(1)
    if not reps:
        return None
    return reps[int(np.argmax(counts))]  # argmax returns the first maximum


def bootstrap_ci(per_problem_diff: np.ndarray, n_boot: int, seed: int, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean, resampling problems with replacement (NaNs dropped)."""
    x = np.asarray(per_problem_diff, dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // x.size)  # bounds the [chunk, P] index matrix
    for s in range(0, n_boot, chunk):
        idx = rng.integers(0, x.size, size=(min(chunk, n_boot - s), x.size))  # [B, P]
        means[s:s + idx.shape[0]] = x[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)
