"""The analysis of several task pairs and comparisons (issue 19), against independent references: an
ordinary least-squares fit with one mean per pair, a worked Holm example, and power by simulation."""
import math

import numpy as np
import pytest

from lrdist import stats


def test_blocked_difference_equals_least_squares_with_one_mean_per_pair():
    rng = np.random.default_rng(0)
    diffs = {"a": list(rng.normal(0.05, 0.1, 10)), "b": list(rng.normal(-0.02, 0.1, 10)),
             "c": list(rng.normal(0.2, 0.1, 7))}
    res = stats.blocked_difference(diffs)
    y = np.concatenate([diffs[b] for b in diffs])
    x = np.zeros((len(y), 3))
    row = 0
    for j, b in enumerate(diffs):
        x[row:row + len(diffs[b]), j] = 1
        row += len(diffs[b])
    coef, rss, *_ = np.linalg.lstsq(x, y, rcond=None)
    sizes = np.array([len(diffs[b]) for b in diffs])
    sigma2 = rss[0] / (len(y) - 3)
    assert res.mean == pytest.approx(float(sizes @ coef / sizes.sum()))  # every unit weighs the same
    assert res.se == pytest.approx(math.sqrt(sigma2 / len(y)))
    assert (res.df, res.n) == (24, 27)
    assert res.per_block["c"] == (pytest.approx(coef[2]), 7)
    low, high = res.interval(0.95)
    from scipy import stats as sps
    assert high - res.mean == pytest.approx(sps.t.ppf(0.975, 24) * res.se)
    assert res.p_value == pytest.approx(2 * sps.t.sf(res.mean / res.se, 24))
    # one block: the ordinary paired t-interval
    one = stats.blocked_difference({"a": diffs["a"]})
    plain = stats.paired_difference(diffs["a"], [0.0] * 10)
    assert one.interval() == (pytest.approx(plain.low), pytest.approx(plain.high))
    with pytest.raises(ValueError, match="more units"):
        stats.blocked_difference({"a": [0.1], "b": [0.2]})


def test_holm_on_a_worked_example():
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> kept monotone at 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert stats.bonferroni_level(0.95, 10) == pytest.approx(0.995)


def test_detectable_difference_has_the_power_it_claims():
    """Simulated t-tests on 30 paired units with the true difference set to the detectable one reject
    'no difference' about 80 % of the time."""
    n, sd = 30, 0.1
    se = sd / math.sqrt(n)
    d = stats.detectable_difference(se, n - 1)
    assert d == pytest.approx((2.045 + 0.854) * se, rel=0.02)  # the usual approximation
    rng = np.random.default_rng(1)
    samples = rng.normal(d, sd, (20000, n))
    t = samples.mean(1) / (samples.std(1, ddof=1) / math.sqrt(n))
    from scipy import stats as sps
    assert np.mean(np.abs(t) > sps.t.ppf(0.975, n - 1)) == pytest.approx(0.8, abs=0.012)
