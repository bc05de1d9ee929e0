"""The pipeline's reading of the kernel's counters: totals into Stats, and
what the log is told (no kernel: the source's counters are played)."""

from __future__ import annotations

import logging

import pytest

from probe.kernel.loader import KERNEL_COUNTERS, EventSource, ProbeOptions
from probe.pipeline import Pipeline
from probe.stats import Stats


def counters(**values: int) -> dict[str, int]:
    return {name: values.get(name, 0) for name in KERNEL_COUNTERS.values()}


def test_shedding_is_counted_and_told_once_a_while(monkeypatch, caplog) -> None:
    stats = Stats()
    source = EventSource(ProbeOptions(exchange_rate=500), stats)
    pipeline = Pipeline(source, [], stats)
    readings = iter([counters(), counters(exchanges_shed=40), counters(exchanges_shed=90)])
    monkeypatch.setattr(source, "kernel_counters", lambda: next(readings))

    with caplog.at_level(logging.WARNING, logger="probe.pipeline"):
        pipeline._read_kernel_counters()
        assert caplog.messages == []
        pipeline._read_kernel_counters()
        pipeline._read_kernel_counters()  # more, within the minute: not told again

    assert stats["exchanges_shed"] == 90
    [message] = caplog.messages
    assert "limit of 500 exchanges a second: 40 exchanges shed" in message
    assert "--max-exchange-rate" in message


def test_shedding_under_a_lowered_limit_says_so(monkeypatch, caplog) -> None:
    stats = Stats()
    source = EventSource(ProbeOptions(exchange_rate=500), stats)
    source.exchange_rate = 125  # as set_exchange_rate leaves it, the CPU being short
    pipeline = Pipeline(source, [], stats)
    monkeypatch.setattr(source, "kernel_counters", lambda: counters(exchanges_shed=7))
    with caplog.at_level(logging.WARNING, logger="probe.pipeline"):
        pipeline._read_kernel_counters()
    [message] = caplog.messages
    assert "limit of 125 exchanges a second (lowered from 500 while the CPU is short)" in message


@pytest.mark.parametrize("name", sorted(KERNEL_COUNTERS.values()))
def test_every_kernel_counter_reaches_stats(monkeypatch, name) -> None:
    stats = Stats()
    source = EventSource(ProbeOptions(), stats)
    pipeline = Pipeline(source, [], stats)
    monkeypatch.setattr(source, "kernel_counters", lambda: counters(**{name: 7}))
    pipeline._read_kernel_counters()
    assert stats[name] == 7


@pytest.mark.parametrize(("records_per_poll", "readings"), [(0, 2), (5, 20)])
def test_the_counters_are_read_each_second_while_records_come(
    monkeypatch, records_per_poll, readings
) -> None:
    """Twenty seconds of half-second polls: a reading a second while records
    come, one every ten seconds while none do."""
    stats = Stats()
    source = EventSource(ProbeOptions(), stats)
    pipeline = Pipeline(source, [], stats)
    polls = 0

    def poll(timeout_ms: int) -> list:
        nonlocal polls
        polls += 1
        stats["events"] += records_per_poll
        return []

    read = []
    monkeypatch.setattr(source, "poll", poll)
    monkeypatch.setattr(source, "kernel_counters", lambda: read.append(1) or counters())
    monkeypatch.setattr("probe.pipeline.time.monotonic", lambda: 0.5 * polls)
    pipeline.run(lambda: polls >= 40)
    assert len(read) == readings
