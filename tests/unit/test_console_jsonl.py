"""Console and JSON-lines exporters: exact lines, widths, and round trips."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime

from probe.export.base import ExportResult
from probe.export.console import ConsoleSpanExporter
from probe.export.jsonl import JsonLinesSpanExporter, span_to_dict
from probe.trace.span import Resource, Span, SpanEvent, SpanKind, SpanLink, StatusCode

# 2024-03-01 12:34:56.789 UTC
START = int(datetime(2024, 3, 1, 12, 34, 56, tzinfo=UTC).timestamp()) * 10**9 + 789_000_000


def make_span(
    *,
    service: str = "nginx",
    kind: SpanKind = SpanKind.SERVER,
    duration_ns: int = 12_345_678,
    status: StatusCode = StatusCode.UNSET,
    **attributes,
) -> Span:
    attrs = {
        "http.request.method": "GET",
        "url.path": "/index.html",
        "http.response.status_code": 200,
        "network.peer.address": "10.0.0.2",
        "network.peer.port": 51000,
    }
    attrs.update(attributes)
    return Span(
        name=str(attrs["http.request.method"]),
        kind=kind,
        start_time_unix_nano=START,
        end_time_unix_nano=START + duration_ns,
        resource=Resource({"service.name": service, "process.pid": 7}),
        trace_id=bytes(range(16)),
        span_id=bytes(range(8)),
        status_code=status,
        attributes={k: v for k, v in attrs.items() if v is not None},
    )


def console_lines(*spans: Span) -> list[str]:
    stream = io.StringIO()
    exporter = ConsoleSpanExporter(stream, tz=UTC)
    assert exporter.export(spans) is ExportResult.SUCCESS
    return stream.getvalue().splitlines()


def test_console_header_then_rows():
    lines = console_lines(
        make_span(),
        make_span(
            kind=SpanKind.CLIENT,
            status=StatusCode.ERROR,
            duration_ns=1_500_000_000,
            **{
                "http.request.method": "_OTHER",
                "http.request.method_original": "PROPFIND",
                "http.response.status_code": 503,
                "network.peer.address": "2001:db8::1",
                "network.peer.port": 80,
                "url.path": "/dav",
                "url.query": "a=REDACTED",
            },
        ),
        make_span(
            status=StatusCode.ERROR,
            **{"http.response.status_code": None, "network.peer.address": None},
        ),
    )

    assert lines == [
        "TIME         SERVICE    KIND METHOD   CODE       MS PEER                  PATH",
        "12:34:56.789 nginx      SRV  GET      200    12.346 10.0.0.2:51000        /index.html",
        "12:34:56.789 nginx      CLI  PROPFIND 503! 1500.000 [2001:db8::1]:80      /dav?a=REDACTED",
        "12:34:56.789 nginx      SRV  GET      ---!   12.346                       /index.html",
    ]


def test_console_reads_a_connections_shared_attributes():
    span = make_span(**{"network.peer.address": None, "network.peer.port": None})
    span.shared_attributes = {"network.peer.address": "10.0.0.3", "network.peer.port": 40000}
    assert console_lines(span)[1].split()[6] == "10.0.0.3:40000"


def test_console_header_written_once():
    stream = io.StringIO()
    exporter = ConsoleSpanExporter(stream, tz=UTC)

    exporter.export([])
    exporter.export([make_span()])
    exporter.export([make_span()])

    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("TIME ")
    assert not lines[2].startswith("TIME ")


def test_console_lines_stay_under_100_columns():
    lines = console_lines(
        make_span(
            service="a-service-with-a-very-long-name-indeed",
            duration_ns=98_765_432_100_000,
            **{
                "url.path": "/" + "segment/" * 40,
                "url.query": "k=REDACTED" * 10,
                "network.peer.address": "fd12:3456:789a:1:abcd:ef01:2345:6789",
                "network.peer.port": 65535,
            },
        )
    )

    row = lines[1]
    assert [len(line) < 100 for line in lines] == [True, True]
    # The long duration pushes the path right; the path gives way.
    assert row == (
        "12:34:56.789 a-servi... SRV  GET      200  98765432.100 [fd12:3456:789a:1:... "
        "/segment/segment/s..."
    )
    assert len(row) == 99


def test_console_control_characters_are_neutralised():
    lines = console_lines(make_span(**{"url.path": "/\x1b[31mred\x07"}))

    assert lines[1].endswith(" /?[31mred?")


class BrokenPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError

    def flush(self) -> None:
        raise BrokenPipeError


def test_console_failure_on_broken_pipe():
    exporter = ConsoleSpanExporter(BrokenPipe(), tz=UTC)

    assert exporter.export([make_span()]) is ExportResult.FAILURE
    assert exporter.force_flush() is False
    exporter.shutdown()  # does not raise


def full_span() -> Span:
    return Span(
        name="GET",
        kind=SpanKind.CLIENT,
        start_time_unix_nano=START,
        end_time_unix_nano=START + 5_000,
        resource=Resource({"service.name": "curl", "process.pid": 99, "host.name": "h"}),
        trace_id=bytes.fromhex("0af7651916cd43dd8448eb211c80319c"),
        span_id=bytes.fromhex("b7ad6b7169203331"),
        parent_span_id=bytes.fromhex("00f067aa0ba902b7"),
        status_code=StatusCode.ERROR,
        status_message="connection_closed",
        attributes={
            "http.request.method": "GET",
            "http.request.header.x-id": ["a", "b"],
            "probe.http.head_truncated": True,
            "thread.id": 100,
        },
        events=[SpanEvent("http.informational_response", START + 10, {"code": 100})],
        links=[SpanLink(bytes.fromhex("11" * 16), bytes.fromhex("22" * 8), {"why": "x"})],
        shared_attributes={"network.peer.address": "10.0.0.9"},
    )


def test_span_to_dict():
    assert span_to_dict(full_span()) == {
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "span_id": "b7ad6b7169203331",
        "parent_span_id": "00f067aa0ba902b7",
        "name": "GET",
        "kind": "CLIENT",
        "start_time_unix_nano": START,
        "end_time_unix_nano": START + 5_000,
        "status_code": "ERROR",
        "status_message": "connection_closed",
        "attributes": {
            "network.peer.address": "10.0.0.9",
            "http.request.method": "GET",
            "http.request.header.x-id": ["a", "b"],
            "probe.http.head_truncated": True,
            "thread.id": 100,
        },
        "events": [
            {
                "name": "http.informational_response",
                "time_unix_nano": START + 10,
                "attributes": {"code": 100},
            }
        ],
        "links": [{"trace_id": "11" * 16, "span_id": "22" * 8, "attributes": {"why": "x"}}],
        "resource": {"service.name": "curl", "process.pid": 99, "host.name": "h"},
    }


def test_root_span_has_empty_parent():
    assert span_to_dict(make_span())["parent_span_id"] == ""


def test_json_lines_round_trip():
    stream = io.StringIO()
    exporter = JsonLinesSpanExporter(stream)
    spans = [full_span(), make_span(**{"url.path": "/caf\u00e9\n"})]

    assert exporter.export(spans) is ExportResult.SUCCESS
    exporter.shutdown()

    lines = stream.getvalue().split("\n")
    assert lines[-1] == ""  # every line is terminated
    assert [json.loads(line) for line in lines[:-1]] == [span_to_dict(span) for span in spans]
