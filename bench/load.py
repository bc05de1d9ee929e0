"""The load generators, both from Debian's packages: wrk at saturation and
h2load at a fixed rate.

hey was the first choice for the fixed rate, but it prints latencies in
seconds with four decimals (0.1 ms steps, in its summary and its CSV alike),
too coarse for nginx's tens of microseconds on loopback. h2load writes every
request's latency in microseconds to its ``--log-file``, and paces requests
either per kept-alive connection (``--rps``) or by opening connections at a
fixed rate (``-r``/``--rate-period``, one request each); p50 and p99 are
computed here from the log.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from bench import parse
from bench.procs import BenchError, run_tool
from bench.stats import percentile

_SLACK_S = 30  # a tool's own start and stop, on top of its run time
# Their process names: the probe leaves them untraced unless told otherwise
# (Settings.trace_load_generator). They stand for clients on other machines.
LOAD_GENERATORS = ("wrk", "h2load")


@dataclass(frozen=True, slots=True)
class Saturation:
    requests: int  # answered with 2xx/3xx
    rps: float


@dataclass(frozen=True, slots=True)
class FixedRate:
    requests: int  # answered with 2xx/3xx
    rps: float  # achieved
    p50_us: float
    p99_us: float


def saturate(url: str, seconds: float, connections: int, new_connections: bool) -> Saturation:
    """wrk, one thread, ``connections`` connections; with ``Connection: close``
    when each request is to use a new connection. wrk takes whole seconds."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", url]
    if new_connections:
        argv[1:1] = ["-H", "Connection: close"]
    result = parse.parse_wrk(run_tool(argv, seconds + _SLACK_S))
    return Saturation(requests=result.ok_requests, rps=result.ok_requests / result.seconds)


def connections_for(rate: int) -> int:
    """Kept-alive connections for a fixed rate: about 1,000 requests/s each,
    so no connection waits long for its previous answer."""
    return max(1, rate // 1000)


def rate_period(rate: int) -> tuple[int, int]:
    """``(connections per period, period in ms)`` giving ``rate`` new
    connections per second, with the shortest period that divides evenly."""
    for period_ms in (1, 10, 100, 1000):
        if rate * period_ms % 1000 == 0:
            return rate * period_ms // 1000, period_ms
    raise ValueError(f"rate {rate}/s needs a whole number of connections per second")


def h2load_argv(url: str, rate: int, seconds: float, new_connections: bool, log: str) -> list[str]:
    argv = ["h2load", "--h1", f"--log-file={log}"]
    if new_connections:
        per_period, period_ms = rate_period(rate)
        total = round(rate * seconds)
        argv += [f"-r{per_period}", f"--rate-period={period_ms}ms", f"-n{total}", f"-c{total}"]
    else:
        connections = connections_for(rate)
        duration = f"-D{round(seconds * 1000)}ms"  # h2load takes whole numbers
        argv += [f"-c{connections}", f"--rps={rate / connections:g}", duration]
    return argv + [url]


def fixed_rate(url: str, rate: int, seconds: float, new_connections: bool, log: str) -> FixedRate:
    """h2load at ``rate`` requests/s for ``seconds``; ``log`` is a scratch file."""
    if os.path.exists(log):
        os.unlink(log)  # h2load appends
    argv = h2load_argv(url, rate, seconds, new_connections, log)
    summary = parse.parse_h2load(run_tool(argv, seconds + _SLACK_S))
    with open(log, encoding="ascii") as f:
        latencies = parse.parse_h2load_log(f.read())
    if not latencies:
        raise BenchError(f"h2load got no successful answer from {url}")
    return FixedRate(
        requests=summary.succeeded,
        rps=summary.succeeded / summary.seconds if summary.seconds else 0.0,
        p50_us=percentile(latencies, 0.50),
        p99_us=percentile(latencies, 0.99),
    )
