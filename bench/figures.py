"""The figures of one measured run, computed from what was read before and
after it: completeness from the sink's span counts, the probe's CPU and
losses from /proc and its metrics, kernel time from BPF run-time totals.
Pure functions, so the arithmetic is tested on its own."""

from __future__ import annotations

from collections.abc import Mapping

# The probe's counters, as its /metrics names them.
SPANS_PRODUCED = "probe_spans_produced_total"
SPANS_EXPORTED = "probe_spans_exported_total"
SPANS_DROPPED = "probe_spans_dropped_total"
EVENTS = "probe_events_total"
EVENTS_LOST = "probe_events_lost_total"
EXCHANGES_SHED = "probe_exchanges_shed_total"


def _delta(after: Mapping[str, float], before: Mapping[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def span_figures(
    before: Mapping[str, int], after: Mapping[str, int], front: str, requests: int
) -> dict[str, float]:
    """From the sink's ``SERVICE/KIND`` counts around a run: completeness
    (SERVER spans of the service the load generator called, per request it
    got an answer to) and spans of any kind and service per request."""
    if requests <= 0:
        return {}
    key = f"{front}/SERVER"
    total = sum(after.values()) - sum(before.values())
    return {
        "completeness": (after.get(key, 0) - before.get(key, 0)) / requests,
        "spans_per_request": total / requests,
    }


def probe_figures(
    before: Mapping[str, float],
    after: Mapping[str, float],
    cpu_seconds: float,
    requests: int,
) -> dict[str, float]:
    """From the probe's metrics and CPU time around a run: its CPU per
    request (µs; ``cpu_s_per_1000_requests`` is the same figure in the
    issue's unit), kernel events read and lost, exchanges shed over the
    rate limit, spans dropped."""
    figures = {
        "events_lost": _delta(after, before, EVENTS_LOST),
        "exchanges_shed": _delta(after, before, EXCHANGES_SHED),
        "spans_dropped": _delta(after, before, SPANS_DROPPED),
        "spans_produced": _delta(after, before, SPANS_PRODUCED),
        "spans_exported": _delta(after, before, SPANS_EXPORTED),
    }
    if requests > 0:
        figures["cpu_us_per_request"] = cpu_seconds * 1e6 / requests
        figures["cpu_s_per_1000_requests"] = cpu_seconds * 1000 / requests
        figures["events_per_request"] = _delta(after, before, EVENTS) / requests
    return figures


def kernel_figures(run_time_ns: int, run_count: int, requests: int) -> dict[str, float]:
    """Time in the BPF programs and program runs, per request served."""
    if requests <= 0:
        return {}
    return {
        "kernel_ns_per_request": run_time_ns / requests,
        "bpf_runs_per_request": run_count / requests,
    }
