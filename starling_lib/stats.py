"""The uncertainty behind every comparison the notebooks print: one home for intervals and verdicts.

Each notebook's closing cell prints readings of the form "A is larger than B: yes/no (a vs b)";
the functions here give those readings their uncertainty, so that every notebook says
"indistinguishable" by the same rule:

    t_interval(x)              mean of independent values with sd, se = sd / sqrt(n) and the
                               two-sided Student-t interval mean -+ t(0.975, n - 1) se
                               (seeds of a sweep, prompts of a run)
    paired_interval(a, b)      the same for the differences a_i - b_i of paired values (the same
                               prompts under two judges, two policies, two reward models)
    wilson_interval(k, n)      a share k / n with its Wilson score interval (better than the
                               normal one at small n and near 0 or 1)
    percentile_interval(reps)  the percentile interval of bootstrap replicates
    normal_interval(m, se)     m -+ 1.96 se, for an estimate with a standard error over many items
    verdict(low, high)         "above" / "below" the reference when the interval excludes it,
                               else "indistinguishable"

The intervals are 95% by default (`CONFIDENCE`); they are for the variation that the run's own
sampling causes (which prompts, which seeds), not for choices the run holds fixed.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

CONFIDENCE = 0.95


def _finite(values: Iterable[float | None]) -> np.ndarray:
    return np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)


def t_interval(values: Iterable[float | None], confidence: float = CONFIDENCE) -> dict[str, float]:
    """n, mean, sd (n - 1 in the denominator), se = sd / sqrt(n) and the two-sided t-interval
    mean -+ t(1 - (1 - confidence) / 2, n - 1) * se (scipy.stats.t) of the finite values given,
    as keys n, mean, sd, se, ci95_low, ci95_high (the names keep "95" at any `confidence`).
    Fewer than two values: sd, se and the interval are NaN (and everything is NaN for none)."""
    from scipy import stats

    x = _finite(values)
    n = len(x)
    out = {"n": n, "mean": float(x.mean()) if n else math.nan, "sd": math.nan, "se": math.nan,
           "ci95_low": math.nan, "ci95_high": math.nan}
    if n >= 2:
        sd = float(x.std(ddof=1))
        se = sd / math.sqrt(n)
        half = float(stats.t.ppf(1 - (1 - confidence) / 2, n - 1)) * se
        out.update(sd=sd, se=se, ci95_low=out["mean"] - half, ci95_high=out["mean"] + half)
    return out


def paired_interval(a: Sequence[float | None], b: Sequence[float | None],
                    confidence: float = CONFIDENCE) -> dict[str, float]:
    """`t_interval` of the differences a_i - b_i over the pairs where both are finite (the
    others are left out and counted in `n` only by their absence). a and b: the same items in
    the same order, e.g. per-prompt scores of two methods."""
    if len(a) != len(b):
        raise ValueError(f"paired_interval needs values of the same items: {len(a)} vs {len(b)}")
    diffs = [x - y for x, y in zip(a, b)
             if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    return t_interval(diffs, confidence)


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a share successes / n: (low, high), both in [0, 1].

    With z the normal quantile, p = k / n: (p + z^2 / 2n -+ z sqrt(p (1 - p) / n + z^2 / 4n^2)) /
    (1 + z^2 / n). NaN for n = 0."""
    from scipy import stats

    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return math.nan, math.nan
    z = float(stats.norm.ppf(1 - (1 - confidence) / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def percentile_interval(replicates: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The (1 - confidence) / 2 and 1 - (1 - confidence) / 2 quantiles of bootstrap replicates."""
    reps = _finite(replicates)
    if len(reps) == 0:
        return math.nan, math.nan
    tail = (1 - confidence) / 2
    return float(np.quantile(reps, tail)), float(np.quantile(reps, 1 - tail))


def normal_interval(mean: float, se: float, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """mean -+ z se, z the normal quantile (1.96 at 95%): the interval of an estimate whose
    standard error comes from many independent items (prompts, pairs, questions)."""
    from scipy import stats

    z = float(stats.norm.ppf(1 - (1 - confidence) / 2))
    return mean - z * se, mean + z * se


def verdict(low: float, high: float, reference: float = 0.0) -> str:
    """"above" when the whole interval [low, high] lies above `reference`, "below" when below,
    "indistinguishable" when it contains the reference or is undefined (NaN)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "indistinguishable"
    if low > reference:
        return "above"
    if high < reference:
        return "below"
    return "indistinguishable"


def format_interval(low: float, high: float, digits: int = 2) -> str:
    """'[low, high]' to `digits` decimals, the form every reading prints its interval in."""
    return f"[{low:.{digits}f}, {high:.{digits}f}]"
