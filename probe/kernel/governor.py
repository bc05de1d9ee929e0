"""Tracing fewer exchanges while the CPU is short, or the export behind.

The kernel sheds the exchanges over the rate limit whole, and counts them
(bpf/socket_data.bpf.c, shed()). `RateGovernor` moves that limit between a
floor and the configured maximum. The CPU is short when tasks wait for it,
by Linux's pressure stall information (``/proc/pressure/cpu``, its ``some``
line: the share of time in which some runnable task waited), and little of
it goes unused (``/proc/stat``: under a fifth idle). Pressure alone also
rises on a node with CPU to spare, when its tasks wake in bursts: Python's
threaded server, saturated here, read 25-38 % of pressure with 40 % of the
CPU idle; nginx, saturated with the probe, 5-28 % with 8-22 % idle.

The idle share decides only once the pressure is half the limit or more
(under half, the CPU is neither short nor kept from growing the rate back),
so ``/proc/stat`` is read only then: it is the dearer of the two files, as
the kernel writes out every interrupt's count at each reading, which with
its parse took two fifths of the governor's 120 us a reading on an idle
probe here. The share then needs a reading at the tick before: a tick that
rises to half the limit or more only takes one, and the governor acts from
the next, a quarter of a second later.

A tick with no record read since the last one reads neither file: with no
exchange to shed, what the CPU does is not the probe's to weigh, and an idle
probe's two readings a second were most of its governor's cost. It lets a
lowered limit grow back, as a quiet CPU would, and the next tick with
records starts its readings afresh, the idle time's with the pressure's: a
shortage that comes with the traffic, as a burst does, is then acted on at
the tick after, not two ticks after.

On a saturated node the probe's own work is part of what the workload waits
behind, and most of it is per traced exchange: while the CPU is short, the
governor halves the rate every quarter of a second, down to the floor; once
the pressure is under half its limit or the CPU is idle a fifth of the time,
it raises the rate a quarter at a time back to the maximum. A node that is
busy but not short (this VM at 5,000 requests a second: 2-3 % of pressure,
83-85 % idle) keeps every exchange traced.

The export is behind when its queue is three quarters full (a collector that
is down, or slower than the spans come): the spans past the queue's bounds
would be dropped after the whole cost of building them, where an exchange
shed in the kernel costs nearly nothing. The rate falls the same way, and
comes back once the queue is a quarter full or less (and the CPU not short).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

PRESSURE_FILE = Path("/proc/pressure/cpu")
STAT_FILE = Path("/proc/stat")
INTERVAL_S = 0.25  # how often the pressure is read and the rate moved
IDLE_LIMIT = 0.2  # a CPU idle this share of the time or more is not short
DECREASE = 0.5  # the rate's factor at each reading of a short CPU
INCREASE = 1.25  # ... and at each reading of one clearly not short
BACKLOG_BEHIND = 0.75  # the share of the export queue's bounds at which it is behind
BACKLOG_CLEAR = 0.25  # ... and at or under which it keeps up


def cpu_stall_us(path: Path = PRESSURE_FILE) -> int | None:
    """Microseconds since boot in which some task waited for a CPU; None
    where the kernel does not say (built without PSI, or ``psi=0``)."""
    return _stall_us(_read(path))


def cpu_idle_ticks(path: Path = STAT_FILE) -> tuple[int, int] | None:
    """(idle, all) clock ticks of every CPU since boot, idle counting I/O
    waits; None if unreadable."""
    return _idle_ticks(_read(path))


class ProcFile:
    """A file of /proc kept open, read from its start at each reading. The
    governor reads two of them every quarter second; opened anew each time,
    from the cold caches of an idle probe, they took 0.45 ms of its CPU a
    second, against 0.19 kept open."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    def read(self) -> str | None:
        """Its first 4 KiB, which hold the lines read here; None if unreadable."""
        try:
            if self._fd < 0:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            return os.pread(self._fd, 4096, 0).decode("ascii", "replace")
        except OSError:
            return None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _read(path: Path) -> str | None:
    """``path`` read once, as a `ProcFile` reads it."""
    file = ProcFile(path)
    try:
        return file.read()
    finally:
        file.close()


def _stall_us(text: str | None) -> int | None:
    for line in (text or "").splitlines():
        if line.startswith("some "):
            for field in line.split()[1:]:
                name, _, value = field.partition("=")
                if name == "total" and value.isdigit():
                    return int(value)
    return None


def _idle_ticks(text: str | None) -> tuple[int, int] | None:
    fields = (text or "").split("\n", 1)[0].split()
    if len(fields) < 9 or fields[0] != "cpu" or not all(f.isdigit() for f in fields[1:9]):
        return None
    # user nice system idle iowait irq softirq steal
    ticks = [int(field) for field in fields[1:9]]
    return ticks[3] + ticks[4], sum(ticks)


class _Cpu(NamedTuple):
    pressure: float  # the share of time some task waited for a CPU
    idle: float | None  # the share of CPU time idle; None where not read (see above)
    limit: float  # the pressure at which the CPU is short, if little is idle


class RateGovernor:
    """Moves the kernel's exchange rate limit by CPU pressure and idle time,
    and by the export's backlog; `tick()` after every poll, it acts every
    `INTERVAL_S`.

    ``set_rate`` changes the limit in the kernel (`EventSource.set_exchange_rate`,
    which reports it). ``pressure_limit`` None leaves the CPU out (no limit
    set, or a kernel without pressure figures); ``stall_us``, ``idle_ticks``
    (by default from /proc, kept open) and ``clock`` read the pressure, the
    idle time and the time; ``backlog`` the share of the export queue's
    bounds in use (`BatchSpanProcessor.backlog`); ``records`` a count of the
    records read so far (None: every tick has some).
    """

    def __init__(
        self,
        set_rate: Callable[[int], None],
        *,
        maximum: int,
        minimum: int,
        pressure_limit: float | None,
        stall_us: Callable[[], int | None] | None = None,
        idle_ticks: Callable[[], tuple[int, int] | None] | None = None,
        backlog: Callable[[], float] = lambda: 0.0,
        records: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < minimum <= maximum:
            raise ValueError(f"need 0 < minimum ({minimum}) <= maximum ({maximum})")
        if pressure_limit is not None and not 0 < pressure_limit < 1:
            raise ValueError(f"pressure limit {pressure_limit}: a share of time, above 0, below 1")
        self._set_rate = set_rate
        self._maximum = maximum
        self._minimum = minimum
        self._limit = pressure_limit
        pressure, stat = ProcFile(PRESSURE_FILE), ProcFile(STAT_FILE)
        self._stall_us = stall_us or (lambda: _stall_us(pressure.read()))
        self._idle_ticks = idle_ticks or (lambda: _idle_ticks(stat.read()))
        self._backlog = backlog
        self._records = records
        self._records_seen: int | None = None
        self._clock = clock
        self.rate = maximum
        # (time, stall) of the last reading; (time, idle ticks, all ticks) of the last
        # reading that took the idle time too
        self._last: tuple[float, int] | None = None
        self._last_idle: tuple[float, int, int] | None = None
        self._due = 0.0

    def tick(self) -> None:
        now = self._clock()
        if now < self._due:
            return
        self._due = now + INTERVAL_S
        if self._quiet():
            self._last = None  # the next reading starts afresh
            if self._backlog() <= BACKLOG_CLEAR:
                self._grow_back()
            return
        cpu, backlog = self._cpu(now), self._backlog()
        shortage = self._shortage(cpu, backlog)
        if shortage is not None:
            rate = max(self._minimum, int(self.rate * DECREASE))
            if rate != self.rate:
                self._move(rate, shortage)
        elif self._keeping_up(cpu, backlog):
            self._grow_back()

    def _grow_back(self) -> None:
        """A quarter more, up to the maximum."""
        if self.rate < self._maximum:
            self._move(min(self._maximum, int(self.rate * INCREASE) + 1), None)

    def _quiet(self) -> bool:
        """No record read since the last tick."""
        if self._records is None:
            return False
        seen, self._records_seen = self._records_seen, self._records()
        return seen == self._records_seen

    def _shortage(self, cpu: _Cpu | None, backlog: float) -> tuple[str, str] | None:
        """Why the rate must fall, if it must, and what the user may do of it."""
        if backlog >= BACKLOG_BEHIND:
            return (
                f"the export is behind (its queue {backlog:.0%} full)",
                "an exchange shed in the kernel costs nearly nothing, a span dropped from "
                "a full queue the whole of its making (OTEL_BSP_MAX_QUEUE_SIZE bounds it)",
            )
        if (
            cpu is not None
            and cpu.pressure >= cpu.limit
            and cpu.idle is not None
            and cpu.idle < IDLE_LIMIT
        ):
            return (
                f"the CPU is short (tasks waited for one {cpu.pressure:.0%} of the time, "
                f"{cpu.idle:.0%} of it idle)",
                "capture.cpu_pressure_limit sets the share of time waited at which this happens",
            )
        return None

    def _keeping_up(self, cpu: _Cpu | None, backlog: float) -> bool:
        """Clearly not short: the rate may grow back. Between that and short, it holds."""
        if backlog > BACKLOG_CLEAR:
            return False
        if self._limit is None:
            return True  # the CPU is not governed
        if cpu is None:
            return False
        return cpu.pressure < cpu.limit / 2 or (cpu.idle is not None and cpu.idle >= IDLE_LIMIT)

    def _cpu(self, now: float) -> _Cpu | None:
        """The pressure since the last reading, and the idle share since then
        where it decides; None without figures (the CPU not governed, the
        first reading, a kernel without pressure figures)."""
        if self._limit is None:
            return None
        stall = self._stall_us()
        if stall is None:
            return None
        last, self._last = self._last, (now, stall)
        if last is None or now <= last[0]:
            self._idle_share(now, None)  # the first reading: the next one may need both
            return None
        pressure = (stall - last[1]) / 1e6 / (now - last[0])
        idle = self._idle_share(now, last[0]) if pressure >= self._limit / 2 else None
        return _Cpu(pressure, idle, self._limit)

    def _idle_share(self, now: float, since: float | None) -> float | None:
        """The idle share since the reading at ``since``, if that one took the
        idle time too; None otherwise, or with ``since`` None (this reading is
        only the start of the next)."""
        ticks = self._idle_ticks()
        if ticks is None:
            self._last_idle = None
            return None
        last, self._last_idle = self._last_idle, (now, *ticks)
        if since is None or last is None or last[0] != since or ticks[1] <= last[2]:
            return None
        return (ticks[0] - last[1]) / (ticks[1] - last[2])

    def _move(self, rate: int, shortage: tuple[str, str] | None) -> None:
        """Sets the limit; ``shortage`` says why a lowered one is (None: raised)."""
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
        if self.rate == self._maximum and shortage is not None:
            reason, hint = shortage
            log.warning(
                "%s: tracing fewer exchanges, at most %d a second for now, not %d; %s",
                reason, rate, self._maximum, hint,
            )  # fmt: skip
        elif rate == self._maximum:
            log.info(
                "the CPU and the export keep up again: tracing up to %d exchanges a second", rate
            )
        self.rate = rate
