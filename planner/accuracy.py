"""Accuracy of predictions against measurements: rank agreement and relative errors.

What `benchmarks/model_accuracy.py` reports for the performance model (and any other
predicted-vs-measured comparison uses): Kendall's tau between predicted and measured
orders, signed relative errors, MAPE and the largest error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def kendall_tau(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Kendall's tau-b between two equally long sequences (ties handled; O(n^2)).

    1.0: same order; -1.0: reversed. NaN when either sequence is constant.
    """
    if len(xs) != len(ys):
        raise ValueError(f"sequences differ in length ({len(xs)} vs {len(ys)})")
    concordant = discordant = ties_x = ties_y = 0
    n = len(xs)
    for i in range(n):
        for j in range(i + 1, n):
            dx = (xs[i] > xs[j]) - (xs[i] < xs[j])
            dy = (ys[i] > ys[j]) - (ys[i] < ys[j])
            if dx == 0 and dy == 0:
                continue  # tied in both: counts in neither denominator term
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif dx == dy:
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denom if denom else float("nan")


def rel_errors(predicted: Sequence[float], measured: Sequence[float]) -> list[float]:
    """Signed relative errors predicted / measured - 1."""
    if len(predicted) != len(measured):
        raise ValueError("predicted and measured differ in length")
    if any(m <= 0 for m in measured):
        raise ValueError("measured values must be positive")
    return [p / m - 1.0 for p, m in zip(predicted, measured)]


def mape(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """Mean absolute percentage error, as a fraction (0.05 = 5%)."""
    errs = rel_errors(predicted, measured)
    return sum(abs(e) for e in errs) / len(errs) if errs else float("nan")


def max_ape(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """Largest absolute percentage error, as a fraction."""
    return max((abs(e) for e in rel_errors(predicted, measured)), default=float("nan"))
