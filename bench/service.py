"""The Python services of the benchmark: a ``ThreadingHTTPServer`` with
keep-alive that answers a small body, optionally after calling the next
service of a chain, optionally traced in-process with the OpenTelemetry SDK.

Run as ``python -m bench.service --port 0 [--next HOST:PORT] [--sdk ENDPOINT]``;
it prints ``port N`` once listening and stops on SIGTERM or SIGINT (flushing
its spans when traced). Its ``service.name`` comes from ``OTEL_SERVICE_NAME``,
which the probe reads too.

With ``--sdk`` it makes the spans an instrumentation library would: a SERVER
span per request received, its context taken from the ``traceparent``
header, and a CLIENT span per call to the next service, its context sent on;
batched and exported over OTLP/gRPC as the SDK does by default.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import signal
import socket
import sys
import threading
from collections.abc import Iterator, MutableMapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

BODY = b"hello from the benchmark\n"


class NoTracing:
    """Spans cost nothing when there are none."""

    def server_span(self, method: str, path: str, headers: dict[str, str]):
        return contextlib.nullcontext()

    def client_span(self, method: str, url: str, headers: MutableMapping[str, str]):
        return contextlib.nullcontext()

    def shutdown(self) -> None:
        pass


class SdkTracing:
    """OpenTelemetry SDK spans, exported over OTLP/gRPC to ``endpoint``."""

    def __init__(self, endpoint: str) -> None:
        # Imported here: only the SDK variant needs the SDK installed. Imported
        # as modules, so that mypy without the SDK (make test) takes them as
        # missing, not as absent from the opentelemetry namespace.
        import opentelemetry.propagate as propagate  # noqa: PLC0415
        import opentelemetry.trace as trace  # noqa: PLC0415
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )
        from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

        self._propagate = propagate
        self._kind = trace.SpanKind
        self._provider = TracerProvider(resource=Resource.create())  # OTEL_SERVICE_NAME
        self._provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True))
        )
        self._tracer = self._provider.get_tracer("bench.service")

    @contextlib.contextmanager
    def server_span(self, method: str, path: str, headers: dict[str, str]) -> Iterator[None]:
        attributes = {"http.request.method": method, "url.path": path, "url.scheme": "http"}
        with self._tracer.start_as_current_span(
            method,
            context=self._propagate.extract(headers),
            kind=self._kind.SERVER,
            attributes=attributes,
        ) as span:
            yield
            span.set_attribute("http.response.status_code", 200)

    @contextlib.contextmanager
    def client_span(
        self, method: str, url: str, headers: MutableMapping[str, str]
    ) -> Iterator[None]:
        attributes = {"http.request.method": method, "url.full": url}
        with self._tracer.start_as_current_span(
            method, kind=self._kind.CLIENT, attributes=attributes
        ) as span:
            self._propagate.inject(headers)
            yield
            span.set_attribute("http.response.status_code", 200)

    def shutdown(self) -> None:
        self._provider.shutdown()


class Upstream:
    """The next service of the chain, over one kept-alive connection per thread."""

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.host, self.port = host, int(port)
        self._local = threading.local()

    def get(self, path: str, headers: dict[str, str]) -> bytes:
        try:
            return self._get(path, headers)
        except (http.client.HTTPException, ConnectionError):
            # The kept-alive connection was closed under us: once more on a new one.
            self._local.connection.close()
            self._local.connection = None
            return self._get(path, headers)

    def _get(self, path: str, headers: dict[str, str]) -> bytes:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
            self._local.connection = connection
        connection.request("GET", path, headers=headers)
        with connection.getresponse() as response:
            return response.read()


def handler_class(tracing: NoTracing | SdkTracing, upstream: Upstream | None) -> type:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive
        # One write per response, sent at once: unbuffered, the head and the
        # body go in two writes and Nagle holds the second for a delayed ACK
        # (40 ms per request on loopback).
        wbufsize = 1 << 16
        disable_nagle_algorithm = True

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            with tracing.server_span("GET", self.path, dict(self.headers.items())):
                body = BODY if upstream is None else self._call_upstream()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        def _call_upstream(self) -> bytes:
            assert upstream is not None
            url = f"http://{upstream.host}:{upstream.port}{self.path}"
            headers: dict[str, str] = {}
            with tracing.client_span("GET", url, headers):
                return upstream.get(self.path, headers)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: Any
    ) -> None:
        # A load generator stopping resets its connections: not worth a traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.service")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--next", metavar="HOST:PORT", help="call this service first")
    parser.add_argument("--sdk", metavar="ENDPOINT", help="trace with the OpenTelemetry SDK")
    args = parser.parse_args(argv)
    tracing = SdkTracing(args.sdk) if args.sdk else NoTracing()
    upstream = Upstream(args.next) if args.next else None
    server = Server(("127.0.0.1", args.port), handler_class(tracing, upstream))
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"port {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        tracing.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
