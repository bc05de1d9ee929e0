"""The benchmark's counting receiver, fed by the probe's own exporters over both transports."""

from __future__ import annotations

import json
import subprocess
import sys

from probe.export.batch import Outcome
from probe.export.otlp import OtlpHttpSpanExporter
from probe.export.otlp_grpc import OtlpGrpcSpanExporter
from probe.trace.span import Resource, Span, SpanKind


def _spans(service: str, kind: SpanKind, count: int) -> list[Span]:
    resource = Resource({"service.name": service})
    return [Span("GET", kind, 1, 2, resource) for _ in range(count)]


def test_the_sink_counts_spans_by_service_and_kind_over_grpc_and_http() -> None:
    sink = subprocess.Popen(
        [sys.executable, "-m", "bench.sink"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert sink.stdin is not None and sink.stdout is not None
    try:
        grpc_port = int(sink.stdout.readline().split()[1])
        http_port = int(sink.stdout.readline().split()[1])
        grpc_exporter = OtlpGrpcSpanExporter(f"http://127.0.0.1:{grpc_port}")
        http_exporter = OtlpHttpSpanExporter(f"http://127.0.0.1:{http_port}/v1/traces")
        try:
            sent = [
                grpc_exporter.send(grpc_exporter.encode(_spans("nginx", SpanKind.SERVER, 3))),
                http_exporter.send(http_exporter.encode(_spans("nginx", SpanKind.SERVER, 2))),
                http_exporter.send(http_exporter.encode(_spans("curl", SpanKind.CLIENT, 4))),
            ]
        finally:
            grpc_exporter.shutdown()
            http_exporter.shutdown()
        assert [outcome.outcome for outcome in sent] == [Outcome.SUCCESS] * 3
        sink.stdin.write("counts\n")
        sink.stdin.flush()
        counts = json.loads(sink.stdout.readline())
    finally:
        sink.stdin.close()
        sink.wait(10)
    assert counts == {"nginx/SERVER": 5, "curl/CLIENT": 4}
