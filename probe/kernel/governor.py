"""Tracing fewer exchanges while the CPU is short.

The kernel sheds the exchanges over the rate limit whole, and counts them
(bpf/socket_data.bpf.c, shed()). `RateGovernor` moves that limit between a
floor and the configured maximum by Linux's pressure stall information: the
share of time in which some runnable task waited for a CPU
(``/proc/pressure/cpu``, its ``some`` line). On a saturated node the probe's
own work is part of what the workload waits behind, and most of it is per
traced exchange: while the pressure is over the limit, the governor halves
the rate every quarter of a second, down to the floor; once the pressure is
under half the limit, it raises the rate a quarter at a time back to the
maximum. A node that is busy but not short of CPU (this VM at 5,000 requests
a second: 2-3 %) keeps every exchange traced.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

PRESSURE_FILE = Path("/proc/pressure/cpu")
INTERVAL_S = 0.25  # how often the pressure is read and the rate moved
DECREASE = 0.5  # the rate's factor at each reading over the limit
INCREASE = 1.25  # ... and under half of it


def cpu_stall_us(path: Path = PRESSURE_FILE) -> int | None:
    """Microseconds since boot in which some task waited for a CPU; None
    where the kernel does not say (built without PSI, or ``psi=0``)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("some "):
            for field in line.split()[1:]:
                name, _, value = field.partition("=")
                if name == "total" and value.isdigit():
                    return int(value)
    return None


class RateGovernor:
    """Moves the kernel's exchange rate limit by CPU pressure; `tick()` after
    every poll, it acts every `INTERVAL_S`.

    ``set_rate`` changes the limit in the kernel (`EventSource.set_exchange_rate`,
    which reports it); ``stall_us`` and ``clock`` read the pressure and the time.
    """

    def __init__(
        self,
        set_rate: Callable[[int], None],
        *,
        maximum: int,
        minimum: int,
        pressure_limit: float,
        stall_us: Callable[[], int | None] = cpu_stall_us,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < minimum <= maximum:
            raise ValueError(f"need 0 < minimum ({minimum}) <= maximum ({maximum})")
        if not 0 < pressure_limit < 1:
            raise ValueError(f"pressure limit {pressure_limit}: a share of time, above 0, below 1")
        self._set_rate = set_rate
        self._maximum = maximum
        self._minimum = minimum
        self._limit = pressure_limit
        self._stall_us = stall_us
        self._clock = clock
        self.rate = maximum
        self._last: tuple[float, int] | None = None  # (time, stall) of the last reading
        self._due = 0.0

    def tick(self) -> None:
        now = self._clock()
        if now < self._due:
            return
        self._due = now + INTERVAL_S
        stall = self._stall_us()
        if stall is None:
            return
        last, self._last = self._last, (now, stall)
        if last is None or now <= last[0]:
            return
        pressure = (stall - last[1]) / 1e6 / (now - last[0])
        if pressure >= self._limit:
            rate = max(self._minimum, int(self.rate * DECREASE))
        elif pressure < self._limit / 2:
            rate = min(self._maximum, int(self.rate * INCREASE) + 1)
        else:
            return
        if rate != self.rate:
            self._move(rate, pressure)

    def _move(self, rate: int, pressure: float) -> None:
        try:
            self._set_rate(rate)
        except Exception as error:  # noqa: BLE001 - bcc raises plain Exception
            # The probe goes on tracing at the limit in force; only the governing stops.
            log.warning(
                "could not move the exchange rate limit (%s): it stays at %d a second",
                error, self.rate,
            )  # fmt: skip
            self._due = math.inf
            return
        if self.rate == self._maximum:
            log.warning(
                "the CPU is short (tasks waited for one %.0f%% of the time): tracing fewer "
                "exchanges, at most %d a second for now, not %d; capture.cpu_pressure_limit "
                "sets the share of time at which this happens",
                pressure * 100, rate, self._maximum,
            )  # fmt: skip
        elif rate == self._maximum:
            log.info("the CPU is no longer short: tracing up to %d exchanges a second", rate)
        self.rate = rate
