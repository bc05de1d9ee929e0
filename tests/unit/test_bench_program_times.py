"""bench.programs' arithmetic: per-request shares of two readings of the
kernel's BPF statistics, their medians, and the summary's lines."""

from __future__ import annotations

import pytest

from bench.programs import TOTAL, Counters, PerRequest, format_summary, medians, per_request


def test_each_program_gets_its_share_of_the_requests_and_the_total_sums_them() -> None:
    before = {"exit": Counters(1_000, 10), "entry": Counters(500, 10)}
    after = {
        "exit": Counters(41_000, 210),  # 40,000 ns over 200 runs
        "entry": Counters(500, 10),  # did not run: left out
        "close": Counters(3_000, 30),  # new since the first reading
    }
    shares = per_request(before, after, requests=100)
    assert shares == {
        "exit": PerRequest(400.0, 2.0),
        "close": PerRequest(30.0, 0.3),
        TOTAL: PerRequest(430.0, 2.3),
    }
    assert shares["exit"].ns_per_run == 200.0


def test_no_request_answered_is_an_error_not_a_division() -> None:
    with pytest.raises(ValueError, match="no answer"):
        per_request({}, {"exit": Counters(1, 1)}, requests=0)


def test_medians_count_a_missing_program_as_no_time_and_put_the_most_first() -> None:
    readings = [
        {
            "exit": PerRequest(300.0, 2.0),
            "close": PerRequest(90.0, 1.0),
            TOTAL: PerRequest(390.0, 3.0),
        },
        {"exit": PerRequest(500.0, 2.0), TOTAL: PerRequest(500.0, 2.0)},
        {
            "exit": PerRequest(400.0, 2.0),
            "close": PerRequest(60.0, 1.0),
            TOTAL: PerRequest(460.0, 3.0),
        },
    ]
    summary = medians(readings)
    assert list(summary) == [TOTAL, "exit", "close"]
    assert summary["exit"] == PerRequest(400.0, 2.0)
    assert summary["close"] == PerRequest(60.0, 1.0)
    assert summary[TOTAL] == PerRequest(460.0, 3.0)


def test_the_summary_names_the_tree_and_each_program() -> None:
    text = format_summary(
        "/src/probe", {TOTAL: PerRequest(500.0, 2.0)}, readings=3, cpu_us=[9.5, 12.0, 10.25]
    )
    first, cpu = text.splitlines()[:2]
    assert first == "/src/probe (medians of 3 readings):"
    assert cpu == "  probe CPU 10.25 us/request (9.50-12.00)"  # median, then the range
    assert "500 ns/request" in text and "250 ns/run" in text and TOTAL in text
