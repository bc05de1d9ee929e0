"""The probe's own Prometheus metrics and health check, on one small HTTP port.

Owns `ProbeCollector`, which reads the shared `Stats` counters and the export
queue's gauges at scrape time (nothing is updated on the hot path), and
`MetricsServer`, a stdlib HTTP server on a daemon thread answering
``/metrics`` and ``/healthz``. It listens on 127.0.0.1 unless configured
otherwise.

``/healthz`` answers 200 ``ok``, or 503 once span export has been failing for
longer than the threshold (so an orchestrator can restart a probe that cannot
reach its collector, but not on a single failed request).
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from probe.export.batch import ExportStatus
from probe.stats import Stats

PREFIX = "probe_"

# Stats counters with a description; any other counter is exported too, as
# probe_<name>_total, so a stage's new counter never goes unseen.
COUNTERS = {
    "events": "Kernel events read from the ring buffer",
    "events_lost": "Kernel events lost before user space read them",
    "exchanges_shed": "Exchanges over the exchange rate limit, shed whole in the kernel",
    "parse_errors": "HTTP messages that could not be parsed",
    "connections_opened": "Connections the probe started tracking",
    "addresses_looked_up": "Connections whose addresses the kernel did not send, "
    "looked up in /proc instead",
    "execs_of_known_images": "Execs of images examined before, which did not wake the probe",
    "accepts_without_address": "Connections accepted without an address buffer (libuv's way), "
    "whose addresses the kernel then reads at their first read",
    "spans_produced": "Spans built from HTTP exchanges",
    "spans_exported": "Spans the collector accepted",
    "spans_dropped": "Spans dropped because the export queue was full or the probe stopped",
    "spans_rejected": "Spans the collector rejected in a partial success",
    "spans_failed": "Spans dropped after a non-retryable export error",
    "export_requests": "Export requests sent",
    "export_retries": "Export requests that failed and were retried",
}
# Stats entries that go up and down.
GAUGES = {
    "connections_tracked": "Connections tracked now",
    "exchange_rate_limit": "Exchanges traced per second at most now (0: no limit); "
    "lowered while the CPU is short",
}


class ExportReadings(Protocol):
    """What the collector and /healthz read from the export side (a BatchSpanProcessor)."""

    def status(self) -> ExportStatus: ...

    def failing_for(self) -> float: ...


class ProbeCollector:
    """A prometheus_client collector over `Stats` and the export queue."""

    def __init__(self, stats: Stats, export: ExportReadings | None = None) -> None:
        self._stats = stats
        self._export = export

    def describe(self) -> list[Metric]:
        return []  # names depend on the counters present; don't collect at registration

    def collect(self) -> Iterator[Metric]:
        counts = dict(self._stats)  # one C-level copy: consistent under the GIL
        for name, value in sorted(counts.items()):
            if name in GAUGES:
                yield GaugeMetricFamily(PREFIX + name, GAUGES[name], value=value)
            else:
                help_text = COUNTERS.get(name, f"Probe counter {name}")
                yield CounterMetricFamily(PREFIX + name, help_text, value=value)
        if self._export is not None:
            status = self._export.status()
            yield GaugeMetricFamily(
                PREFIX + "export_queue_depth",
                "Spans waiting or being sent",
                value=status.queue_depth,
            )
            yield GaugeMetricFamily(
                PREFIX + "export_queue_bytes",
                "Estimated bytes of the spans in the export queue",
                value=status.queue_bytes,
            )
            yield SummaryMetricFamily(
                PREFIX + "export_duration_seconds",
                "Time export requests took",
                count_value=counts.get("export_requests", 0),
                sum_value=status.latency_total,
            )
            yield GaugeMetricFamily(
                PREFIX + "export_last_duration_seconds",
                "Time the last export request took",
                value=status.last_latency,
            )
            yield GaugeMetricFamily(
                PREFIX + "export_failing_seconds",
                "Seconds export has been failing; 0 while it works",
                value=status.failing_for,
            )
        yield GaugeMetricFamily(
            PREFIX + "resident_memory_bytes", "Resident memory of the probe", value=resident_bytes()
        )


def resident_bytes() -> int:
    """This process's resident set size, from /proc/self/statm (in pages)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MetricsServer:
    """Serves /metrics and /healthz from a daemon thread."""

    def __init__(
        self,
        stats: Stats,
        export: ExportReadings | None = None,
        *,
        address: tuple[str, int] = ("127.0.0.1", 9464),
        health_threshold_s: float = 60.0,
    ) -> None:
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(ProbeCollector(stats, export))
        self._export = export
        self._threshold = health_threshold_s
        self.address = address  # as configured; start() returns the bound one
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> tuple[str, int]:
        """Bind and serve; returns the bound address (port 0 picks a free one)."""
        server_class = _Server6 if ":" in self.address[0] else _Server
        self._server = server_class(self.address, self._handler_class())
        self._thread = threading.Thread(
            target=self._server.serve_until_stopped, name="probe-metrics", daemon=True
        )
        self._thread.start()
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        if self._server is not None:
            assert self._thread is not None
            self._server.stop_serving()
            self._thread.join()
            self._server.server_close()
            self._server = None

    def health(self) -> tuple[int, str]:
        """The /healthz answer: status code and body."""
        failing = self._export.failing_for() if self._export is not None else 0.0
        if failing > self._threshold:
            return 503, f"export failing for {failing:.0f}s\n"
        return 200, "ok\n"

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._answer(200, generate_latest(outer._registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    code, text = outer.health()
                    self._answer(code, text.encode(), "text/plain; charset=utf-8")
                else:
                    self._answer(404, b"not found\n", "text/plain; charset=utf-8")

            def _answer(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes every few seconds would flood the probe's log

        return Handler


class _Server(ThreadingHTTPServer):
    """Waits for a request or for `stop_serving`, with no timeout: an idle
    probe's server thread never wakes. (`serve_forever` wakes every
    ``poll_interval`` to look for `shutdown`; each wakeup of an idle thread
    costs 80-290 us of CPU on the VM this was measured on.)"""

    daemon_threads = True
    timeout = 0.0  # handle_request(): a connection gone before its accept is not waited for

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        # Before binding: a failed bind closes the server, these with it.
        self._stop_reader, self._stop_writer = socket.socketpair()
        super().__init__(address, handler)

    def serve_until_stopped(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self, selectors.EVENT_READ)
            selector.register(self._stop_reader, selectors.EVENT_READ)
            while True:
                ready = selector.select()
                if any(key.fileobj is self._stop_reader for key, _ in ready):
                    return
                self.handle_request()

    def stop_serving(self) -> None:
        self._stop_writer.send(b"\0")

    def server_close(self) -> None:
        super().server_close()
        self._stop_reader.close()
        self._stop_writer.close()


class _Server6(_Server):
    address_family = socket.AF_INET6
