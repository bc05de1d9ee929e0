"""Converts the kernel's monotonic timestamps to Unix time.

BPF programs stamp events with ``bpf_ktime_get_ns()``, which is
CLOCK_MONOTONIC; Python's ``time.monotonic_ns()`` reads the same clock on
Linux, so one offset, measured once at start, maps one onto the other.
"""

from __future__ import annotations

import time


def measure_offset_ns(samples: int = 5) -> int:
    """Unix time minus monotonic time, in nanoseconds.

    Each sample brackets one monotonic reading between two wall-clock
    readings and takes their midpoint; the tightest bracket wins, since a
    wide one means the thread was preempted in between.
    """
    best_width, best_offset = None, 0
    for _ in range(samples):
        before = time.time_ns()
        mono = time.monotonic_ns()
        after = time.time_ns()
        width = after - before
        if best_width is None or width < best_width:
            best_width, best_offset = width, (before + after) // 2 - mono
    return best_offset


class MonotonicClock:
    """Maps kernel monotonic nanoseconds to Unix nanoseconds.

    The offset is fixed at construction: spans keep consistent relative
    times even if the wall clock is stepped while the probe runs.
    """

    def __init__(self, offset_ns: int | None = None) -> None:
        self.offset_ns = measure_offset_ns() if offset_ns is None else offset_ns

    def to_unix_ns(self, mono_ns: int) -> int:
        return mono_ns + self.offset_ns
