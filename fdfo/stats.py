"""Confidence intervals and the paired comparison of metrics.py (docs/algorithm.md §8).

The unit of sampling is the prompt. With R repeats per prompt, the R images of a prompt share the prompt, so their
scores are correlated and treating the N * R images as independent samples would make the interval too narrow.
Every metric is therefore first averaged over the repeats of each prompt (dreamsim_diversity is already one number
per prompt), and the interval is Student's t-interval over the N per-prompt values:

    mean ± t_{0.975, N-1} · s / sqrt(N),   s the sample standard deviation (ddof = 1).

With equal repeats per prompt the mean of the per-prompt means is the mean over all images, the published number. The
interval describes the uncertainty from the choice of prompts and seeds (a new draw of N prompts from the same set and
new seeds), not from the scorer.

Paired comparison (`metrics.py --compare`): both checkpoints are scored on the same prompts and seeds, so the
per-prompt differences d_j = a_j - b_j are the sample. Reported: mean(d), its t-interval as above, and the two-sided
p-value of the paired t-test over prompts, `scipy.stats.ttest_rel(a, b)` (the same as a one-sample t-test of d).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as scipy_stats

LEVEL = 0.95
PAIRED_TEST = "paired t-test over prompts (scipy.stats.ttest_rel, two-sided)"


def _finite(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None  # JSON has no NaN


def per_prompt(values: np.ndarray) -> np.ndarray:
    """`[N]` per-prompt values, or `[N, R]` scores of R repeats -> `[N]` means over the repeats (float64)."""
    values = np.asarray(values, dtype=np.float64)
    return values.mean(axis=1) if values.ndim == 2 else values


def t_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float | None, float | None]:
    """Student's t-interval for the mean of independent `values`; (None, None) with fewer than 2 values or a
    non-finite value."""
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    if n < 2 or not np.isfinite(values).all():
        return None, None
    mean = values.mean()
    half = scipy_stats.t.ppf(0.5 + level / 2, df=n - 1) * values.std(ddof=1) / math.sqrt(n)
    return _finite(mean - half), _finite(mean + half)


def summary(values: np.ndarray) -> dict:
    """Mean, 95 % t-interval over prompts and the number of prompts of `[N]` or `[N, R]` values, and how many of the
    values are NaN or infinite (`n_nonfinite`: one makes the mean and the interval undefined)."""
    values = np.asarray(values, dtype=np.float64)
    prompts = per_prompt(values)
    low, high = t_interval(prompts)
    return {"mean": _finite(values.mean()), "ci95": [low, high], "n": int(prompts.size),
            "n_images": int(values.size), "std": _finite(values.std()),
            "n_nonfinite": int((~np.isfinite(values)).sum())}


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """A - B on the same prompts: mean difference, its 95 % t-interval and the paired t-test's p-value."""
    a, b = per_prompt(a), per_prompt(b)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same prompts on both sides, got {a.shape} and {b.shape}")
    d = a - b
    low, high = t_interval(d)
    p_value = None
    if d.size >= 2 and np.isfinite(d).all() and np.ptp(d) > 0:  # equal differences: no spread, the test is undefined
        p_value = _finite(scipy_stats.ttest_rel(a, b).pvalue)
    return {"mean_difference": _finite(d.mean()), "ci95": [low, high], "p_value": p_value, "n": int(d.size)}
