"""The shared statistics (starling_lib/stats.py) against values worked out by hand or from tables."""

import math

import pytest

from starling_lib.stats import (format_interval, normal_interval, paired_interval, percentile_interval,
                                t_interval, verdict, wilson_interval)

# Student's t, two-sided 95% (the 0.975 quantile), from a printed table.
T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824}


def test_t_interval_by_hand():
    # 1, 2, 3, 4: mean 2.5, sd = sqrt(5/3), se = sd / 2, half-width t(0.975, 3) * se
    out = t_interval([1, 2, 3, 4])
    sd = math.sqrt(5 / 3)
    assert out["n"] == 4 and out["mean"] == pytest.approx(2.5)
    assert out["sd"] == pytest.approx(sd) and out["se"] == pytest.approx(sd / 2)
    assert out["ci95_low"] == pytest.approx(2.5 - T975[3] * sd / 2, abs=1e-4)
    assert out["ci95_high"] == pytest.approx(2.5 + T975[3] * sd / 2, abs=1e-4)
    one = t_interval([7.0, float("nan")])  # NaN is not a value; one value has no spread
    assert one["n"] == 1 and one["mean"] == 7.0 and math.isnan(one["sd"]) and math.isnan(one["ci95_low"])
    assert t_interval([])["n"] == 0 and math.isnan(t_interval([])["mean"])


def test_paired_interval_is_the_interval_of_the_differences():
    # differences 1, 2, 3 (the NaN pair is left out): mean 2, sd 1, se 1/sqrt(3), t(0.975, 2) = 4.3027
    out = paired_interval([2.0, 4.0, 6.0, float("nan")], [1.0, 2.0, 3.0, 5.0])
    assert out["n"] == 3 and out["mean"] == pytest.approx(2.0) and out["sd"] == pytest.approx(1.0)
    assert out["ci95_low"] == pytest.approx(2 - T975[2] / math.sqrt(3), abs=1e-4)
    with pytest.raises(ValueError, match="same items: 2 vs 1"):
        paired_interval([1.0, 2.0], [1.0])


def test_wilson_interval_by_hand():
    # k = 8 of n = 10 at z = 1.959964: centre (0.8 + z^2/20) / (1 + z^2/10), half-width
    # z sqrt(0.8 * 0.2 / 10 + z^2 / 400) / (1 + z^2/10): the interval is [0.4902, 0.9433].
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    with pytest.raises(ValueError, match="11 of 10"):
        wilson_interval(11, 10)


def test_percentile_and_normal_intervals():
    low, high = percentile_interval(list(range(101)))  # 0..100: the 2.5% and 97.5% quantiles
    assert (low, high) == (pytest.approx(2.5), pytest.approx(97.5))
    low, high = normal_interval(1.0, 0.5)
    assert low == pytest.approx(1 - 0.98, abs=1e-3) and high == pytest.approx(1 + 0.98, abs=1e-3)


def test_verdict_says_indistinguishable_when_the_interval_holds_the_reference():
    assert verdict(0.1, 0.3) == "above"
    assert verdict(-0.3, -0.1) == "below"
    assert verdict(-0.1, 0.3) == "indistinguishable"
    assert verdict(0.6, 0.8, reference=0.5) == "above"
    assert verdict(math.nan, math.nan) == "indistinguishable"
    assert format_interval(0.12345, 0.5) == "[0.12, 0.50]"
