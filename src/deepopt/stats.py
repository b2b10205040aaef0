"""Statistics over seed replicas, for the reports' tables and the MLflow parent runs:
Student-t intervals of a mean, paired and one-sample t tests, Holm's correction across a
table of claims, and the verdict a claim gets from them. Pure functions on sequences of
floats, computed by scipy (`scipy.stats` for the tests, `scipy.special`'s t quantile for
the interval).

Replica r of every experiment trains with seed + r (same data order and, where the
architectures match, the same initial weights), so two experiments compare pairwise by
replica index: the paired test removes the seed's share of the variance.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.special

# scipy.stats is imported inside the test functions below, not here: it takes ~1 s to
# import, and the train and evaluate stages need only the interval (their MLflow parent
# runs' metrics), which scipy.special gives in ~0.3 s.

__all__ = [
    "ALPHA",
    "Alternative",
    "Interval",
    "PairedResult",
    "Verdict",
    "format_p",
    "holm",
    "interval_metrics",
    "mean_interval",
    "one_sample",
    "paired_difference",
    "verdict",
    "wilcoxon_p",
]

ALPHA = 0.05  # the significance level of every verdict, after Holm's correction
Alternative = Literal["two-sided", "greater", "less"]
Verdict = str  # "supported", "contradicted", "inconclusive at n = N" or "not run"


@dataclass(frozen=True)
class Interval:
    """A confidence interval of a mean over n replicas; low = high = nan when n < 2."""

    mean: float
    low: float
    high: float
    n: int
    method: str = "t"

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def format(self, digits: int = 4, *, signed: bool = False) -> str:
        """Mean ± half-width, "0.8612 ± 0.0031", or the mean alone without an interval;
        ``signed`` for a difference: "+0.0120 ± 0.0031"."""
        sign = "+" if signed else ""
        if math.isnan(self.half_width):
            return f"{self.mean:{sign}.{digits}f}"
        return f"{self.mean:{sign}.{digits}f} ± {self.half_width:.{digits}f}"


def format_p(p: float, missing: str = "—") -> str:
    """A p-value as the reports print it: 0.042, "< 0.001", or ``missing`` when there is none."""
    if math.isnan(p):
        return missing
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


@dataclass(frozen=True)
class PairedResult:
    """A test of mean(a - b) (or mean(values - reference)): its interval and p-value."""

    n: int
    difference: Interval
    p_value: float
    test: str


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The Student-t confidence interval of the mean of `values` (n - 1 degrees of freedom)."""
    data = np.asarray(values, dtype=float)
    n = int(data.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(data.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    sem = float(data.std(ddof=1)) / math.sqrt(n)
    if sem == 0.0:  # identical replicas: a zero-width interval
        return Interval(mean, mean, mean, n)
    # scipy.stats.t.interval's bounds: the t quantile of (1 + confidence) / 2, n - 1 dof.
    half_width = float(scipy.special.stdtrit(n - 1, (1.0 + confidence) / 2)) * sem
    return Interval(mean, mean - half_width, mean + half_width, n)


def interval_metrics(values: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Metrics of an experiment's MLflow parent run from each replica's value: ``key`` the
    mean, ``key_ci95_low``/``key_ci95_high`` its 95 % t interval (only with two or more
    replicas), and ``n_seeds``."""
    metrics: dict[str, float] = {}
    for key, series in values.items():
        interval = mean_interval(series)
        metrics[key] = interval.mean
        if interval.n > 1:
            metrics[f"{key}_ci95_low"] = interval.low
            metrics[f"{key}_ci95_high"] = interval.high
        metrics["n_seeds"] = interval.n
    return metrics


def _paired_arrays(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, but got {len(a)=} and {len(b)=}")
    return np.asarray(a, dtype=float), np.asarray(b, dtype=float)


def _varies(differences: np.ndarray) -> bool:
    """Whether a t test is defined: with n >= 2 differences that are not all equal. Constant
    differences have no variance, and scipy's t is then +-inf with p = 0 (or nan at zero):
    n equal values are no evidence of a population without spread, so deepopt gives no p."""
    # Relative: accuracies are floats, and 0.95 - 0.90 != 0.90 - 0.85 in the last bit, where
    # scipy's t would be ~1e15 and p ~1e-31.
    scale = max(1.0, float(np.abs(differences).max())) if differences.size else 1.0
    return differences.size >= 2 and bool(np.ptp(differences) > 1e-9 * scale)


def _margin_note(margin: float) -> str:
    return f", margin {margin:g}" if margin else ""


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    *,
    alternative: Alternative = "two-sided",
    margin: float = 0.0,
    confidence: float = 0.95,
) -> PairedResult:
    """The paired t test of a - b (a[i] and b[i] from the same replica).

    `margin` moves the null hypothesis to mean(a - b) = -margin: with alternative "greater"
    it is the non-inferiority test "a is no worse than b by more than margin"
    (H0: mean(a - b) <= -margin). The interval is of a - b itself, unshifted. p is nan
    with fewer than two pairs or when every difference is the same (see ``_varies``).
    """
    import scipy.stats  # lazy (see the top)

    first, second = _paired_arrays(a, b)
    n = int(first.size)
    difference = mean_interval((first - second).tolist(), confidence)
    p_value = math.nan
    if _varies(first - second):
        with warnings.catch_warnings():  # nearly equal values: scipy warns of precision loss
            warnings.simplefilter("ignore", RuntimeWarning)
            result = scipy.stats.ttest_rel(first + margin, second, alternative=alternative)
        p_value = float(result.pvalue)
    return PairedResult(n, difference, p_value, f"paired t ({alternative}{_margin_note(margin)})")


def one_sample(
    values: Sequence[float],
    reference: float,
    *,
    alternative: Alternative = "two-sided",
    margin: float = 0.0,
    confidence: float = 0.95,
) -> PairedResult:
    """The one-sample t test of mean(values) against `reference` (margin as in
    `paired_difference`); the interval is of values - reference."""
    import scipy.stats  # lazy (see the top)

    data = np.asarray(values, dtype=float)
    n = int(data.size)
    difference = mean_interval((data - reference).tolist(), confidence)
    p_value = math.nan
    if _varies(data):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            result = scipy.stats.ttest_1samp(data + margin, reference, alternative=alternative)
        p_value = float(result.pvalue)
    return PairedResult(
        n, difference, p_value, f"one-sample t ({alternative}{_margin_note(margin)})"
    )


def wilcoxon_p(
    a: Sequence[float],
    b: Sequence[float],
    *,
    alternative: Alternative = "two-sided",
    margin: float = 0.0,
) -> float:
    """The Wilcoxon signed-rank p-value of a - b (+ margin); nan when n < 2 or all the
    differences are zero (constant non-zero ones are fine for a test of signs and ranks).
    Its exact two-sided p is never below 2 / 2**n (0.25 at n = 3)."""
    import scipy.stats  # lazy (see the top)

    first, second = _paired_arrays(a, b)
    differences = first - second + margin
    if differences.size < 2 or not np.any(differences):
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = scipy.stats.wilcoxon(differences, alternative=alternative)
    return float(result.pvalue)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input's order.

    Step-down: the k-th smallest of m p-values is multiplied by m - k + 1, made monotone
    (never below the adjusted value before it) and capped at 1. A nan (a claim not run)
    stays nan and does not count in m.
    """
    ranked = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    m = len(ranked)
    running = 0.0
    for k, (p, i) in enumerate(ranked):
        running = max(running, min(1.0, (m - k) * p))
        adjusted[i] = running
    return adjusted


def verdict(
    difference: Interval,
    *,
    p_holm: float,
    p_two_sided_holm: float,
    side: Literal["greater", "less"],
    margin: float = 0.0,
    alpha: float = ALPHA,
) -> Verdict:
    """The verdict on the claim "mean difference > -margin" (side "greater") or
    "< -margin" (side "less"); margin 0 is a directional claim ("a > b"), margin > 0 with
    side "greater" a no-worse-than claim.

    Supported: the one-sided test of the claimed side rejects after Holm (`p_holm`) and
    the whole 95 % interval lies on the claimed side of -margin. Contradicted: the
    two-sided test at -margin rejects after Holm and the whole interval lies on the other
    side. Anything else, overlapping or too few replicas, is inconclusive.
    """
    n = difference.n
    if n == 0:
        return "not run"
    boundary = -margin
    if n >= 2 and not math.isnan(difference.half_width):
        claimed = difference.low > boundary if side == "greater" else difference.high < boundary
        against = difference.high < boundary if side == "greater" else difference.low > boundary
        if claimed and p_holm < alpha:
            return "supported"
        if against and p_two_sided_holm < alpha:
            return "contradicted"
    return f"inconclusive at n = {n}"
