"""The statistics of a sweep's seeds: each metric's mean and sample standard deviation over a
row's seeds, and its ratio to the baseline row with a paired Student-t interval. Pure Python,
so results need no scipy at run time (the tests compare `t_quantile` with scipy's)."""

from __future__ import annotations

import math
from dataclasses import dataclass

LEVEL = 0.95  # of the ratio intervals


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (ddof = 1; None for one value).

    >>> mean_std([1.0, 2.0, 3.0])
    (2.0, 1.0)
    """
    m = mean(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _t_central(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with an integer `df`, in closed form (Abramowitz & Stegun
    26.7.3 for odd df, 26.7.4 for even)."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:  # (2/π)(θ + sin θ (cos θ + 2/3 cos³θ + … + 2·4⋯(df−3) / 1·3⋯(df−2) cos^(df−2) θ))
        term = total = math.cos(theta) if df > 1 else 0.0
        for k in range(3, df - 1, 2):
            term *= c2 * (k - 1) / k
            total += term
        return 2 / math.pi * (theta + s * total)
    term = total = 1.0  # sin θ (1 + 1/2 cos²θ + 1·3/2·4 cos⁴θ + … + 1·3⋯(df−3) / 2·4⋯(df−2) cos^(df−2) θ)
    for k in range(2, df - 1, 2):
        term *= c2 * (k - 1) / k
        total += term
    return s * total


def t_quantile(p: float, df: int) -> float:
    """The `p` quantile of Student's t with `df` (a whole number >= 1) degrees of freedom: its
    closed-form distribution function inverted by bisection, to about 1e-12 relative
    (no scipy at run time; tests compare it with `scipy.stats.t.ppf`).

    >>> round(t_quantile(0.975, 2), 6), round(t_quantile(0.025, 10), 6)
    (4.302653, -2.228139)
    """
    if not 0 < p < 1 or df < 1 or int(df) != df:
        raise ValueError(f"t_quantile({p}, {df}): needs 0 < p < 1 and a whole df >= 1")
    target = abs(2 * p - 1)
    if target == 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while _t_central(hi, df) < target:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = (lo + hi) / 2
        if _t_central(mid, df) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    t = (lo + hi) / 2
    return t if p > 0.5 else -t


@dataclass
class Ratio:
    """A row's ratio to its baseline row: `value`, and a `LEVEL` interval (`low`, `high`)
    from `pairs` seeds paired with the baseline's (None with fewer than 2)."""

    value: float | None
    low: float | None = None
    high: float | None = None
    pairs: int = 0


def ratio_interval(values: dict[int, float], base: dict[int, float], level: float = LEVEL) -> Ratio:
    """The ratio of a row's metric to its baseline's, both given per `train.seed`.

    Paired on the seeds both have (at least 2, every per-seed ratio positive): the geometric
    mean of the per-seed ratios exp(m), with the Student-t interval exp(m ± t·s/√k) of the
    mean m of the k log-ratios (s their sample standard deviation, t the (1 + level)/2
    quantile with k − 1 degrees of freedom). Otherwise the ratio of the means, no interval.

    >>> r = ratio_interval({0: 2.0, 1: 8.0}, {0: 1.0, 1: 2.0})
    >>> round(r.value, 6), r.pairs
    (2.828427, 2)
    """
    if not values or not base:
        return Ratio(None)
    pairs = sorted(set(values) & set(base))
    ratios = [values[s] / base[s] if base[s] else math.nan for s in pairs]
    if len(pairs) >= 2 and all(math.isfinite(r) and r > 0 for r in ratios):
        logs = [math.log(r) for r in ratios]
        m, sd = mean_std(logs)
        half = t_quantile((1 + level) / 2, len(logs) - 1) * (sd or 0.0) / math.sqrt(len(logs))
        return Ratio(math.exp(m), math.exp(m - half), math.exp(m + half), len(pairs))
    ref = mean(list(base.values()))
    return Ratio(mean(list(values.values())) / ref if ref else None, pairs=len(pairs))
