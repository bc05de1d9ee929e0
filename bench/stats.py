"""Statistics of the benchmark: percentiles of latencies, summaries over
repeats, and comparisons paired by repeat.

Every repeat measures each configuration side by side, so a configuration is
only ever compared with another one of the same repeat: a ratio or a
difference is computed per repeat first and summarized afterwards.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Summary:
    """Minimum, median and maximum of one figure over repeats."""

    min: float
    median: float
    max: float
    n: int

    def as_dict(self, digits: int = 4) -> dict[str, float | int]:
        return {
            "min": round(self.min, digits),
            "median": round(self.median, digits),
            "max": round(self.max, digits),
            "n": self.n,
        }


def summarize(values: Iterable[float]) -> Summary | None:
    """The summary of ``values``; None when there are none (not measured)."""
    ordered = sorted(values)
    if not ordered:
        return None
    return Summary(ordered[0], statistics.median(ordered), ordered[-1], len(ordered))


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile: the smallest value with at least ``fraction``
    of all values at or below it. Raises ValueError on no values."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction {fraction} is not in (0, 1]")
    ordered = sorted(values)
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


def paired_ratios(
    numerators: Mapping[int, float], denominators: Mapping[int, float]
) -> dict[int, float]:
    """``numerator / denominator`` of each repeat that has both and a
    non-zero denominator."""
    return {
        repeat: numerators[repeat] / denominators[repeat]
        for repeat in sorted(numerators.keys() & denominators.keys())
        if denominators[repeat]
    }


def paired_differences(
    minuends: Mapping[int, float], subtrahends: Mapping[int, float]
) -> dict[int, float]:
    """``minuend - subtrahend`` of each repeat that has both."""
    return {
        repeat: minuends[repeat] - subtrahends[repeat]
        for repeat in sorted(minuends.keys() & subtrahends.keys())
    }
