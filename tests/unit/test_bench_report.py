"""The benchmark's arithmetic: percentiles, summaries, comparisons paired by
repeat, per-run figures, the report's ratios and the target verdicts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import figures, harness, report, targets
from bench.stats import Summary, paired_differences, paired_ratios, percentile, summarize
from bench.workloads import CONFIGS, Settings, config_order


def test_percentile_nearest_rank() -> None:
    values = [5, 1, 4, 2, 3, 10, 9, 8, 7, 6]
    assert percentile(values, 0.5) == 5
    assert percentile(values, 0.99) == 10
    assert percentile(values, 0.1) == 1
    assert percentile([42], 0.99) == 42


def test_percentile_refuses_nothing() -> None:
    with pytest.raises(ValueError):
        percentile([], 0.5)
    with pytest.raises(ValueError):
        percentile([1], 0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=1), st.floats(0.01, 1.0))
def test_percentile_is_a_value_with_enough_below(values: list[int], fraction: float) -> None:
    found = percentile(values, fraction)
    assert found in values
    assert sum(v <= found for v in values) >= fraction * len(values)
    assert sum(v < found for v in values) < fraction * len(values)


def test_summarize() -> None:
    assert summarize([3.0, 1.0, 2.0, 10.0]) == Summary(1.0, 2.5, 10.0, 4)
    assert summarize([]) is None
    assert summarize([2.0]).as_dict() == {"min": 2.0, "median": 2.0, "max": 2.0, "n": 1}


def test_pairs_only_within_a_repeat() -> None:
    probe = {0: 40.0, 1: 45.0, 2: 50.0}
    floor = {0: 50.0, 2: 0.0, 3: 60.0}
    assert paired_ratios(probe, floor) == {0: 0.8}  # 1, 3 unpaired; 2 divides by zero
    assert paired_differences(probe, floor) == {0: -10.0, 2: 50.0}


def test_span_figures() -> None:
    before = {"nginx/SERVER": 10, "h2load/CLIENT": 10, "python3.11/CLIENT": 1}
    after = {"nginx/SERVER": 1010, "h2load/CLIENT": 1008, "python3.11/CLIENT": 2}
    assert figures.span_figures(before, after, "nginx", 1000) == {
        "completeness": 1.0,
        "spans_per_request": 1.999,
    }
    assert figures.span_figures(before, after, "nginx", 0) == {}


def test_probe_figures() -> None:
    before = {
        figures.EVENTS: 100.0,
        figures.EVENTS_LOST: 1.0,
        figures.SPANS_PRODUCED: 10.0,
        figures.SPANS_EXPORTED: 10.0,
    }
    after = {
        figures.EVENTS: 8100.0,
        figures.EVENTS_LOST: 5.0,
        figures.EXCHANGES_SHED: 300.0,
        figures.SPANS_PRODUCED: 2010.0,
        figures.SPANS_EXPORTED: 2000.0,
        figures.SPANS_DROPPED: 10.0,
    }
    assert figures.probe_figures(before, after, cpu_seconds=0.05, requests=1000) == {
        "events_lost": 4.0,
        "exchanges_shed": 300.0,
        "spans_dropped": 10.0,
        "spans_produced": 2000.0,
        "spans_exported": 1990.0,
        "cpu_us_per_request": 50.0,
        "cpu_s_per_1000_requests": 0.05,
        "events_per_request": 8.0,
    }


def test_kernel_figures() -> None:
    assert figures.kernel_figures(2_500_000, 40_000, 5000) == {
        "kernel_ns_per_request": 500.0,
        "bpf_runs_per_request": 8.0,
    }
    assert figures.kernel_figures(10, 1, 0) == {}


def test_config_order_rotates_so_each_config_leads_once() -> None:
    firsts = [config_order(repeat)[0] for repeat in range(len(CONFIGS))]
    assert sorted(firsts) == sorted(CONFIGS)
    assert all(sorted(config_order(r)) == sorted(CONFIGS) for r in range(7))


def test_settings_from_environment() -> None:
    assert Settings.from_environment({}) == Settings()
    quick = Settings.from_environment({"BENCH_QUICK": "1", "BENCH_REPEATS": "2"})
    assert (quick.quick, quick.repeats, quick.seconds) == (True, 2, 1.0)
    assert not Settings().trace_load_generator
    assert Settings.from_environment({"BENCH_TRACE_LOAD": "1"}).trace_load_generator
    assert Settings.from_environment({}).exchange_rate is None  # the probe's default
    assert Settings.from_environment({"BENCH_EXCHANGE_RATE": "0"}).exchange_rate == 0
    with pytest.raises(ValueError):
        Settings.from_environment({"BENCH_REPEATS": "0"})


def test_a_fixed_rate_run_lasts_for_its_requests() -> None:
    full = Settings()
    assert full.fixed_rate_seconds(1000) == 5.0  # 5,000 requests
    assert full.fixed_rate_seconds(5000) == full.seconds  # 10,000 in the 2 s
    quick = Settings.from_environment({"BENCH_QUICK": "1"})
    assert quick.fixed_rate_seconds(1000) == quick.seconds


def _samples() -> report.Samples:
    samples = report.Samples()
    for repeat, (none, floor, probe) in enumerate([(100.0, 80.0, 40.0), (90.0, 90.0, 45.0)]):
        for config, rps in (("none", none), ("floor", floor), ("probe", probe)):
            samples.add("w", "saturation", config, repeat, {"rps": rps})
    for repeat, (none, floor, probe, sdk) in enumerate([(50, 55, 60, 150), (40, 50, 80, 140)]):
        for config, p50 in (("none", none), ("floor", floor), ("probe", probe), ("sdk", sdk)):
            samples.add("w", "rate_1000", config, repeat, {"p50_us": p50, "p99_us": 2 * p50})
    samples.add("w", "rate_1000", "probe", 0, {"completeness": 1.0})
    samples.add("w", "kernel", "probe", 0, {"kernel_ns_per_request": 800.0})
    samples.add("w", "kernel", "probe", 0, {"bpf_runs_per_request": 10.0})
    samples.add("w", "kernel", "floor", 0, {"kernel_ns_per_request": 600.0})
    samples.add("w", "kernel", "floor", 0, {"bpf_runs_per_request": 12.0})
    return samples


def test_phase_report_ratios_and_added_latency() -> None:
    phase = report.phase_report(_samples(), "w", "saturation")
    assert phase["configs"]["probe"]["rps"] == {"min": 40.0, "median": 42.5, "max": 45.0, "n": 2}
    assert phase["ratios"]["probe/floor"]["rps"] == {"min": 0.5, "median": 0.5, "max": 0.5, "n": 2}
    assert phase["ratios"]["floor/none"]["rps"]["min"] == 0.8
    assert phase["ratios"]["floor/none"]["rps"]["max"] == 1.0
    assert "added_us" not in phase  # no latency at saturation
    latency = report.phase_report(_samples(), "w", "rate_1000")
    assert latency["added_us"]["probe-none"]["p50_us"] == {
        "min": 10.0, "median": 25.0, "max": 40.0, "n": 2,
    }  # fmt: skip
    assert latency["ratios"]["sdk/none"]["p99_us"]["median"] == pytest.approx(3.25)


def test_sdk_comparison_pairs_added_latency() -> None:
    comparison = report.sdk_comparison(_samples(), "w", "rate_1000")
    p50 = comparison["p50_us"]
    assert p50["probe_added_us"] == {"min": 10.0, "median": 25.0, "max": 40.0, "n": 2}
    assert p50["sdk_added_us"] == {"min": 100.0, "median": 100.0, "max": 100.0, "n": 2}
    assert p50["probe_share_of_sdk"] == {"min": 0.1, "median": 0.25, "max": 0.4, "n": 2}


def _document() -> dict:
    document = report.build(
        _samples(),
        {"ready_s": {0: 1.5, 1: 2.5, 2: 1.0}},
        {"repeats": 2},
        {},
        {"w": "rate_1000"},
    )
    return document


def test_net_kernel_time_takes_the_floors_time_per_run_from_each_probe_run() -> None:
    samples = _samples()
    # The floor's 600 ns over 12 runs: 50 ns to time a run; the probe ran 10 times.
    assert report.net_kernel_time(samples, "w") == {0: 300.0}
    # A repeat measured for one configuration only has no net figure.
    samples.add("w", "kernel", "probe", 1, {"kernel_ns_per_request": 900.0})
    samples.add("w", "kernel", "probe", 1, {"bpf_runs_per_request": 9.0})
    assert report.net_kernel_time(samples, "w") == {0: 300.0}
    phase = report.phase_report(samples, "w", "kernel")
    assert phase["configs"]["probe"]["kernel_net_ns_per_request"]["median"] == 300.0
    assert "kernel_net_ns_per_request" not in phase["configs"]["floor"]


def test_build_and_median_lookup() -> None:
    document = _document()
    assert report.median(document, "probe", "ready_s") == 1.5
    assert report.median(document, "workloads", "w", "kernel", "configs", "probe",
                         "kernel_ns_per_request") == 800.0  # fmt: skip
    assert report.median(document, "probe", "rss_steady_mb") is None


def test_targets_met_not_met_and_unmeasured() -> None:
    verdicts = {(v["target"], v["where"]): v for v in targets.evaluate(_document())}
    kernel = verdicts["kernel time per request", "w kernel"]
    assert (kernel["measured"], kernel["met"], kernel["limit"]) == (800.0, True, "<= 1000 ns")
    assert verdicts["kernel time per request (stretch)", "w kernel"]["met"] is False
    net = verdicts["kernel time per request, net of the statistics' cost (stretch)", "w kernel"]
    assert (net["measured"], net["met"]) == (300.0, True)
    assert verdicts["saturated throughput, probe/floor", "w saturation"]["met"] is False
    assert verdicts["ready after start", "probe process"]["met"] is True
    assert verdicts["probe RSS steady", "probe process"]["met"] is None
    share = verdicts["latency added, probe/SDK", "w rate_1000 p50_us"]
    assert (share["measured"], share["met"]) == (0.25, False)
    p99 = verdicts["p99 at 1,000 requests/s, probe/floor", "w rate_1000"]
    assert p99["measured"] == round((120 / 110 + 160 / 100) / 2, 4)  # summaries keep 4 digits


def test_summary_names_every_verdict() -> None:
    document = _document()
    verdicts = targets.evaluate(document)
    text = report.summary(document, verdicts)
    assert text.count("\n  [") == len(verdicts)
    assert "[not measured] probe RSS steady <= 100 MB" in text


def test_summary_says_which_exchange_limit_the_probe_ran_with() -> None:
    document = _document()

    def first_line() -> str:
        return report.summary(document, []).splitlines()[0]

    assert "exchange" not in first_line()  # a document from before the limit
    document["meta"]["probe_exchange_rate"] = 10_000
    assert first_line().endswith(
        ", and sheds exchanges over 10,000 a second (see completeness at saturation)"
    )
    document["meta"]["probe_cpu_pressure_limit"] = 0.1
    assert first_line().endswith(
        ", and sheds exchanges over 10,000 a second, fewer while the CPU is short (tasks"
        " waiting for one 10% of the time, under a fifth of it idle) (see completeness at"
        " saturation)"
    )
    document["meta"]["probe_export_queue"] = 2048
    assert first_line().endswith(
        ", and sheds exchanges over 10,000 a second, fewer while the CPU is short (tasks"
        " waiting for one 10% of the time, under a fifth of it idle) or the export's queue"
        " (2,048 spans) is three quarters full (see completeness at saturation)"
    )
    document["meta"]["probe_exchange_rate"] = 0
    assert first_line().endswith(", with no exchange rate limit")


def test_settle_returns_where_the_last_quiet_streak_began(monkeypatch) -> None:
    """The probe's CPU is charged up to where its spans stopped arriving: the
    quiet streak after that only confirms the end. A streak that breaks
    starts over."""
    monkeypatch.setattr(harness.time, "sleep", lambda seconds: None)
    counts = [0, 5, 10, 10, 12, *[12] * harness.SETTLE_CALM_READS]
    readings = iter(enumerate(counts))  # (CPU so far, spans so far)

    def quiet(before: tuple[int, int], after: tuple[int, int]) -> bool:
        return before[1] == after[1]

    settled, streak_start, last = harness.settle(lambda: next(readings), quiet, 60)
    assert settled
    assert streak_start == (4, 12)  # the spans' last arrival, not (2, 10)
    assert last == (len(counts) - 1, 12)
