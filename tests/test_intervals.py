"""tools/intervals.py: what a few seeds carry. Its t quantiles are Student's (the oracle: the t distribution's CDF
integrated in float64 from its density), its interval is mean ± t std / sqrt(n), and a side is claimed only where the
whole interval lies there."""
import math
import statistics

import pytest

from tools.intervals import T975, interval, paired, side, span


def t_cdf(t, df, steps=20000):
    """P(T <= t) for Student's t with df degrees of freedom: 1/2 plus the density integrated from 0 to t (Simpson)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(x):
        return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))
    h = t / steps
    total = density(0) + density(t) + sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
    return 0.5 + total * h / 3


@pytest.mark.parametrize('df', range(1, len(T975) + 1))
def test_each_quantile_is_students(df):
    """Each is the 0.975 quantile to the 3 decimals it is written with."""
    assert t_cdf(T975[df - 1] - 0.0005, df) < 0.975 < t_cdf(T975[df - 1] + 0.0005, df)


def test_an_interval_is_the_mean_and_t_times_the_standard_error():
    values = [0.791, 0.758, 0.867]
    iv = interval(values)
    half = 4.303 * statistics.stdev(values) / math.sqrt(3)
    assert iv['n'] == 3 and math.isclose(iv['mean'], statistics.mean(values))
    assert math.isclose(iv['low'], iv['mean'] - half) and math.isclose(iv['high'], iv['mean'] + half)
    assert interval([1.0])['low'] is None and span(interval([1.0])) == 'one seed: no interval'
    assert span(iv, 100, 1, '%') == '95% interval 66.6 to 94.4%'


def test_a_side_is_claimed_only_where_the_whole_interval_lies():
    iv = interval([0.791, 0.758, 0.867])          # 0.666 to 0.945
    assert side(iv, 0.5) == 'above' and side(iv, 0.78) == 'undecided' and side(iv, 0.95) == 'below'
    assert side(interval([3.0]), 0) == 'undecided'   # one seed decides nothing


def test_a_difference_is_taken_seed_by_seed():
    a, b = {'0': 90.04, '1': 89.81, '2': 89.74}, {'0': 89.04, '1': 88.65, '2': 89.10, '3': 88.0}
    d = paired(a, b)
    assert d['n'] == 3 and math.isclose(d['mean'], statistics.mean([1.00, 1.16, 0.64]))
    # the paired interval is narrower than the difference of the unpaired means' spreads would allow here
    assert side(d, 0) == 'above'
