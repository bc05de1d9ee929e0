"""The metrics endpoint: what it reports, where it listens, and /healthz."""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from probe.export.batch import BatchSpanProcessor, ExportStatus
from probe.export.otlp_grpc import OtlpGrpcSpanExporter
from probe.metrics import MetricsServer, resident_bytes
from probe.stats import Stats
from probe.trace.span import Resource, Span, SpanKind
from tests.otlp_receiver import GrpcReceiver


class FixedReadings:
    """Export readings with set values, for exact checks of the output."""

    def __init__(self, status: ExportStatus) -> None:
        self._status = status

    def status(self) -> ExportStatus:
        return self._status

    def failing_for(self) -> float:
        return self._status.failing_for


def get(address: tuple[str, int], path: str) -> tuple[int, str, str]:
    connection = http.client.HTTPConnection(*address, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read().decode()
    finally:
        connection.close()


def scrape(address: tuple[str, int]) -> dict[str, float]:
    status, _, text = get(address, "/metrics")
    assert status == 200
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def wait_until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


@pytest.fixture
def servers():
    """Starts MetricsServers on an ephemeral localhost port; stops them after the test."""
    started: list[MetricsServer] = []

    def start(stats, export=None, **options) -> tuple[str, int]:
        server = MetricsServer(stats, export, address=("127.0.0.1", 0), **options)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def test_reports_counters_and_export_gauges(servers):
    stats = Stats(
        events=120,
        events_lost=3,
        parse_errors=2,
        connections_tracked=4,
        spans_produced=50,
        spans_exported=40,
        spans_dropped=6,
        spans_rejected=1,
        spans_failed=2,
        export_requests=5,
        export_retries=1,
        tls_handshakes=9,  # a counter this module does not know still shows
    )
    readings = FixedReadings(
        ExportStatus(
            queue_depth=7, queue_bytes=2048, last_latency=0.25, latency_total=1.5, failing_for=0.0
        )
    )
    metrics = scrape(servers(stats, readings))

    assert metrics["probe_events_total"] == 120
    assert metrics["probe_events_lost_total"] == 3
    assert metrics["probe_parse_errors_total"] == 2
    assert metrics["probe_connections_tracked"] == 4
    assert metrics["probe_spans_produced_total"] == 50
    assert metrics["probe_spans_exported_total"] == 40
    assert metrics["probe_spans_dropped_total"] == 6
    assert metrics["probe_spans_rejected_total"] == 1
    assert metrics["probe_spans_failed_total"] == 2
    assert metrics["probe_export_retries_total"] == 1
    assert metrics["probe_tls_handshakes_total"] == 9
    assert metrics["probe_export_queue_depth"] == 7
    assert metrics["probe_export_queue_bytes"] == 2048
    assert metrics["probe_export_duration_seconds_count"] == 5
    assert metrics["probe_export_duration_seconds_sum"] == 1.5
    assert metrics["probe_export_last_duration_seconds"] == 0.25
    assert metrics["probe_export_failing_seconds"] == 0.0
    assert metrics["probe_resident_memory_bytes"] > 0
    assert all(name.startswith("probe_") for name in metrics)


def test_counters_move_between_scrapes(servers):
    stats = Stats()
    address = servers(stats)
    assert "probe_events_total" not in scrape(address)
    stats["events"] += 10
    assert scrape(address)["probe_events_total"] == 10
    stats["events"] += 5
    assert scrape(address)["probe_events_total"] == 15


def test_metrics_content_type(servers):
    status, content_type, _ = get(servers(Stats()), "/metrics")
    assert (status, content_type.split(";")[0]) == (200, "text/plain")


def test_listens_on_localhost_only(servers):
    host, port = servers(Stats())
    assert host == "127.0.0.1"
    assert get((host, port), "/healthz")[0] == 200
    # another loopback address reaches any socket bound to all addresses, not this one
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", port), timeout=5)


def test_default_address_is_localhost():
    server = MetricsServer(Stats())
    assert server.address == ("127.0.0.1", 9464)


def test_unknown_paths(servers):
    assert get(servers(Stats()), "/")[0] == 404


def test_resident_bytes_reads_statm():
    rss = resident_bytes()
    assert rss > 0
    assert rss % os.sysconf("SC_PAGE_SIZE") == 0


def test_healthz_fails_after_export_fails_longer_than_the_threshold(servers):
    down = GrpcReceiver()
    down.stop()
    stats = Stats()
    exporter = OtlpGrpcSpanExporter(down.endpoint, max_reconnect_backoff_millis=100)
    processor = BatchSpanProcessor(
        exporter, stats, schedule_delay_millis=10, initial_backoff_millis=5, max_backoff_millis=20
    )
    address = servers(stats, processor, health_threshold_s=0.2)
    receiver = None
    try:
        status, _, body = get(address, "/healthz")
        assert (status, body) == (200, "ok\n")
        processor.on_end(Span("GET", SpanKind.CLIENT, 1, 2, Resource({"service.name": "t"})))

        wait_until(lambda: get(address, "/healthz")[0] == 503)
        status, content_type, body = get(address, "/healthz")
        assert (status, content_type) == (503, "text/plain; charset=utf-8")
        assert body.startswith("export failing for ")
        assert scrape(address)["probe_export_failing_seconds"] > 0.2

        receiver = GrpcReceiver(port=down.port)
        wait_until(lambda: get(address, "/healthz")[0] == 200)
        assert stats["spans_exported"] == 1
    finally:
        processor.shutdown(1000)
        if receiver is not None:
            receiver.stop()


def _voluntary_switches(native_id: int) -> int:
    with open(f"/proc/self/task/{native_id}/status", encoding="ascii") as status:
        line = next(line for line in status if line.startswith("voluntary_ctxt_switches:"))
    return int(line.split()[1])


def test_an_idle_server_thread_never_wakes(servers):
    """It waits for a request or for stop() with no timeout: a node's idle
    probe pays no wakeups for it (serve_forever's polled twice a second)."""
    host, port = servers(Stats())
    thread = next(t for t in threading.enumerate() if t.name == "probe-metrics")
    assert thread.native_id is not None
    assert get((host, port), "/healthz")[0] == 200
    time.sleep(0.1)  # the request's own switches are over
    before = _voluntary_switches(thread.native_id)
    time.sleep(1.2)
    assert _voluntary_switches(thread.native_id) == before
    assert get((host, port), "/healthz")[0] == 200  # and it still answers


def test_a_port_in_use_is_an_os_error():
    taken = MetricsServer(Stats(), address=("127.0.0.1", 0))
    _, port = taken.start()
    try:
        with pytest.raises(OSError):
            MetricsServer(Stats(), address=("127.0.0.1", port)).start()
    finally:
        taken.stop()
