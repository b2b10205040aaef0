"""The report's statistics against scipy.stats on fixed numbers, and Holm by hand."""

from __future__ import annotations

import math

import pytest
import scipy.stats

from deepopt.stats import (
    Interval,
    holm,
    mean_interval,
    one_sample,
    paired_difference,
    verdict,
    wilcoxon_p,
)

A = [0.8612, 0.8590, 0.8655, 0.8631]
B = [0.8571, 0.8580, 0.8602, 0.8577]


def test_mean_interval_equals_scipy_t_interval() -> None:
    interval = mean_interval(A)
    low, high = scipy.stats.t.interval(
        0.95, len(A) - 1, loc=sum(A) / len(A), scale=scipy.stats.sem(A)
    )
    assert interval.mean == pytest.approx(sum(A) / len(A))
    assert (interval.low, interval.high) == pytest.approx((low, high), rel=1e-12)
    assert (interval.n, interval.method) == (4, "t")


def test_single_replica_has_no_interval_and_formats_as_the_value() -> None:
    interval = mean_interval([0.8612])
    assert interval.n == 1 and math.isnan(interval.low) and math.isnan(interval.high)
    assert interval.format(4) == "0.8612"


def test_format_shows_mean_plus_minus_half_width() -> None:
    assert Interval(0.8612, 0.8581, 0.8643, 3).format(4) == "0.8612 ± 0.0031"


def test_identical_replicas_give_a_zero_width_interval() -> None:
    interval = mean_interval([0.5, 0.5, 0.5])
    assert (interval.low, interval.high) == (0.5, 0.5)


def test_no_replicas_give_nan() -> None:
    interval = mean_interval([])
    assert interval.n == 0 and math.isnan(interval.mean)


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_paired_p_equals_scipy_ttest_rel(alternative: str) -> None:
    result = paired_difference(A, B, alternative=alternative)  # type: ignore[arg-type]
    expected = scipy.stats.ttest_rel(A, B, alternative=alternative).pvalue
    assert result.p_value == pytest.approx(expected, rel=1e-12)
    assert result.difference == mean_interval([x - y for x, y in zip(A, B, strict=True)])
    assert result.n == 4


def test_margin_shifts_the_null_of_the_non_inferiority_test() -> None:
    # H0: mean(a - b) <= -0.005, i.e. the t test of (a - b + 0.005) > 0.
    result = paired_difference(B, A, alternative="greater", margin=0.005)
    differences = [y - x + 0.005 for x, y in zip(A, B, strict=True)]
    expected = scipy.stats.ttest_1samp(differences, 0.0, alternative="greater").pvalue
    assert result.p_value == pytest.approx(expected, rel=1e-12)
    # The interval stays the one of a - b itself.
    assert result.difference.mean == pytest.approx(sum(B) / 4 - sum(A) / 4)


def test_paired_of_one_replica_has_nan_p() -> None:
    assert math.isnan(paired_difference([0.9], [0.8]).p_value)


def test_paired_refuses_unequal_lengths() -> None:
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([0.9, 0.8], [0.8])


def test_one_sample_equals_scipy_ttest_1samp() -> None:
    values = [0.62, 0.58, 0.66]
    result = one_sample(values, 0.5, alternative="greater")
    expected = scipy.stats.ttest_1samp(values, 0.5, alternative="greater").pvalue
    assert result.p_value == pytest.approx(expected, rel=1e-12)
    assert result.difference.mean == pytest.approx(0.62 - 0.5)


def test_wilcoxon_p_equals_scipy() -> None:
    expected = scipy.stats.wilcoxon([x - y for x, y in zip(A, B, strict=True)]).pvalue
    assert wilcoxon_p(A, B) == pytest.approx(expected)
    assert math.isnan(wilcoxon_p([0.9], [0.8]))
    assert math.isnan(wilcoxon_p(A, A))


def test_holm_matches_a_hand_computed_example() -> None:
    # Sorted: 0.01 * 4 = 0.04, 0.02 * 3 = 0.06, 0.03 * 2 = 0.06 (monotone), 0.5 * 1 = 0.5.
    assert holm([0.03, 0.5, 0.01, 0.02]) == pytest.approx([0.06, 0.5, 0.04, 0.06])


def test_holm_caps_at_one_and_passes_nan_through_uncounted() -> None:
    adjusted = holm([0.4, math.nan, 0.3])
    assert adjusted[0] == pytest.approx(min(1.0, max(0.3 * 2, 0.4)))
    assert math.isnan(adjusted[1])
    assert adjusted[2] == pytest.approx(0.6)
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])


def _verdict(low: float, high: float, p: float, p_two: float, n: int = 3, **kw: float) -> str:
    interval = Interval((low + high) / 2, low, high, n)
    side = kw.pop("side", "greater")
    return verdict(interval, p_holm=p, p_two_sided_holm=p_two, side=side, **kw)  # type: ignore[arg-type]


def test_directional_claim_supported_only_with_significance_and_interval() -> None:
    assert _verdict(0.01, 0.03, 0.01, 0.02) == "supported"
    # Significant p but the interval reaches 0: never round up.
    assert _verdict(-0.001, 0.03, 0.01, 0.02) == "inconclusive at n = 3"
    # Interval clear of 0 but not significant after Holm.
    assert _verdict(0.01, 0.03, 0.06, 0.12) == "inconclusive at n = 3"


def test_directional_claim_contradicted_by_the_reverse_evidence() -> None:
    assert _verdict(-0.03, -0.01, 0.99, 0.02) == "contradicted"
    assert _verdict(-0.03, -0.01, 0.99, 0.2) == "inconclusive at n = 3"
    assert _verdict(0.01, 0.03, 0.01, 0.02, side="less") == "contradicted"


def test_non_inferiority_claim_against_its_margin() -> None:
    # a no worse than b by more than 0.005: the interval must clear -0.005.
    assert _verdict(-0.004, 0.002, 0.01, 0.5, margin=0.005) == "supported"
    assert _verdict(-0.006, 0.002, 0.01, 0.5, margin=0.005) == "inconclusive at n = 3"
    assert _verdict(-0.02, -0.01, 0.99, 0.01, margin=0.005) == "contradicted"


def test_single_replica_and_absent_claims() -> None:
    assert _verdict(math.nan, math.nan, math.nan, math.nan, n=1) == "inconclusive at n = 1"
    assert _verdict(math.nan, math.nan, math.nan, math.nan, n=0) == "not run"


def test_constant_differences_get_no_p_value() -> None:
    # scipy gives t = inf and p = 0 for [1, 1, 1] - [0, 0, 0]: three equal differences are
    # no evidence without a spread, so the claim stays inconclusive instead of "supported".
    assert scipy.stats.ttest_rel([1.0, 2.0, 3.0], [0.0, 1.0, 2.0]).pvalue == 0.0
    result = paired_difference([1.0, 2.0, 3.0], [0.0, 1.0, 2.0], alternative="greater")
    assert math.isnan(result.p_value)
    assert (result.difference.low, result.difference.high) == (1.0, 1.0)
    assert math.isnan(one_sample([0.7, 0.7, 0.7], 0.5, alternative="greater").p_value)
    # equal up to the last bit of a float subtraction (0.95 - 0.90 vs 0.90 - 0.85): no p either
    rounded = paired_difference([0.85, 0.90, 0.95], [0.80, 0.85, 0.90], alternative="greater")
    assert math.isnan(rounded.p_value)
    judged = verdict(result.difference, p_holm=math.nan, p_two_sided_holm=math.nan, side="greater")
    assert judged == "inconclusive at n = 3"
