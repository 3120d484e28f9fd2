"""fdfo/stats.py against hand computations: the t-interval over prompts (repeats averaged first) and the paired
comparison's mean difference, interval and p-value (Student's t quantiles from tables, the t distribution's closed
form for 4 degrees of freedom)."""

import math

import numpy as np
import pytest

from fdfo import stats

T975 = {2: 4.302652729749462, 3: 3.182446305284263, 4: 2.776445105197793}  # t_{0.975, df}, from tables


def t4_two_sided_p(t: float) -> float:
    """Two-sided p-value of Student's t with 4 degrees of freedom, closed form:
    F(t) = 1/2 + 3/4 u (1 - u^2 / 3) with u = t / sqrt(4 + t^2)."""
    u = abs(t) / math.sqrt(4 + t * t)
    cdf = 0.5 + 0.75 * u * (1 - u * u / 3)
    return 2 * (1 - cdf)


def test_t_interval_on_hand_values():
    # 1, 2, 3, 4: mean 2.5, s^2 = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3, half-width t_{.975,3} * s / 2
    half = T975[3] * math.sqrt(5 / 3) / 2
    assert stats.t_interval(np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx((2.5 - half, 2.5 + half), rel=1e-12)
    assert stats.t_interval(np.array([3.0])) == (None, None)  # one prompt: no interval
    assert stats.t_interval(np.array([1.0, np.nan])) == (None, None)


def test_summary_averages_the_repeats_of_a_prompt_first():
    scores = np.array([[1.0, 3.0], [2.0, 2.0], [5.0, 7.0]])  # 3 prompts x 2 repeats -> per prompt 2, 2, 6
    out = stats.summary(scores)
    s = math.sqrt(((2 - 10 / 3) ** 2 * 2 + (6 - 10 / 3) ** 2) / 2)
    half = T975[2] * s / math.sqrt(3)
    assert out["mean"] == pytest.approx(20 / 6) and (out["n"], out["n_images"]) == (3, 6)
    assert out["ci95"] == pytest.approx([10 / 3 - half, 10 / 3 + half], rel=1e-12)
    # the (wrong) interval over the 6 images as if independent is narrower: the two differ
    naive = stats.t_interval(scores.flatten())
    assert naive[1] - naive[0] < out["ci95"][1] - out["ci95"][0]


def test_paired_difference_interval_and_p_value():
    a = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    b = np.array([1.5, 1.5, 2.0, 5.0, 3.0])  # d = -0.5, 0.5, 1, -1, 2: mean 0.4
    d = a - b
    s = math.sqrt(sum((x - 0.4) ** 2 for x in d) / 4)  # deviations -0.9, 0.1, 0.6, -1.4, 1.6: sqrt(5.7 / 4)
    assert s == pytest.approx(math.sqrt(5.7 / 4))
    half = T975[4] * s / math.sqrt(5)
    t = 0.4 / (s / math.sqrt(5))
    out = stats.paired(a, b)
    assert out["mean_difference"] == pytest.approx(0.4)
    assert out["ci95"] == pytest.approx([0.4 - half, 0.4 + half], rel=1e-12)
    assert out["p_value"] == pytest.approx(t4_two_sided_p(t), rel=1e-10) and out["n"] == 5
    assert 0.4 < out["p_value"] < 0.6  # t = 0.749: far from significant
    # repeats: pairs are formed per prompt after averaging the repeats
    out2 = stats.paired(np.stack([a - 1, a + 1], 1), np.stack([b, b], 1))
    assert out2["mean_difference"] == pytest.approx(0.4) and out2["p_value"] == pytest.approx(out["p_value"])
    # a constant difference has no spread: interval of zero width, no p-value (NaN from scipy -> None)
    same = stats.paired(a + 1, a)
    assert same["ci95"] == pytest.approx([1.0, 1.0]) and same["p_value"] is None
    with pytest.raises(ValueError, match="same prompts"):
        stats.paired(a, b[:4])


def test_closed_form_p_value_helper():
    assert t4_two_sided_p(0.0) == pytest.approx(1.0)
    assert t4_two_sided_p(T975[4]) == pytest.approx(0.05, rel=1e-9)  # the table quantile gives p = 0.05
