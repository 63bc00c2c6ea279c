"""
What a few seeds carry: every number a page states over seeds comes with a 95% Student-t interval of its per-seed
values, mean ± t(0.975, n - 1) x std / sqrt(n), std with n - 1 in the denominator. Seeds are the only repetition
these pages have, and with 3 of them t is 4.30: an interval is wide.

A difference between two methods, or a method's share of the scratch-to-fine-tune gap, is computed seed by seed
first and its interval taken over those values: the runs of one seed share their data order and augmentation draws,
so the pairs are compared (as the paper's methods are, on one schedule). A page says a difference is above or below
zero, or an aim met or missed, only where the whole interval lies on that side; otherwise it says the seeds do not
decide it.

    iv = interval([0.791, 0.758, 0.867])     # {'mean': 0.805, 'std': 0.056, 'n': 3, 'low': 0.666, 'high': 0.945}
    side(iv, 0.78)                           # 'undecided': 0.78 lies inside
"""
import math
import statistics

# t(0.975, df) for df = 1 ... 30 (beyond 30, df 30's: a slightly wider interval than the normal's 1.96)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def interval(values):
    """{mean, std, n, low, high} of the values: their mean, their standard deviation (n - 1) and 95% Student-t
    interval; std, low and high None for a single value (one seed: no interval)."""
    values = list(values)
    m = statistics.mean(values)
    if len(values) < 2:
        return {'mean': m, 'std': None, 'n': len(values), 'low': None, 'high': None}
    std = statistics.stdev(values)
    half = T975[min(len(values) - 1, len(T975)) - 1] * std / math.sqrt(len(values))
    return {'mean': m, 'std': std, 'n': len(values), 'low': m - half, 'high': m + half}


def paired(a, b):
    """interval of a[k] - b[k] over the seeds both have ({seed: value} each)."""
    return interval([a[k] - b[k] for k in sorted(set(a) & set(b), key=int)])


def side(iv, than=0.0):
    """'above' or 'below' `than` where the whole interval lies on that side; 'undecided' where it holds `than` or
    there is none (one seed)."""
    if iv['low'] is not None and iv['low'] > than:
        return 'above'
    if iv['high'] is not None and iv['high'] < than:
        return 'below'
    return 'undecided'


def span(iv, scale=1.0, digits=2, unit=''):
    """'95% interval 66.6 to 94.5%' (scale 100, digits 1, unit '%'); 'one seed: no interval'."""
    if iv['low'] is None:
        return 'one seed: no interval'
    return f"95% interval {scale * iv['low']:.{digits}f} to {scale * iv['high']:.{digits}f}{unit}"
