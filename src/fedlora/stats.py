"""The intervals a comparison reports: Student t for means over seeds and for paired seed
differences, Wilson for an accuracy. Plain Python: the t quantile comes from the regularized
incomplete beta function (a continued fraction), so no statistics package is needed."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for 0 ≤ x ≤ 1 and a, b > 0."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # the continued fraction converges fast only below the mean; above it, use I_x(a,b) = 1 − I_{1−x}(b,a)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(1.0 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of I_x(a, b), evaluated by the modified Lentz method."""
    tiny = 1e-300
    d = 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    c, fraction = 1.0, d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-16:
            return fraction
    raise ArithmeticError(f"incomplete beta fraction did not converge (x={x}, a={a}, b={b})")


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * regularized_beta(df / (df + t * t), df / 2.0, 0.5)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T ≤ t) = p, found by bisection on :func:`t_cdf` to full float precision."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Estimate:
    """A mean and its 95 % interval (None with fewer than two values)."""

    mean: float
    low: float | None
    high: float | None
    n: int

    @property
    def significant(self) -> bool:
        """Whether the interval excludes zero."""
        return self.low is not None and (self.low > 0 or self.high < 0)

    def to_json(self) -> dict:
        return {"mean": self.mean, "ci95": None if self.low is None else [self.low, self.high]}


def mean_interval(values: Sequence[float]) -> Estimate:
    """Mean with the Student t interval mean ± t(0.975, n−1)·s/√n (none for a diverged, NaN value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval needs at least one value")
    mean = statistics.fmean(values)
    if n < 2 or not all(math.isfinite(value) for value in values):
        return Estimate(mean, None, None, n)
    half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Estimate(mean, mean - half, mean + half, n)


def paired_difference(values: Sequence[float], reference: Sequence[float]) -> Estimate:
    """Mean of ``values[i] − reference[i]`` (pairs that share everything but the method) with its t interval."""
    if len(values) != len(reference):
        raise ValueError(f"paired_difference needs equal lengths, got {len(values)} and {len(reference)}")
    return mean_interval([value - other for value, other in zip(values, reference)])


def wilson_interval(successes: float, trials: int) -> tuple[float, float, float]:
    """(proportion, low, high): the Wilson score interval of a binomial proportion."""
    if trials < 1:
        raise ValueError(f"wilson_interval needs at least one trial, got {trials}")
    z = statistics.NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)
    p = successes / trials
    denominator = 1.0 + z * z / trials
    center = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return p, center - half, center + half


def accuracy_text(accuracy: float, n: int | float | None) -> str:
    """An accuracy with its n and 95 % Wilson interval: ``23.4% [19.1, 28.2] n=300``."""
    if not n or math.isnan(accuracy):
        return f"{100 * accuracy:.2f}%"
    _, low, high = wilson_interval(accuracy * n, round(n))
    return f"{100 * accuracy:.1f}% [{100 * low:.1f}, {100 * high:.1f}] n={round(n)}"
