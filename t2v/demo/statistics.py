"""Intervals for the evaluation's figures (docs/quality.md, "Reading the numbers").

    wilson(k, n)                     95% Wilson score interval of a proportion k / n
    mean_interval(values)            a mean with its 95% normal-approximation interval
    paired_difference(first, second) second's rate minus first's on the same cases, with
                                     Newcombe's interval for paired proportions (method 10 of
                                     Newcombe, Statistics in Medicine 17:2635-2650, 1998)

All at 95% (Z95); proportions and their bounds are fractions in [0, 1].
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

Z95 = NormalDist().inv_cdf(0.975)  # 1.959964


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval: the p with (k/n - p)^2 = z^2 p (1 - p) / n at its ends."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At k = 0 or k = n one end is exactly 0 or 1 (rounding would leave 1e-17).
    return (0.0 if successes == 0 else centre - half, 1.0 if successes == n else centre + half)


def mean_interval(values, z: float = Z95) -> tuple[float, float, float]:
    """(mean, low, high) of the finite values: mean +- z x standard error (the evaluation's
    per-video figures average over hundreds of videos, where the normal approximation holds).
    NaNs (a figure a video does not have) are left out; no values gives NaNs."""
    x = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if len(x) == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if len(x) == 1:
        return (mean, mean, mean)
    half = z * float(x.std(ddof=1)) / math.sqrt(len(x))
    return (mean, mean - half, mean + half)


def paired_difference(first, second, z: float = Z95) -> tuple[float, float, float]:
    """(difference, low, high) of rate(second) - rate(first), where first[i] and second[i]
    are the same case under two settings (booleans). Newcombe's method 10: the two rates'
    Wilson intervals combined with the correlation of the pairs (phi of the 2x2 table)."""
    x = np.asarray(first, dtype=bool)
    y = np.asarray(second, dtype=bool)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("paired_difference needs two equally long 1-D sequences")
    n = len(x)
    a, b = int((x & y).sum()), int((x & ~y).sum())  # both; first only
    c, d = int((~x & y).sum()), int((~x & ~y).sum())  # second only; neither
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson(a + b, n, z)
    l2, u2 = wilson(a + c, n, z)
    denominator = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(denominator) if denominator else 0.0
    difference = p2 - p1
    low = difference - math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1)
                                     + (u1 - p1) ** 2))
    high = difference + math.sqrt(max(0.0, (u2 - p2) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1)
                                      + (p1 - l1) ** 2))
    return (difference, low, high)
