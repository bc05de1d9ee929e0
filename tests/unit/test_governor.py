"""The exchange rate limit under CPU pressure and the export's backlog
(probe.kernel.governor), driven by a made-up clock, stall counter and queue."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from probe.kernel.governor import (
    INTERVAL_S,
    ProcFile,
    RateGovernor,
    cpu_idle_ticks,
    cpu_stall_us,
)

PSI = (
    "some avg10=12.50 avg60=3.10 avg300=0.80 total=397636569\n"
    "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
)


def test_idle_ticks_are_idle_and_io_wait_of_all_cpus(tmp_path) -> None:
    path = tmp_path / "stat"
    path.write_text("cpu  100 5 50 800 20 1 2 3 0 0\ncpu0 50 2 25 400 10 0 1 1 0 0\n")
    assert cpu_idle_ticks(path) == (820, 981)
    path.write_text("intr 1 2 3\n")
    assert cpu_idle_ticks(path) is None
    assert cpu_idle_ticks(tmp_path / "absent") is None


def test_the_stall_time_is_the_some_lines_total(tmp_path) -> None:
    path = tmp_path / "cpu"
    path.write_text(PSI)
    assert cpu_stall_us(path) == 397636569
    path.write_text("full avg10=0.00 total=5\n")
    assert cpu_stall_us(path) is None
    path.write_text("some avg10=1.00 total=lots\n")
    assert cpu_stall_us(path) is None
    assert cpu_stall_us(tmp_path / "absent") is None


def test_a_proc_file_kept_open_reads_what_it_holds_now(tmp_path) -> None:
    path = tmp_path / "stat"
    path.write_text("cpu  100 5 50 800 20 1 2 3 0 0\n")
    kept = ProcFile(path)
    assert kept.read() == "cpu  100 5 50 800 20 1 2 3 0 0\n"
    path.write_text("cpu  200 5 50 900 20 1 2 3 0 0\n")  # the same file, rewritten
    assert kept.read() == "cpu  200 5 50 900 20 1 2 3 0 0\n"
    assert ProcFile(tmp_path / "absent").read() is None


class Node:
    """A clock, a stall counter and CPU ticks that advance together by a given
    pressure and idle share."""

    def __init__(self) -> None:
        self.now = 100.0
        self.stalled_us = 0
        self.idle_ticks = self.all_ticks = 0
        self.backlog = 0.0  # the share of the export queue in use
        self.rates: list[int] = []

    def run(
        self, governor: RateGovernor, pressure: float, seconds: float, idle: float = 0.05
    ) -> None:
        for _ in range(round(seconds / INTERVAL_S)):
            self.now += INTERVAL_S
            self.stalled_us += round(pressure * INTERVAL_S * 1e6)
            self.all_ticks += 50  # two CPUs, 100 ticks a second
            self.idle_ticks += round(idle * 50)
            governor.tick()

    def governor(
        self, set_rate: Callable[[int], None] | None = None, pressure_limit: float | None = 0.1
    ) -> RateGovernor:
        return RateGovernor(
            set_rate or self.rates.append,
            maximum=10_000,
            minimum=1_000,
            pressure_limit=pressure_limit,
            stall_us=lambda: self.stalled_us,
            idle_ticks=lambda: (self.idle_ticks, self.all_ticks),
            backlog=lambda: self.backlog,
            clock=lambda: self.now,
        )


def test_under_pressure_the_rate_halves_each_interval_down_to_the_floor(caplog) -> None:
    node = Node()
    governor = node.governor()
    with caplog.at_level(logging.INFO, logger="probe.kernel.governor"):
        node.run(governor, pressure=0.25, seconds=2)
    assert node.rates == [5_000, 2_500, 1_250, 1_000]
    assert governor.rate == 1_000
    # Told once, as it starts: not at every step.
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "waited for one 25% of the time, 4% of it idle" in caplog.text
    assert "at most 5000 a second for now, not 10000" in caplog.text


def test_once_the_pressure_passes_the_rate_grows_back_to_the_maximum(caplog) -> None:
    node = Node()
    governor = node.governor()
    node.run(governor, pressure=0.5, seconds=2)
    node.rates.clear()
    with caplog.at_level(logging.INFO, logger="probe.kernel.governor"):
        node.run(governor, pressure=0.01, seconds=5)
    assert node.rates[-1] == 10_000 == governor.rate
    assert node.rates == sorted(node.rates)  # a quarter more each time, never past the maximum
    assert all(b <= a * 1.25 + 1 for a, b in zip([1_000, *node.rates], node.rates, strict=False))
    assert "keep up again: tracing up to 10000" in caplog.text


def test_between_half_the_limit_and_the_limit_the_rate_holds() -> None:
    node = Node()
    governor = node.governor()
    node.run(governor, pressure=0.2, seconds=1)
    held = governor.rate
    node.rates.clear()
    node.run(governor, pressure=0.07, seconds=3)
    assert node.rates == [] and governor.rate == held < 10_000


def test_pressure_with_cpu_to_spare_is_not_shortage() -> None:
    """Tasks that wake in bursts wait for a CPU though a fifth or more of it
    goes unused: the rate holds, and grows back if it was lowered."""
    node = Node()
    governor = node.governor()
    node.run(governor, pressure=0.35, seconds=3, idle=0.4)
    assert node.rates == [] and governor.rate == 10_000
    node.run(governor, pressure=0.35, seconds=1, idle=0.1)
    lowered = governor.rate
    node.run(governor, pressure=0.35, seconds=5, idle=0.2)
    assert lowered < 10_000 == governor.rate


def test_a_quiet_node_keeps_every_exchange_and_ticks_between_intervals_do_nothing() -> None:
    node = Node()
    governor = node.governor()
    node.run(governor, pressure=0.03, seconds=3)
    assert node.rates == [] and governor.rate == 10_000
    node.stalled_us += 10**6  # a whole second stalled, read no sooner than the interval
    governor.tick()
    assert node.rates == []


def test_the_idle_time_is_read_only_where_the_pressure_makes_it_decide() -> None:
    """Under half the pressure limit the CPU is neither short nor kept from
    growing the rate back, whatever its idle share: /proc/stat, the dearer
    file, is not read, but with the first pressure reading. From half the
    limit on it is read at every interval, and the first reading there only
    starts the share the next one decides by."""
    node = Node()
    reads: list[float] = []

    def idle_ticks() -> tuple[int, int]:
        reads.append(node.now)
        return node.idle_ticks, node.all_ticks

    governor = RateGovernor(
        node.rates.append,
        maximum=10_000,
        minimum=1_000,
        pressure_limit=0.1,
        stall_us=lambda: node.stalled_us,
        idle_ticks=idle_ticks,
        clock=lambda: node.now,
    )
    node.run(governor, pressure=0.04, seconds=3)
    assert reads == [100.25] and node.rates == []  # with the first pressure reading only
    node.run(governor, pressure=0.3, seconds=0.25)
    assert len(reads) == 2 and node.rates == []  # its share starts here
    node.run(governor, pressure=0.3, seconds=0.5)
    assert len(reads) == 4 and node.rates == [5_000, 2_500]
    node.run(governor, pressure=0.01, seconds=0.25)
    assert len(reads) == 4 and node.rates == [5_000, 2_500, 3_126]


def test_a_tick_with_no_record_read_reads_nothing_and_lets_the_rate_grow_back() -> None:
    """No record read since the last tick: neither file is read, a lowered
    rate grows back as on a quiet CPU, and the first tick with records again
    starts the readings afresh, the idle time's too, so that the tick after
    acts on a shortage that came with the records."""
    node = Node()
    records, reads = [0], []

    def stall_us() -> int:
        reads.append(node.now)
        return node.stalled_us

    governor = RateGovernor(
        node.rates.append,
        maximum=10_000,
        minimum=1_000,
        pressure_limit=0.1,
        stall_us=stall_us,
        idle_ticks=lambda: (node.idle_ticks, node.all_ticks),
        records=lambda: records[0],
        clock=lambda: node.now,
    )
    for _ in range(6):  # records read at every tick, under pressure
        records[0] += 100
        node.run(governor, pressure=0.5, seconds=0.25)
    lowered = governor.rate
    assert lowered < 10_000 and len(reads) == 6
    node.run(governor, pressure=0.5, seconds=1)  # none read: the CPU is not the probe's to weigh
    assert len(reads) == 6 and lowered < governor.rate
    before = governor.rate
    records[0] += 100
    node.run(governor, pressure=0.5, seconds=0.25)  # records again: the first reading, no verdict
    assert len(reads) == 7 and governor.rate == before
    records[0] += 100
    node.run(governor, pressure=0.5, seconds=0.25)  # the shortage, acted on at once
    assert len(reads) == 8 and governor.rate == before // 2


def test_an_export_behind_lowers_the_rate_with_cpu_to_spare_until_it_keeps_up(caplog) -> None:
    node = Node()
    governor = node.governor()
    node.backlog = 0.8
    with caplog.at_level(logging.INFO, logger="probe.kernel.governor"):
        node.run(governor, pressure=0.0, seconds=2, idle=0.9)
        assert node.rates == [5_000, 2_500, 1_250, 1_000]
        node.backlog = 0.5  # draining: neither behind nor keeping up yet
        node.run(governor, pressure=0.0, seconds=2, idle=0.9)
        assert governor.rate == 1_000
        node.backlog = 0.25
        node.run(governor, pressure=0.0, seconds=5, idle=0.9)
    assert governor.rate == 10_000
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]
    assert "the export is behind (its queue 80% full)" in caplog.text
    assert "keep up again: tracing up to 10000" in caplog.text


def test_a_short_cpu_holds_the_rate_down_though_the_export_keeps_up() -> None:
    node = Node()
    governor = node.governor()
    node.backlog = 0.9
    node.run(governor, pressure=0.0, seconds=0.5, idle=0.9)
    lowered = governor.rate
    node.backlog = 0.0
    node.run(governor, pressure=0.2, seconds=2, idle=0.05)
    assert governor.rate == 1_000 < lowered


def test_without_cpu_governing_the_backlog_alone_moves_the_rate() -> None:
    node = Node()
    governor = node.governor(pressure_limit=None)
    node.run(governor, pressure=0.9, seconds=2, idle=0.0)  # not looked at
    assert node.rates == []
    node.backlog = 1.0
    node.run(governor, pressure=0.9, seconds=0.5, idle=0.0)
    assert node.rates == [5_000, 2_500]
    node.backlog = 0.1
    node.run(governor, pressure=0.9, seconds=5, idle=0.0)
    assert governor.rate == 10_000


def test_a_limit_the_kernel_would_not_take_stops_the_governing_not_the_probe(caplog) -> None:
    node = Node()

    def refuse(rate: int) -> None:
        node.rates.append(rate)
        raise OSError("map update failed")

    governor = node.governor(refuse)
    with caplog.at_level(logging.WARNING, logger="probe.kernel.governor"):
        node.run(governor, pressure=0.5, seconds=2)
    assert node.rates == [5_000]  # tried once, then left alone
    assert governor.rate == 10_000
    assert "could not move the exchange rate limit (map update failed)" in caplog.text


@pytest.mark.parametrize("missing", ["pressure", "idle"])
def test_without_pressure_or_idle_figures_the_rate_stays(missing: str) -> None:
    rates: list[int] = []
    clock = iter(range(100))
    ticks = iter(range(0, 1000, 10))
    governor = RateGovernor(
        rates.append,
        maximum=10_000,
        minimum=1_000,
        pressure_limit=0.1,
        stall_us=lambda: None if missing == "pressure" else 10**6 * next(clock),
        idle_ticks=lambda: None if missing == "idle" else (0, next(ticks)),
        clock=lambda: float(next(clock)),
    )
    for _ in range(10):
        governor.tick()
    assert rates == [] and governor.rate == 10_000


@pytest.mark.parametrize(
    ("minimum", "maximum", "limit"), [(0, 10, 0.1), (11, 10, 0.1), (1, 10, 0.0), (1, 10, 1.0)]
)
def test_settings_out_of_range_are_refused(minimum: int, maximum: int, limit: float) -> None:
    with pytest.raises(ValueError):
        RateGovernor(lambda rate: None, maximum=maximum, minimum=minimum, pressure_limit=limit)
