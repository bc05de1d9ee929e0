"""Issue 6's targets, read from a built report and judged on the median
over repeats: met, not met, or not measured. Printed next to the figures;
never asserted (timings are not test results)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from bench.report import median
from bench.workloads import KERNEL, PROBE

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
}


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    op: str  # one of _OPS: measured OP limit is met
    limit: float
    unit: str
    # Where the figure is in a report: (place, median or None) for each place.
    places: Callable[[Mapping], Iterator[tuple[str, float | None]]]


def _each_phase(config: str, metric: str, phase_wanted: Callable[[str], bool]):
    def places(report: Mapping) -> Iterator[tuple[str, float | None]]:
        for workload, phases in report["workloads"].items():
            for phase in phases:
                if phase_wanted(phase):
                    value = median(phases, phase, "configs", config, metric)
                    yield f"{workload} {phase}", value

    return places


def _each_ratio(pair: str, metric: str, phase_wanted: Callable[[str], bool]):
    def places(report: Mapping) -> Iterator[tuple[str, float | None]]:
        for workload, phases in report["workloads"].items():
            for phase in phases:
                if phase_wanted(phase):
                    yield f"{workload} {phase}", median(phases, phase, "ratios", pair, metric)

    return places


def _probe(metric: str):
    def places(report: Mapping) -> Iterator[tuple[str, float | None]]:
        yield "probe process", median(report, "probe", metric)

    return places


def _sdk_share(metric: str):
    def places(report: Mapping) -> Iterator[tuple[str, float | None]]:
        for workload, comparison in report["sdk_comparison"].items():
            value = median(comparison, metric, "probe_share_of_sdk")
            yield f"{workload} {comparison['phase']} {metric}", value

    return places


def _is_rate_phase(phase: str) -> bool:
    return phase.startswith("rate_")


def _is_kernel_phase(phase: str) -> bool:
    return phase == KERNEL


# Kernel time is judged twice: as the statistics measure it, and net of what
# they cost (bench.report.net_kernel_time), which on this VM's paravirtual
# clock is about 50 ns of every program run.
TARGETS = (
    Target(
        "kernel time per request", "<=", 1000, "ns",
        _each_phase(PROBE, "kernel_ns_per_request", _is_kernel_phase),
    ),
    Target(
        "kernel time per request (stretch)", "<=", 500, "ns",
        _each_phase(PROBE, "kernel_ns_per_request", _is_kernel_phase),
    ),
    Target(
        "kernel time per request, net of the statistics' cost", "<=", 1000, "ns",
        _each_phase(PROBE, "kernel_net_ns_per_request", _is_kernel_phase),
    ),
    Target(
        "kernel time per request, net of the statistics' cost (stretch)", "<=", 500, "ns",
        _each_phase(PROBE, "kernel_net_ns_per_request", _is_kernel_phase),
    ),
    Target(
        "probe CPU per request", "<=", 10, "µs",
        _each_phase(PROBE, "cpu_us_per_request", _is_rate_phase),
    ),
    Target("probe RSS steady", "<=", 100, "MB", _probe("rss_steady_mb")),
    Target(
        "completeness at 5,000 requests/s", ">=", 1.0, "",
        _each_phase(PROBE, "completeness", lambda p: p == "rate_5000"),
    ),
    Target(
        "kernel events lost at 5,000 requests/s", "<=", 0, "",
        _each_phase(PROBE, "events_lost", lambda p: p == "rate_5000"),
    ),
    Target(
        "saturated throughput, probe/floor", ">=", 0.9, "",
        _each_ratio("probe/floor", "rps", lambda p: p == "saturation"),
    ),
    Target(
        "p99 at 1,000 requests/s, probe/floor", "<=", 1.1, "",
        _each_ratio("probe/floor", "p99_us", lambda p: p == "rate_1000"),
    ),
    Target("latency added, probe/SDK", "<", 0.2, "", _sdk_share("p50_us")),
    Target("ready after start", "<=", 2.0, "s", _probe("ready_s")),
)  # fmt: skip


def evaluate(report: Mapping, targets: tuple[Target, ...] = TARGETS) -> list[dict[str, object]]:
    """One verdict per target and place: ``met`` is True, False, or None
    when the figure was not measured."""
    verdicts: list[dict[str, object]] = []
    for target in targets:
        for where, value in target.places(report):
            unit = f" {target.unit}" if target.unit else ""
            verdicts.append(
                {
                    "target": target.name,
                    "limit": f"{target.op} {target.limit:g}{unit}",
                    "where": where,
                    "measured": value,
                    "met": None if value is None else _OPS[target.op](value, target.limit),
                }
            )
    return verdicts
