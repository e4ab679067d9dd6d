"""Statistics over the seeds of a scenario: mean, standard deviation, 95% confidence intervals.

A figure measured once per seed (final accuracy, bytes, time to target, ...) is summarised
by its mean, sample standard deviation (n - 1 in the denominator) and the Student-t 95%
interval ``mean ± t(0.975, n - 1) · sd / sqrt(n)``. The seeds of a scenario are few (3 to
10), so the t quantile matters: 4.30 for three seeds against the normal's 1.96. scipy
(the ``sim`` extra) gives the quantile; without it a table up to 30 degrees of freedom is
used (and the normal's beyond, within 1.5%).

Speed-ups are ratios, summarised by ``ratio_summary``: see its docstring for why the
interval is taken on log ratios paired by seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95

# t(0.975, df) for df = 1..30 (the fallback when scipy is not installed).
_T975 = (
    12.7062,
    4.3027,
    3.1824,
    2.7764,
    2.5706,
    2.4469,
    2.3646,
    2.3060,
    2.2622,
    2.2281,
    2.2010,
    2.1788,
    2.1604,
    2.1448,
    2.1314,
    2.1199,
    2.1098,
    2.1009,
    2.0930,
    2.0860,
    2.0796,
    2.0739,
    2.0687,
    2.0639,
    2.0595,
    2.0555,
    2.0518,
    2.0484,
    2.0452,
    2.0423,
)


def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (two-sided 95%)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    try:
        from scipy.stats import t
    except ImportError:  # pragma: no cover - scipy is in the sim extra
        return _T975[df - 1] if df <= len(_T975) else 1.959964
    return float(t.ppf(0.5 + CONFIDENCE / 2.0, df))


@dataclass(frozen=True, slots=True)
class Summary:
    """A figure over the seeds that measured it. ``std`` and the interval need two seeds
    (None with one); ``n`` counts the seeds with a value (a time to target that was never
    reached has none)."""

    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None


def summarize(values: Sequence[float | None]) -> Summary:
    """Mean, sample standard deviation and Student-t 95% interval of the finite values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Summary(0, None, None, None, None)
    mean = math.fsum(xs) / n
    if n == 1:
        return Summary(1, mean, None, None, None)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True, slots=True)
class RatioSummary:
    """A speed-up over the seeds where both arms reached the target: the geometric mean of
    the per-seed ratios and its 95% interval, and the ratios' plain standard deviation."""

    n: int
    geomean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None


def ratio_summary(ratios: Sequence[float | None]) -> RatioSummary:
    """Summarise speed-ups paired by seed: ``ratios[i]`` is the baseline's time over the
    arm's on seed i (None where either never reached the target; left out).

    Why paired, and why on logs. Both arms of seed i share its sites, data split, speeds
    and failures, so most of the seed-to-seed spread is common to both; the per-seed ratio
    cancels it, and its interval is far narrower than one built from two unpaired means.
    A ratio is skewed (2× and 0.5× are symmetric around 1×, 1.5 apart) and positive, so the
    Student-t interval is taken on ``log(ratio)`` and mapped back: it never goes below 0,
    and swapping the arms inverts the interval exactly. The point estimate is then the
    geometric mean. A bootstrap was the other choice; with the 3 to 10 seeds a scenario
    runs, a percentile bootstrap covers well below its nominal 95% and draws random numbers
    a report would have to seed, so the t interval on log ratios is used.
    """
    xs = [float(r) for r in ratios if r is not None and math.isfinite(float(r)) and r > 0]
    n = len(xs)
    if n == 0:
        return RatioSummary(0, None, None, None, None)
    logs = summarize([math.log(x) for x in xs])
    assert logs.mean is not None
    geomean = math.exp(logs.mean)
    if n == 1:
        return RatioSummary(1, geomean, None, None, None)
    assert logs.ci_low is not None and logs.ci_high is not None
    plain = summarize(xs)
    return RatioSummary(n, geomean, plain.std, math.exp(logs.ci_low), math.exp(logs.ci_high))


def band(series: Sequence[Sequence[tuple[float, float]]]) -> list[tuple[float, Summary]]:
    """Per evaluation time, the summary of the seeds' accuracies at that time (the seeds of
    a scenario evaluate at the same virtual times; a time some seed lacks uses the rest)."""
    at: dict[float, list[float]] = {}
    for points in series:
        for t, acc in points:
            at.setdefault(float(t), []).append(float(acc))
    return [(t, summarize(at[t])) for t in sorted(at)]


__all__ = [
    "CONFIDENCE",
    "RatioSummary",
    "Summary",
    "band",
    "ratio_summary",
    "summarize",
    "t_quantile",
]
