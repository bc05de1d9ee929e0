"""The benchmark's OTLP receiver, over gRPC and over HTTP: it keeps nothing
but counts of the spans it accepts, by the ``service.name`` of their resource
and their kind, so completeness (spans exported / requests served) can be
computed.

Run as ``python -m bench.sink``: it listens on two ephemeral ports of
127.0.0.1, prints ``port N`` (OTLP/gRPC) and ``http_port M`` (OTLP/HTTP, at
``/v1/traces``), then answers each ``counts`` line on its
standard input with one JSON line ``{"SERVICE/KIND": count, ...}``; it stops
at the end of its input or on SIGTERM. Control goes over stdin rather than
HTTP so that asking adds no HTTP traffic for the probe to trace.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span


def count_spans(request: ExportTraceServiceRequest) -> Counter[str]:
    """Spans of one export request by ``SERVICE/KIND`` (e.g. ``nginx/SERVER``)."""
    counts: Counter[str] = Counter()
    for resource_spans in request.resource_spans:
        service = next(
            (
                pair.value.string_value
                for pair in resource_spans.resource.attributes
                if pair.key == "service.name"
            ),
            "",
        )
        for scope_spans in resource_spans.scope_spans:
            kinds = Counter(span.kind for span in scope_spans.spans)
            for kind, count in kinds.items():
                counts[f"{service}/{Span.SpanKind.Name(kind).removeprefix('SPAN_KIND_')}"] += count
    return counts


class CountingSink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def Export(self, request, context):  # noqa: N802 (the generated servicer's name)
        counts = count_spans(request)
        with self._lock:
            self._counts.update(counts)
        return ExportTraceServiceResponse()

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def http_server(sink: CountingSink) -> ThreadingHTTPServer:
    """OTLP/HTTP (binary protobuf) at /v1/traces, kept-alive, into ``sink``."""
    answer = ExportTraceServiceResponse().SerializeToString()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path != "/v1/traces":
                self.send_error(404)
                return
            sink.Export(ExportTraceServiceRequest.FromString(body), None)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # one line per export would flood the harness's pipe

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    return server


def main() -> int:
    sink = CountingSink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    http = http_server(sink)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    print(f"port {port}", flush=True)
    print(f"http_port {http.server_address[1]}", flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "counts":
                print(json.dumps(sink.snapshot(), sort_keys=True), flush=True)
    finally:
        http.shutdown()
        server.stop(grace=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
