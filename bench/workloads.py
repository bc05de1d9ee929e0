"""What the benchmark runs: the workloads, the configurations compared on
each, and how long (full run, or ``BENCH_QUICK=1`` for a smoke run)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    server: str  # which of the benchmark's servers: nginx, python or chain
    front: str  # service.name of the server the load generator calls
    new_connections: bool  # one connection per request, else kept alive
    rates: tuple[int, ...]  # fixed rates, requests/s, for latency
    sdk: bool = False  # also measured traced in-process by the OpenTelemetry SDK
    about: str = ""


WORKLOADS = (
    Workload(
        "nginx-keepalive", "nginx", "nginx", False, (1000, 5000),
        about="nginx, 1 worker, 25-byte static file, kept-alive connections",
    ),
    Workload(
        "nginx-close", "nginx", "nginx", True, (1000, 5000),
        about="the same, a new connection per request",
    ),
    Workload(
        "python", "python", "bench-python", False, (1000, 5000),
        about="Python ThreadingHTTPServer, kept-alive connections",
    ),
    # The chain saturates at 4-5 k requests/s here: 5,000/s is past it.
    Workload(
        "chain", "chain", "bench-a", False, (1000,), sdk=True,
        about="client -> Python service A -> Python service B, kept-alive connections",
    ),
)  # fmt: skip

NONE, FLOOR, PROBE, SDK = "none", "floor", "probe", "sdk"
KERNEL = "kernel"  # the phase measured with the kernel's BPF run-time statistics on
CONFIGS = (NONE, FLOOR, PROBE, SDK)
CONFIG_ABOUT = {
    NONE: "no tracing",
    FLOOR: "the probe's tracepoints with BPF programs that return at once",
    PROBE: "probe run, exporting OTLP over its default protocol (http/protobuf) to a local "
    "sink; the load generator is excluded (--exclude-comm) unless meta.load_generator_traced",
    SDK: "the services traced in-process by the OpenTelemetry Python SDK (chain only)",
}


def config_order(repeat: int) -> tuple[str, ...]:
    """The configurations in the order of one repeat: rotated each repeat,
    so none is always first (cold) or always last."""
    shift = repeat % len(CONFIGS)
    return CONFIGS[shift:] + CONFIGS[:shift]


def measured_with(workload: Workload, config: str) -> bool:
    return config != SDK or workload.sdk


@dataclass(frozen=True, slots=True)
class Settings:
    repeats: int = 3
    seconds: float = 2.0  # each saturation and fixed-rate run, at least
    # ... and a fixed-rate run lasts until it has made this many requests: its
    # p99 is then the 50th-worst latency or beyond, not the 20th (2,000
    # requests at 1,000/s moved the p99 ratios by up to 0.36 from run to run),
    # and the run's start and drain weigh on the probe's CPU per request as
    # they do at 2,500/s, not more.
    min_requests: int = 5000
    kernel_seconds: float = 1.5  # each run with BPF run-time statistics on
    profile_seconds: float = 8.0
    connections: int = 16  # wrk's, at saturation
    quick: bool = False
    # The probe traces wrk and h2load too: two spans per request, not one.
    trace_load_generator: bool = False
    # The probe's --max-exchange-rate; None: its default (probe.config).
    exchange_rate: int | None = None
    time_limit_s: float = 900.0  # the whole benchmark, then it stops and cleans up

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> Settings:
        """Full by default; ``BENCH_QUICK=1`` for a smoke run of about a minute;
        ``BENCH_REPEATS`` and ``BENCH_SECONDS`` override either;
        ``BENCH_TRACE_LOAD=1`` has the probe trace the load generator too;
        ``BENCH_EXCHANGE_RATE`` sets the probe's exchange rate limit (0: none)."""
        settings = cls()
        if environ.get("BENCH_QUICK", "") not in ("", "0"):
            settings = replace(
                settings,
                repeats=1,
                seconds=1.0,
                min_requests=0,
                kernel_seconds=1.0,
                profile_seconds=3.0,
                quick=True,
                time_limit_s=300.0,
            )
        if environ.get("BENCH_TRACE_LOAD", "") not in ("", "0"):
            settings = replace(settings, trace_load_generator=True)
        if environ.get("BENCH_EXCHANGE_RATE"):
            settings = replace(settings, exchange_rate=int(environ["BENCH_EXCHANGE_RATE"]))
        if environ.get("BENCH_REPEATS"):
            settings = replace(settings, repeats=int(environ["BENCH_REPEATS"]))
        if environ.get("BENCH_SECONDS"):
            settings = replace(settings, seconds=float(environ["BENCH_SECONDS"]))
        if settings.repeats < 1 or settings.seconds <= 0:
            raise ValueError("BENCH_REPEATS must be at least 1 and BENCH_SECONDS positive")
        return settings

    def fixed_rate_seconds(self, rate: int) -> float:
        """How long a run at ``rate`` requests/s lasts."""
        return max(self.seconds, self.min_requests / rate)
