"""The benchmark's readers of tool output, on output captured from the real
tools (wrk 4.1, h2load 1.52, py-spy 0.4, prometheus_client, Linux /proc)."""

from __future__ import annotations

import pytest

from bench import load, parse
from bench.load import connections_for, h2load_argv, rate_period

WRK_KEEPALIVE = """\
Running 2s test @ http://127.0.0.1:18999/index.html
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   188.85us   90.29us   2.23ms   97.52%
    Req/Sec    86.31k     7.10k   94.74k    65.00%
  171252 requests in 2.00s, 39.03MB read
Requests/sec:  85608.54
Transfer/sec:     19.51MB
"""

WRK_ERRORS = """\
Running 1s test @ http://127.0.0.1:18999/nope
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   154.13us   85.96us   2.16ms   99.15%
    Req/Sec   106.30k     2.80k  109.86k    72.73%
  115982 requests in 1.10s, 34.07MB read
  Socket errors: connect 0, read 12, write 3, timeout 1
  Non-2xx or 3xx responses: 115900
Requests/sec: 105425.53
Transfer/sec:     30.97MB
"""

H2LOAD = """\
starting benchmark...
spawning thread #0: 10 total client(s). 30000 total requests
Application protocol: http/1.1

finished in 3.00s, 1000.00 req/s, 233.40KB/s
requests: 3000 total, 3010 started, 3000 done, 2990 succeeded, 10 failed, 0 errored, 0 timeout
status codes: 2990 2xx, 0 3xx, 10 4xx, 0 5xx
traffic: 700.20KB (717000) total, 536.13KB (549000) headers (space savings 0.00%), 14.65KB ...
                     min         max         mean         sd        +/- sd
time for request:       77us       446us       241us        50us    80.17%
"""

PROMETHEUS = """\
# HELP probe_events_total Kernel events read from the ring buffer
# TYPE probe_events_total counter
probe_events_total 12345.0
# HELP probe_events_lost_total Kernel events lost before user space read them
# TYPE probe_events_lost_total counter
probe_events_lost_total 7.0
probe_export_duration_seconds_count 3.0
probe_export_duration_seconds_sum 0.0125
probe_resident_memory_bytes 2.151424e+08
python_info{implementation="CPython",major="3"} 1.0
"""

STATUS = """\
Name:\tpython
VmPeak:\t  400000 kB
VmHWM:\t  278120 kB
VmRSS:\t  210124 kB
Threads:\t5
"""

FDINFO = """\
pos:\t0
flags:\t02000002
mnt_id:\t17
prog_type:\t5
prog_jited:\t1
prog_tag:\t59f4a931744dcdc6
prog_id:\t8921
run_time_ns:\t123456
run_cnt:\t789
recursion_misses:\t0
"""

MAIN = "<module> (probe/__main__.py);main (probe/cli.py);run (probe/pipeline.py)"
PY_SPY_RAW = f"""\
{MAIN};poll (probe/kernel/loader.py) 6
{MAIN};handle (probe/pipeline.py) 3
_bootstrap (threading.py);run (threading.py);_run (probe/export/batch.py) 1
f (x.py);f (x.py) 2
"""


def test_wrk_keepalive() -> None:
    assert parse.parse_wrk(WRK_KEEPALIVE) == parse.WrkResult(
        requests=171252, seconds=2.0, rps=85608.54, socket_errors=0, non_2xx=0
    )


def test_wrk_errors_and_non_2xx() -> None:
    result = parse.parse_wrk(WRK_ERRORS)
    assert (result.requests, result.socket_errors, result.non_2xx) == (115982, 16, 115900)
    assert result.ok_requests == 82
    assert result.seconds == pytest.approx(1.1)


def test_wrk_time_units() -> None:
    text = WRK_KEEPALIVE.replace("in 2.00s", "in 1.50m")
    assert parse.parse_wrk(text).seconds == pytest.approx(90.0)


def test_wrk_without_result_says_so() -> None:
    with pytest.raises(parse.ParseError, match="request count"):
        parse.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_h2load_summary() -> None:
    assert parse.parse_h2load(H2LOAD) == parse.H2loadResult(
        total=3000, succeeded=2990, failed=10, errored=0, timeout=0, seconds=3.0, rps=1000.0
    )


def test_h2load_log_keeps_successes_only() -> None:
    log = "1795627294324833\t200\t222\n1795627294324875\t404\t999\n1795627294324871\t301\t339\n"
    assert parse.parse_h2load_log(log) == [222, 339]


def test_prometheus_samples() -> None:
    samples = parse.parse_prometheus(PROMETHEUS)
    assert samples["probe_events_total"] == 12345.0
    assert samples["probe_events_lost_total"] == 7.0
    assert samples["probe_resident_memory_bytes"] == 215142400.0
    assert samples['python_info{implementation="CPython",major="3"}'] == 1.0
    assert len(samples) == 6


def test_status_fields() -> None:
    assert parse.status_kib(STATUS, "VmRSS") == 210124
    assert parse.status_kib(STATUS, "VmHWM") == 278120


def test_fdinfo_of_a_bpf_program() -> None:
    info = parse.parse_fdinfo(FDINFO)
    assert (info["prog_id"], info["run_time_ns"], info["run_cnt"]) == ("8921", "123456", "789")


def test_collapsed_profile_own_and_inclusive() -> None:
    profile = parse.parse_collapsed(PY_SPY_RAW)
    assert profile.samples == 12
    assert profile.own["poll (probe/kernel/loader.py)"] == 6
    assert profile.inclusive["run (probe/pipeline.py)"] == 9
    assert profile.inclusive["f (x.py)"] == 2  # recursion counted once per sample
    assert profile.top(profile.own, 2) == [
        ("poll (probe/kernel/loader.py)", 0.5),
        ("handle (probe/pipeline.py)", 0.25),
    ]


# py-spy --native: a compiled function's frames are its C names; the first
# line's leaf is the C runtime's, not a function of the probe's.
PY_SPY_NATIVE = f"""\
{MAIN};CPyPy_pipeline___Pipeline___run (__native_hotpath.c);\
CPyDef_pipeline___Pipeline___run (__native_hotpath.c);\
CPyDef_http1___MessageStream____idle (__native_hotpath.c);Py_DECREF (object.h) 3
{MAIN};CPyPy_pipeline___Pipeline___run (__native_hotpath.c);\
CPyDef_pipeline___Pipeline___run (__native_hotpath.c);\
CPyDef_batch____attributes_size (__native_hotpath.c) 1
{MAIN};CPyDef_other___f (__native_other.c) 1
"""


def test_compiled_frames_are_named_as_interpreted_ones() -> None:
    sources = parse.compiled_sources(
        ["probe.pipeline", "probe.protocol.http1", "probe.export.batch"]
    )
    profile = parse.parse_collapsed(PY_SPY_NATIVE, sources)
    assert profile.inclusive["Pipeline.run (probe/pipeline.py)"] == 4  # once a sample
    assert profile.inclusive["MessageStream._idle (probe/protocol/http1.py)"] == 3
    assert profile.own["Py_DECREF (object.h)"] == 3
    assert profile.own["_attributes_size (probe/export/batch.py)"] == 1
    # A module that was not compiled here keeps its C name.
    assert profile.own["CPyDef_other___f (__native_other.c)"] == 1


def test_compiled_frames_keep_their_c_names_without_sources() -> None:
    profile = parse.parse_collapsed(PY_SPY_NATIVE)
    assert profile.own["CPyDef_batch____attributes_size (__native_hotpath.c)"] == 1


def test_empty_profile_has_no_top() -> None:
    profile = parse.parse_collapsed("")
    assert (profile.samples, profile.top(profile.own, 5)) == (0, [])


@pytest.mark.parametrize(
    ("rate", "expected"),
    [(1000, (1, 1)), (5000, (5, 1)), (500, (5, 10)), (250, (25, 100)), (3, (3, 1000))],
)
def test_rate_period(rate: int, expected: tuple[int, int]) -> None:
    assert rate_period(rate) == expected


def test_connections_for_rate() -> None:
    assert [connections_for(rate) for rate in (500, 1000, 5000)] == [1, 1, 5]


def test_h2load_argv_keepalive_and_new_connections() -> None:
    assert h2load_argv("http://127.0.0.1:1/", 5000, 2, False, "/t/log") == [
        "h2load", "--h1", "--log-file=/t/log", "-c5", "--rps=1000", "-D2000ms",
        "http://127.0.0.1:1/",
    ]  # fmt: skip
    assert h2load_argv("http://127.0.0.1:1/", 1000, 1.5, True, "/t/log") == [
        "h2load", "--h1", "--log-file=/t/log", "-r1", "--rate-period=1ms", "-n1500", "-c1500",
        "http://127.0.0.1:1/",
    ]  # fmt: skip


def test_wrk_argv_whole_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    ran = []
    monkeypatch.setattr(load, "run_tool", lambda argv, timeout: ran.append(argv) or WRK_KEEPALIVE)
    result = load.saturate("http://127.0.0.1:1/", 0.4, 16, True)
    assert ran == [["wrk", "-H", "Connection: close", "-t1", "-c16", "-d1s", "http://127.0.0.1:1/"]]
    assert (result.requests, result.rps) == (171252, 85626.0)
