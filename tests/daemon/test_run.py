"""`probe run` end to end: real BPF, a real HTTP server and client, and real
OTLP receivers (the official gRPC service and OTLP/HTTP) decoding what the
daemon sends. Needs root and bcc; skipped with the reason printed otherwise."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from probe.kernel.governor import PRESSURE_FILE
from tests.helpers import free_port
from tests.otlp_receiver import GrpcReceiver, HttpReceiver, decode_attributes, span_ids

pytestmark = pytest.mark.usefixtures("tracing_ready")
PROBE = [sys.executable, "-m", "probe"]
REPO = Path(__file__).resolve().parents[2]


class Daemon:
    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))
            if line.strip() == "ready":
                self._ready.set()
        self._ready.set()

    def wait_ready(self) -> None:
        assert self._ready.wait(60), "no 'ready' within 60 s"
        assert self.process.poll() is None, "\n".join(self.lines)

    def metrics_url(self) -> str:
        for line in self.lines:
            found = re.search(r"metrics on (http://\S+)/metrics", line)
            if found:
                return found.group(1)
        raise AssertionError("\n".join(self.lines))

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(30)
        self._reader.join(5)
        return code


@contextmanager
def daemon(*args: str, new_session: bool = False, **env: str) -> Iterator[Daemon]:
    """`probe run` with ``args`` and ``env``; in this test's session unless
    ``new_session`` (as systemd and container runtimes start it)."""
    environ = {**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "200", **env}
    process = subprocess.Popen(
        [*PROBE, "run", "--metrics-address", "127.0.0.1:0", *args],
        stderr=subprocess.PIPE,
        text=True,
        env=environ,
        cwd=REPO,
        start_new_session=new_session,
    )
    running = Daemon(process)
    try:
        running.wait_ready()
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@contextmanager
def http_server(port: int) -> Iterator[subprocess.Popen]:
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, OTEL_SERVICE_NAME="files"),
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe_socket:
                if probe_socket.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield server
    finally:
        server.kill()
        server.wait()


def curl(url: str) -> None:
    subprocess.run(["curl", "-s", "-o", "/dev/null", "-A", "probe-test/1", url], check=True)


def thread_nice_values(pid: int) -> set[int]:
    """The nice value of each thread of ``pid`` (field 19 of its stat)."""
    values = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        values.add(int(fields[16]))
    return values


def autogroup(pid: int) -> str:
    """What the kernel says of the scheduling group of ``pid``'s session:
    "/autogroup-ID nice N", or nothing for the root group, which holds init
    and every process whose ancestors never started a session of their own
    (as a CI runner's children may)."""
    return Path(f"/proc/{pid}/autogroup").read_text()


@pytest.mark.skipif(
    not Path("/proc/self/autogroup").exists(),
    reason="this kernel has no autogroups (CONFIG_SCHED_AUTOGROUP): nice orders threads only",
)
def test_nice_reaches_the_sessions_group_only_in_a_session_of_its_own() -> None:
    receiver = HttpReceiver()
    endpoint = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint}
    ours = autogroup(os.getpid())
    try:
        with daemon(new_session=True, **endpoint) as probe:
            assert autogroup(probe.process.pid).split()[1:] == ["nice", "10"]
            assert thread_nice_values(probe.process.pid) == {10}
            log = "\n".join(probe.lines)
            assert "CPU priority: nice 10, for its threads and its session" in log
            assert probe.stop() == 0
        # Started from this test's session, as from a shell: the session's other
        # programs keep their priority, and the log says what nice does not do.
        with daemon(**endpoint) as probe:
            assert autogroup(probe.process.pid) == ours
            assert thread_nice_values(probe.process.pid) == {10}
            assert "other sessions share the CPU with it as equals" in "\n".join(probe.lines)
            assert probe.stop() == 0
    finally:
        receiver.stop()
    assert autogroup(os.getpid()) == ours


@pytest.mark.parametrize("receiver_class", [GrpcReceiver, HttpReceiver])
def test_every_attribute_and_the_resource_arrive(receiver_class) -> None:
    receiver = receiver_class()
    port = free_port()
    protocol = "grpc" if receiver_class is GrpcReceiver else "http/protobuf"
    try:
        with http_server(port) as server, daemon(
            "-P", str(port),
            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=receiver.endpoint,
            OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
            OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test",
        ) as probe:  # fmt: skip
            curl(f"http://127.0.0.1:{port}/?token=secret")
            received = receiver.wait_for(1)
            assert probe.stop() == 0
    finally:
        receiver.stop()

    servers = [
        (resource_spans, span)
        for item in received
        for resource_spans in item.request.resource_spans
        for scope in resource_spans.scope_spans
        for span in scope.spans
        if span.kind == span.SPAN_KIND_SERVER
    ]
    assert len(servers) == 1
    resource_spans, span = servers[0]
    resource = decode_attributes(resource_spans.resource.attributes)
    assert resource["service.name"] == "files"  # the process's own OTEL_SERVICE_NAME
    assert resource["process.pid"] == server.pid
    assert resource["deployment.environment"] == "test"
    assert resource_spans.scope_spans[0].scope.name == "probe"
    attributes = decode_attributes(span.attributes)
    client_port = attributes.pop("client.port")
    assert attributes.pop("network.peer.port") == client_port
    assert attributes.pop("thread.id") > 0
    assert attributes.pop("http.response.body.size") > 0
    assert attributes == {
        "http.request.method": "GET",
        "url.path": "/",
        "url.query": "token=REDACTED",
        "url.scheme": "http",
        "server.address": "127.0.0.1",
        "server.port": port,
        "client.address": "127.0.0.1",
        "http.response.status_code": 200,
        "network.protocol.name": "http",
        "network.protocol.version": "1.1",
        "network.peer.address": "127.0.0.1",
        "network.local.address": "127.0.0.1",
        "network.local.port": port,
        "user_agent.original": "probe-test/1",
        "probe.link.rule": "same_host",  # curl's client span is its parent
    }
    assert span.name == "GET"
    assert len(span.trace_id) == 16 and len(span.span_id) == 8
    assert span.end_time_unix_nano > span.start_time_unix_nano > 0


def test_collector_down_at_start_then_up_gets_every_span_once() -> None:
    collector_port, port = free_port(), free_port()
    with http_server(port), daemon(
        "-P", str(port), OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector_port}"
    ) as probe:  # fmt: skip
        for index in range(5):
            curl(f"http://127.0.0.1:{port}/{index}")
        time.sleep(1.5)  # export fails meanwhile; spans wait in the queue
        receiver = HttpReceiver(port=collector_port)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len(span_ids(receiver.accepted)) < 10:
                time.sleep(0.2)
            assert probe.stop() == 0
            ids = span_ids(receiver.accepted)
        finally:
            receiver.stop()
    assert len(ids) == 10  # a server and a client span per request
    assert len(set(ids)) == 10  # none twice


@pytest.mark.parametrize("pattern", ["curl", "cu*"])  # in the kernel; in user space
def test_an_excluded_process_gets_no_spans(pattern: str) -> None:
    receiver = HttpReceiver()  # the default protocol
    port = free_port()
    try:
        with http_server(port), daemon(
            "-P", str(port), "--exclude-comm", pattern,
            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=receiver.endpoint,
        ) as probe:  # fmt: skip
            for index in range(3):
                curl(f"http://127.0.0.1:{port}/{index}")
            receiver.wait_for(1)
            assert probe.stop() == 0  # every span made is exported by now
    finally:
        receiver.stop()
    is_server = [
        span.kind == span.SPAN_KIND_SERVER
        for request in receiver.accepted
        for resource_spans in request.resource_spans
        for scope in resource_spans.scope_spans
        for span in scope.spans
    ]
    assert is_server == [True] * 3  # the server's three, none of curl's


def test_its_own_exports_are_not_traced_at_the_receivers_end() -> None:
    """Nothing filtered, and the receiver on this host: its end of each export would be
    an HTTP exchange like any other, a span that the next export carries, and so on."""
    receiver = HttpReceiver()  # in this process: traced like any other server
    port = free_port()
    try:
        with http_server(port), daemon(
            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=receiver.endpoint,
            OTEL_BSP_SCHEDULE_DELAY="100",
        ) as probe:  # fmt: skip
            curl(f"http://127.0.0.1:{port}/traced")
            receiver.wait_for(1)
            time.sleep(1.5)  # more exports: a span of the receiver's would arrive by now
            assert probe.stop() == 0
    finally:
        receiver.stop()
    paths = [
        decode_attributes(span.attributes).get("url.path")
        for request in receiver.accepted
        for resource_spans in request.resource_spans
        for scope in resource_spans.scope_spans
        for span in scope.spans
    ]
    assert "/traced" in paths
    assert "/v1/traces" not in paths


def test_sigterm_exports_queued_spans_before_exit() -> None:
    receiver = HttpReceiver()  # the default protocol
    port = free_port()
    try:
        with http_server(port), daemon(
            "-P", str(port),
            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=receiver.endpoint,
            OTEL_BSP_SCHEDULE_DELAY="600000",  # nothing leaves before the stop
        ) as probe:  # fmt: skip
            for index in range(3):
                curl(f"http://127.0.0.1:{port}/{index}")
            time.sleep(0.5)
            assert receiver.accepted == []
            assert probe.stop() == 0
            assert len(span_ids(receiver.accepted)) == 6
    finally:
        receiver.stop()


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_on_localhost_only_and_counters_move() -> None:
    receiver = HttpReceiver()  # the default protocol
    port = free_port()
    try:
        with http_server(port), daemon(
            "-P", str(port), OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=receiver.endpoint
        ) as probe:  # fmt: skip
            url = probe.metrics_url()
            assert url.startswith("http://127.0.0.1:")
            metrics_port = int(url.rsplit(":", 1)[1])
            listening = Path("/proc/net/tcp").read_text().splitlines()[1:]
            local = [line.split()[1] for line in listening if line.split()[3] == "0A"]
            assert f"0100007F:{metrics_port:04X}" in local  # bound to 127.0.0.1, not 0.0.0.0
            assert f"00000000:{metrics_port:04X}" not in local
            before = _scrape(url)
            for index in range(4):
                curl(f"http://127.0.0.1:{port}/{index}")
            receiver.wait_for(1)
            deadline = time.monotonic() + 20
            after = _scrape(url)
            while time.monotonic() < deadline and after.get("probe_spans_exported_total", 0) < 8:
                time.sleep(0.2)
                after = _scrape(url)
            with urllib.request.urlopen(url + "/healthz", timeout=5) as health:
                assert health.status == 200
            # below the workload's CPU priority, every thread (the default nice 10)
            assert thread_nice_values(probe.process.pid) == {10}
            assert probe.stop() == 0
    finally:
        receiver.stop()
    assert after["probe_spans_produced_total"] - before.get("probe_spans_produced_total", 0) == 8
    assert after["probe_spans_exported_total"] == 8
    assert after["probe_events_total"] > before.get("probe_events_total", 0)
    assert after["probe_resident_memory_bytes"] > 0


def _wait_for_metric(url: str, name: str, wanted, timeout: float) -> float:
    """Scrape until ``wanted(value)``; the last value read."""
    deadline = time.monotonic() + timeout
    value = _scrape(url).get(name, -1.0)
    while not wanted(value) and time.monotonic() < deadline:
        time.sleep(0.2)
        value = _scrape(url).get(name, -1.0)
    return value


@pytest.mark.skipif(not PRESSURE_FILE.exists(), reason="this kernel does not report CPU pressure")
def test_the_exchange_rate_limit_falls_while_the_cpu_is_short_and_comes_back() -> None:
    """Twice as many busy processes as CPUs make every task wait for one: the
    daemon lowers its exchange rate limit toward the floor, says so, and
    raises it back to the maximum once they are gone."""
    maximum, floor = 10_000, 100
    with daemon(
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://127.0.0.1:9/v1/traces",
        PROBE_MAX_EXCHANGE_RATE=str(maximum),
        PROBE_MIN_EXCHANGE_RATE=str(floor),
        PROBE_CPU_PRESSURE_LIMIT="0.1",
    ) as probe:
        url = probe.metrics_url()
        busy = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(2 * (os.cpu_count() or 1))
        ]
        try:
            lowered = _wait_for_metric(
                url, "probe_exchange_rate_limit", lambda v: 0 < v <= floor, 20
            )
        finally:
            for process in busy:
                process.kill()
                process.wait()
        raised = _wait_for_metric(url, "probe_exchange_rate_limit", lambda v: v == maximum, 30)
        assert probe.stop() == 0
    log = "\n".join(probe.lines)
    assert lowered == floor, log
    assert raised == maximum, log
    assert "the CPU is short" in log and "keep up again: tracing up to 10000" in log


def test_the_exchange_rate_limit_falls_while_the_collector_is_down_and_comes_back() -> None:
    """Its collector down, the daemon's export queue (16 spans here) fills: it
    lowers its exchange rate limit rather than build spans it would drop, says
    so, and raises the limit back once the collector has taken the queue."""
    collector_port, port, maximum = free_port(), free_port(), 10_000
    with http_server(port), daemon(
        "-P", str(port),
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector_port}",
        OTEL_BSP_MAX_QUEUE_SIZE="16",
        OTEL_BSP_MAX_EXPORT_BATCH_SIZE="4",
        PROBE_MAX_EXCHANGE_RATE=str(maximum),
    ) as probe:  # fmt: skip
        url = probe.metrics_url()
        for index in range(12):  # a server and a client span each: 24 spans
            curl(f"http://127.0.0.1:{port}/{index}")
        lowered = _wait_for_metric(url, "probe_exchange_rate_limit", lambda v: 0 < v < maximum, 20)
        receiver = HttpReceiver(port=collector_port)
        try:
            raised = _wait_for_metric(url, "probe_exchange_rate_limit", lambda v: v == maximum, 60)
            assert probe.stop() == 0
        finally:
            receiver.stop()
    log = "\n".join(probe.lines)
    assert 0 < lowered < maximum, log
    assert raised == maximum, log
    assert "the export is behind (its queue" in log and "keep up again: tracing up to 10000" in log
    assert span_ids(receiver.accepted)  # what the queue held got through
