"""`make bench`: what the probe costs, measured side by side on this machine.

Starts its own servers on 127.0.0.1 (a private nginx with one worker, Python
services) and an OTLP sink, then for each repeat visits every configuration
(`workloads.CONFIGS`, rotated each repeat) and runs every workload under it:
wrk at saturation, h2load at fixed rates, and, where BPF programs are
attached, a short run with the kernel's BPF run-time statistics on. Then it
profiles the probe's user space with py-spy under load, prints a summary and
writes one JSON document (stdout and ``bench/results/latest.json``).

Everything it starts is ended on the way out, on error or timeout too.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from bench import figures, load, observe, parse, report, targets
from bench.procs import BenchError, Child, free_port, wait_listening
from bench.service import BODY
from bench.workloads import (
    CONFIG_ABOUT,
    FLOOR,
    KERNEL,
    NONE,
    PROBE,
    SDK,
    WORKLOADS,
    Settings,
    Workload,
    config_order,
    measured_with,
)
from probe.compiled import MODULES
from probe.config import DEFAULT_CPU_PRESSURE_LIMIT, DEFAULT_EXCHANGE_RATE, ProbeConfig

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
# Spans leave in batches of 512, or after this delay. A second fills a batch
# at every rate measured, as the default five seconds does, and keeps the wait
# after each run (see settle) short; a shorter delay exports part-filled
# batches at 1,000 requests/s, which costs the probe and the SDK more per span.
SPAN_ENV = {"OTEL_BSP_SCHEDULE_DELAY": "1000"}
READY_TIMEOUT_S = 60
SETTLE_TIMEOUT_S = 20
SETTLE_POLL_S = 0.3
# Quiet reads in a row that end the wait: longer than the export delay, so a
# last part-filled batch still on its way is not taken for the end.
SETTLE_CALM_READS = math.ceil(int(SPAN_ENV["OTEL_BSP_SCHEDULE_DELAY"]) / 1000 / SETTLE_POLL_S) + 1
IDLE_CPU = 0.1  # share of a core below which the probe counts as idle
# With --gil, only samples of a working thread are kept: the probe works a
# tenth of the time at 5,000 requests/s, so 100 Hz left about 30 samples.
PROFILE_RATE_HZ = 500

T = TypeVar("T")
R = TypeVar("R", load.Saturation, load.FixedRate)


class Sink:
    """The counting OTLP receiver (`bench.sink`), asked over its stdin."""

    def __init__(self) -> None:
        self.child = Child("sink", [sys.executable, "-m", "bench.sink"], cwd=REPO, stdin=True)
        _, line = self.child.wait_for(lambda text: text.startswith("port "), READY_TIMEOUT_S)
        self.endpoint = f"http://127.0.0.1:{int(line.split()[1])}"  # OTLP/gRPC: the SDK's
        _, line = self.child.wait_for(lambda text: text.startswith("http_port "), 10)
        self.http_endpoint = f"http://127.0.0.1:{int(line.split()[1])}/v1/traces"

    def counts(self) -> dict[str, int]:
        self.child.send("counts\n")
        _, line = self.child.wait_for(lambda text: text.startswith("{"), 10)
        return json.loads(line)


def nginx_config(root: Path, port: int) -> str:
    return f"""worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root}/www;
    }}
}}
"""


class Servers:
    """The servers the load generators call, each started once for the whole run."""

    def __init__(self, stack: contextlib.ExitStack, scratch: Path, sink: Sink, sdk: bool) -> None:
        self._stack = stack
        self._scratch = scratch
        self.urls: dict[tuple[str, bool], str] = {}
        port = self._nginx()
        self.urls["nginx", False] = f"http://127.0.0.1:{port}/index.html"
        self.urls["python", False] = self._url(self._service("bench-python"))
        self.urls["chain", False] = self._url(
            self._service("bench-a", upstream=self._service("bench-b"))
        )
        if sdk:
            sdk_b = self._service("bench-b", sdk=sink.endpoint)
            self.urls["chain", True] = self._url(
                self._service("bench-a", upstream=sdk_b, sdk=sink.endpoint)
            )

    def url(self, workload: Workload, config: str) -> str:
        return self.urls[workload.server, config == SDK]

    @staticmethod
    def _url(port: int) -> str:
        return f"http://127.0.0.1:{port}/"

    def _nginx(self) -> int:
        root = self._scratch / "nginx"
        (root / "www").mkdir(parents=True)
        (root / "www" / "index.html").write_bytes(BODY)
        port = free_port()
        (root / "nginx.conf").write_text(nginx_config(root, port))
        child = self._stack.enter_context(
            Child(
                "nginx",
                ["nginx", "-c", str(root / "nginx.conf"), "-p", str(root), "-e", "stderr"],
            )
        )
        wait_listening(port, READY_TIMEOUT_S, child)
        return port

    def _service(self, name: str, upstream: int | None = None, sdk: str | None = None) -> int:
        argv = [sys.executable, "-m", "bench.service", "--port", "0"]
        if upstream is not None:
            argv += ["--next", f"127.0.0.1:{upstream}"]
        if sdk is not None:
            argv += ["--sdk", sdk]
        env = {**os.environ, **SPAN_ENV, "OTEL_SERVICE_NAME": name}
        child = self._stack.enter_context(Child(name, argv, env=env, cwd=REPO))
        _, line = child.wait_for(lambda text: text.startswith("port "), READY_TIMEOUT_S)
        return int(line.split()[1])


@dataclass(frozen=True, slots=True)
class Traced:
    """A running floor or probe: its process, and for the probe its metrics."""

    child: Child
    ready_s: float
    metrics_url: str | None = None


@contextlib.contextmanager
def floor() -> Iterator[Traced]:
    with Child("floor", [sys.executable, "-m", "bench.floor"], cwd=REPO) as child:
        at, _ = child.wait_for(lambda line: line.strip() == "ready", READY_TIMEOUT_S)
        yield Traced(child, at - child.started_at)


@contextlib.contextmanager
def probe(
    sink: Sink, settings: Settings, tree: Path = REPO, excluded: Sequence[str] = ()
) -> Iterator[Traced]:
    """`probe run` from ``tree`` (a checkout of this repository), exporting to
    ``sink``; ``excluded`` process names are never traced, as the load
    generators are unless ``settings`` say otherwise."""
    argv = [sys.executable, "-m", "probe", "run", "--metrics-address", "127.0.0.1:0"]
    argv += ["--otlp-endpoint", sink.http_endpoint]  # over the default protocol, http/protobuf
    if settings.exchange_rate is not None:
        argv += ["--max-exchange-rate", str(settings.exchange_rate)]
    names = list(excluded)
    if not settings.trace_load_generator:
        names += load.LOAD_GENERATORS
    for name in names:
        argv += ["--exclude-comm", name]
    with Child("probe", argv, env={**os.environ, **SPAN_ENV}, cwd=tree) as child:
        at, _ = child.wait_for(lambda line: line.strip() == "ready", READY_TIMEOUT_S)
        found = re.search(r"metrics on (http://\S+)/metrics", "\n".join(child.tail))
        if found is None:
            raise BenchError(child.failure("did not say where its metrics are"))
        yield Traced(child, at - child.started_at, found[1])


def settle(
    read: Callable[[], T], quiet: Callable[[T, T], bool], timeout: float
) -> tuple[bool, T, T]:
    """Poll ``read`` every 0.3 s until SETTLE_CALM_READS intervals in a row
    were ``quiet`` (1.5 s, longer than the export delay). Returns whether that
    happened within ``timeout``, the value read where the last quiet streak
    began (what came before it is the drain; the streak only confirms its
    end), and the last value read."""
    deadline = time.monotonic() + timeout
    value = streak_start = read()
    calm = 0
    while calm < SETTLE_CALM_READS and time.monotonic() < deadline:
        time.sleep(SETTLE_POLL_S)
        previous, value = value, read()
        if not quiet(previous, value):
            calm = 0
            continue
        if calm == 0:
            streak_start = previous
        calm += 1
    return calm >= SETTLE_CALM_READS, streak_start, value


class Bench:
    def __init__(self, settings: Settings, scratch: Path, sink: Sink, servers: Servers) -> None:
        self.settings = settings
        self.scratch = scratch
        self.sink = sink
        self.servers = servers
        self.samples = report.Samples()
        self.probe_figures: dict[str, dict[int, float]] = defaultdict(dict)
        self.notes: list[str] = []
        self._log = str(scratch / "h2load.log")

    def say(self, text: str) -> None:
        print(f"bench: {time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)

    def warm_up(self) -> None:
        """A second of saturation on each server, untraced and discarded:
        the first requests of a fresh server (imports, threads, caches) would
        otherwise weigh on whichever configuration comes first."""
        self.say("warming up the servers")
        for workload in WORKLOADS:
            for config in (NONE, SDK) if workload.sdk else (NONE,):
                load.saturate(
                    self.servers.url(workload, config),
                    1,
                    self.settings.connections,
                    workload.new_connections,
                )

    # -- one repeat, one configuration -------------------------------------

    def visit(self, repeat: int, config: str) -> None:
        workloads = [w for w in WORKLOADS if measured_with(w, config)]
        self.say(f"repeat {repeat + 1}/{self.settings.repeats}: {config}")
        if config == PROBE:
            with probe(self.sink, self.settings) as traced:
                self.probe_figures["ready_s"][repeat] = traced.ready_s
                self.probe_figures["verified_instructions"][repeat] = (
                    observe.bpf_verified_instructions(traced.child.pid)
                )
                for workload in workloads:
                    self.measure(workload, config, repeat, traced)
                memory = observe.memory(traced.child.pid)
                self.probe_figures["rss_steady_mb"][repeat] = memory.rss_kib / 1024
                self.probe_figures["rss_peak_mb"][repeat] = memory.peak_kib / 1024
        elif config == FLOOR:
            with floor() as traced:
                self.probe_figures["floor_ready_s"][repeat] = traced.ready_s
                for workload in workloads:
                    self.measure(workload, config, repeat, traced)
        else:
            for workload in workloads:
                self.measure(workload, config, repeat, None)

    def measure(self, workload: Workload, config: str, repeat: int, traced: Traced | None) -> None:
        url = self.servers.url(workload, config)
        seconds = self.settings.seconds
        self.say(f"  {workload.name}")

        def record(phase: str, values: dict[str, float]) -> None:
            self.samples.add(workload.name, phase, config, repeat, values)

        result, seen = self.observed(
            workload,
            config,
            traced,
            lambda: load.saturate(
                url, seconds, self.settings.connections, workload.new_connections
            ),
        )
        record("saturation", {"rps": result.rps, **seen})
        for rate in workload.rates:
            fixed, seen = self.observed(
                workload,
                config,
                traced,
                functools.partial(
                    load.fixed_rate,
                    url,
                    rate,
                    self.settings.fixed_rate_seconds(rate),
                    workload.new_connections,
                    self._log,
                ),
            )
            record(
                f"rate_{rate}",
                {"p50_us": fixed.p50_us, "p99_us": fixed.p99_us, "achieved_rps": fixed.rps, **seen},
            )
        if traced is not None:
            record(KERNEL, self.kernel_time(workload, url, traced))

    def observed(
        self,
        workload: Workload,
        config: str,
        traced: Traced | None,
        run: Callable[[], R],
    ) -> tuple[R, dict[str, float]]:
        """Run the load; where spans are made, wait until they stop arriving
        (and the probe is idle: its backlog belongs to this run, not the
        next), then compute completeness and the probe's own costs.

        The wait watches the sink and the CPU clock only: scraping the probe's
        metrics is HTTP too, which the probe would trace, so they are read
        once before and once after."""
        if config not in (PROBE, SDK):
            return run(), {}
        pid = traced.child.pid if traced is not None else None

        def read() -> tuple[dict[str, int], float]:
            return self.sink.counts(), observe.cpu_seconds(pid) if pid else 0.0

        def quiet(
            before: tuple[dict[str, int], float], after: tuple[dict[str, int], float]
        ) -> bool:
            return before[0] == after[0] and after[1] - before[1] < IDLE_CPU * SETTLE_POLL_S

        metrics_url = traced.metrics_url if traced is not None else None
        metrics_before = observe.probe_metrics(metrics_url) if metrics_url else {}
        counts_before, cpu_before = read()
        result = run()
        # The probe's CPU up to where the spans stopped arriving: the quiet
        # streak after it only confirms that they did.
        settled, (_, cpu_after), (counts_after, _) = settle(read, quiet, SETTLE_TIMEOUT_S)
        if not settled:
            self.notes.append(f"{workload.name}/{config}: spans still arriving after the wait")
        seen = figures.span_figures(counts_before, counts_after, workload.front, result.requests)
        if metrics_url:
            metrics_after = observe.probe_metrics(metrics_url)
            cpu = cpu_after - cpu_before
            seen |= figures.probe_figures(metrics_before, metrics_after, cpu, result.requests)
        return result, seen

    def kernel_time(self, workload: Workload, url: str, traced: Traced) -> dict[str, float]:
        """Time in the attached BPF programs per request, at the highest fixed
        rate: the programs run for every process's syscalls, so the
        workload's share is the largest there."""
        with observe.bpf_stats():
            before = observe.bpf_run_time(traced.child.pid)
            result = load.fixed_rate(
                url,
                max(workload.rates),
                self.settings.kernel_seconds,
                workload.new_connections,
                self._log,
            )
            spent = observe.bpf_run_time(traced.child.pid) - before
        return figures.kernel_figures(spent.run_time_ns, spent.run_count, result.requests)

    # -- profile -------------------------------------------------------------

    def profile(self) -> dict[str, object]:
        """py-spy on the probe while nginx takes kept-alive requests at the highest rate."""
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.access(py_spy, os.X_OK):
            return {"skipped": "py-spy is not installed (pip install py-spy)"}
        workload, seconds = WORKLOADS[0], self.settings.profile_seconds
        rate = max(workload.rates)
        output = self.scratch / "py-spy.txt"
        self.say(f"profiling the probe with py-spy, {workload.name} at {rate}/s")
        with probe(self.sink, self.settings) as traced:
            cpu_before = observe.cpu_seconds(traced.child.pid)
            argv = [py_spy, "record", "--pid", str(traced.child.pid), "--format", "raw"]
            argv += ["--duration", f"{seconds:g}", "--rate", str(PROFILE_RATE_HZ)]
            # --native: the compiled hot path's own frames, not one opaque
            # call into it; --gil: only a thread holding the GIL is working.
            argv += ["--native", "--gil", "--nolineno", "--output", str(output)]
            with Child("py-spy", argv) as spy:
                load.fixed_rate(self.servers.url(workload, PROBE), rate, seconds, False, self._log)
                try:
                    spy.process.wait(seconds + 30)
                except subprocess.TimeoutExpired as error:
                    raise BenchError(spy.failure("did not finish")) from error
            cpu = observe.cpu_seconds(traced.child.pid) - cpu_before
        if not output.exists():
            return {"skipped": "py-spy wrote no profile: " + " ".join(spy.tail)}
        profile = parse.parse_collapsed(output.read_text(), parse.compiled_sources(MODULES))
        return {
            "workload": workload.name,
            "rate": rate,
            "seconds": seconds,
            "samples": profile.samples,
            # From the CPU clock: py-spy leaves out samples of threads without
            # the GIL (in epoll, or waiting for it), so its count is no CPU measure.
            "probe_cpu_cores": round(cpu / seconds, 3),
            "top_own": [
                {"frame": frame, "share": round(share, 4)}
                for frame, share in profile.top(profile.own, 15)
            ],
            # The probe's own functions only: the interpreter's and the
            # threads' entry frames are on every stack and say nothing.
            "top_inclusive": [
                {"frame": frame, "share": round(share, 4)}
                for frame, share in profile.top(profile.inclusive, 40)
                if "(probe/" in frame
            ][:15],
        }


def _tool_versions() -> dict[str, str]:
    versions = {}
    for name, argv in (
        ("nginx", ["nginx", "-v"]),
        ("wrk", ["wrk", "-v"]),
        ("h2load", ["h2load", "--version"]),
    ):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            versions[name] = (done.stdout + done.stderr).strip().splitlines()[0]
    return versions


class _TimeUp(Exception):
    pass


def _time_up(signum: int, frame: object) -> None:
    raise _TimeUp


def run(settings: Settings) -> dict[str, object]:
    """The whole benchmark; returns the report (with its target verdicts)."""
    if os.geteuid() != 0:
        raise BenchError("the benchmark attaches BPF programs: run it as root")
    started = time.monotonic()
    meta = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": settings.quick,
        "repeats": settings.repeats,
        "seconds": settings.seconds,
        "fixed_rate_min_requests": settings.min_requests,
        "kernel_seconds": settings.kernel_seconds,
        "wrk_connections": settings.connections,
        "load_generator_traced": settings.trace_load_generator,
        # Over it the probe sheds exchanges in the kernel (see completeness at saturation).
        "probe_exchange_rate": (
            DEFAULT_EXCHANGE_RATE if settings.exchange_rate is None else settings.exchange_rate
        ),
        # ... lowered while tasks wait for a CPU this share of the time.
        "probe_cpu_pressure_limit": float(
            os.environ.get("PROBE_CPU_PRESSURE_LIMIT") or DEFAULT_CPU_PRESSURE_LIMIT
        ),
        # ... and while its export queue of this many spans is three quarters full.
        "probe_export_queue": int(
            os.environ.get("OTEL_BSP_MAX_QUEUE_SIZE") or ProbeConfig().bsp_max_queue_size
        ),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "tools": _tool_versions(),
        "configs": CONFIG_ABOUT,
        "workloads": {w.name: w.about for w in WORKLOADS},
        "bsp_schedule_delay_ms": int(SPAN_ENV["OTEL_BSP_SCHEDULE_DELAY"]),
        # Other work on the machine skews every figure: read them with this in mind.
        "loadavg_before": os.getloadavg(),
    }
    signal.signal(signal.SIGALRM, _time_up)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds: children are ended
    signal.alarm(int(settings.time_limit_s))
    try:
        with contextlib.ExitStack() as stack:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="probe-bench-")))
            scratch.chmod(0o755)  # nginx's worker runs as nobody
            sink = Sink()
            stack.callback(sink.child.stop)
            servers = Servers(stack, scratch, sink, sdk=any(w.sdk for w in WORKLOADS))
            bench = Bench(settings, scratch, sink, servers)
            bench.warm_up()
            for repeat in range(settings.repeats):
                for config in config_order(repeat):
                    bench.visit(repeat, config)
            profile = bench.profile()
    except _TimeUp:
        limit = settings.time_limit_s
        raise BenchError(f"the benchmark ran past its limit of {limit:.0f} s") from None
    finally:
        signal.alarm(0)
    meta["duration_s"] = round(time.monotonic() - started, 1)
    meta["loadavg_after"] = os.getloadavg()
    meta["notes"] = bench.notes
    document = report.build(
        bench.samples,
        bench.probe_figures,
        meta,
        profile,
        {w.name: f"rate_{w.rates[0]}" for w in WORKLOADS if w.sdk},
    )
    document["targets"] = targets.evaluate(document)
    return document


def main() -> int:
    try:
        settings = Settings.from_environment(os.environ)
        document = run(settings)
    except (BenchError, ValueError) as error:
        print(f"bench: {error}", file=sys.stderr)
        return 1
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "latest.json"
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(document, indent=2, ensure_ascii=False))
    verdicts = document["targets"]
    assert isinstance(verdicts, list)
    print(report.summary(document, verdicts), file=sys.stderr)
    print(f"bench: written to {path}", file=sys.stderr)
    return 0
