"""OTLP mapping and both transports, against real receivers on 127.0.0.1.

How each field is encoded is checked against the official messages in
test_otlp_wire.py; here, what the mapping means.
"""

from __future__ import annotations

import email.utils
import subprocess
import sys
import time

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1 import trace_pb2

import probe
from probe.config import load
from probe.export.base import ExportResult
from probe.export.batch import Outcome, SendOutcome
from probe.export.otlp import OtlpHttpSpanExporter, _retry_after, create_processor
from probe.export.otlp_grpc import OtlpGrpcSpanExporter, _grpc_target
from probe.export.otlp_wire import TraceRequestEncoder
from probe.stats import Stats
from probe.trace.span import Resource, Span, SpanEvent, SpanKind, SpanLink, StatusCode
from tests.otlp_receiver import GrpcReceiver, HttpReceiver, Reply, Tls, decode_attributes
from tests.otlp_reference import expected_request

RESOURCE_A = Resource({"service.name": "nginx", "process.pid": 42, "host.arch": "amd64"})
RESOURCE_B = Resource({"service.name": "curl", "process.pid": 7})

EVERY_TYPE = {
    "http.request.method": "GET",
    "http.response.status_code": 200,
    "network.peer.port": -1,
    "probe.head_truncated": True,
    "probe.ratio": 0.25,
    "http.request.header.accept": ["text/html", "application/json"],
    "probe.sizes": [1, 2, 3],
    "probe.empty": [],
}


def full_span(resource: Resource = RESOURCE_A, **changes: object) -> Span:
    span = Span(
        name="GET /items",
        kind=SpanKind.SERVER,
        start_time_unix_nano=1_700_000_000_000_000_000,
        end_time_unix_nano=1_700_000_000_250_000_000,
        resource=resource,
        trace_id=bytes(range(16)),
        span_id=bytes(range(8)),
        parent_span_id=bytes(range(10, 18)),
        status_code=StatusCode.ERROR,
        status_message="connection reset",
        attributes=dict(EVERY_TYPE),
        events=[SpanEvent("http.response.first_byte", 1_700_000_000_100_000_000, {"n": 1})],
        links=[SpanLink(b"\x01" * 16, b"\x02" * 8, {"probe.link": "informational"})],
    )
    for name, value in changes.items():
        setattr(span, name, value)
    return span


def encoded(spans: list[Span]) -> bytes:
    return TraceRequestEncoder().encode(spans)


def decoded(spans: list[Span]) -> ExportTraceServiceRequest:
    """The request for ``spans`` as a collector reads it."""
    return ExportTraceServiceRequest.FromString(encoded(spans))


def only_span(request) -> trace_pb2.Span:
    (resource_spans,) = request.resource_spans
    (scope_spans,) = resource_spans.scope_spans
    (span,) = scope_spans.spans
    return span


def test_every_field_is_mapped():
    request = decoded([full_span()])

    (resource_spans,) = request.resource_spans
    assert decode_attributes(resource_spans.resource.attributes) == RESOURCE_A.attributes
    (scope_spans,) = resource_spans.scope_spans
    assert scope_spans.scope.name == "probe"
    assert scope_spans.scope.version == probe.__version__
    span = only_span(request)
    assert span.name == "GET /items"
    assert span.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert span.trace_id == bytes(range(16))
    assert span.span_id == bytes(range(8))
    assert span.parent_span_id == bytes(range(10, 18))
    assert span.start_time_unix_nano == 1_700_000_000_000_000_000
    assert span.end_time_unix_nano == 1_700_000_000_250_000_000
    assert span.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    assert span.status.message == "connection reset"
    assert decode_attributes(span.attributes) == EVERY_TYPE
    assert span.attributes[7].value.WhichOneof("value") == "array_value"  # empty, still a list
    (event,) = span.events
    assert (event.name, event.time_unix_nano) == (
        "http.response.first_byte",
        1_700_000_000_100_000_000,
    )
    assert decode_attributes(event.attributes) == {"n": 1}
    (link,) = span.links
    assert (link.trace_id, link.span_id) == (b"\x01" * 16, b"\x02" * 8)
    assert decode_attributes(link.attributes) == {"probe.link": "informational"}


def test_root_client_span_without_status():
    span = only_span(
        decoded(
            [full_span(kind=SpanKind.CLIENT, parent_span_id=None, status_code=StatusCode.UNSET)]
        )
    )
    assert span.kind == trace_pb2.Span.SPAN_KIND_CLIENT
    assert span.parent_span_id == b""
    assert not span.HasField("status")


@pytest.mark.parametrize(
    "changes",
    [
        {"trace_id": b"\x07" * 4, "span_id": b"\x08" * 3},  # not OTLP's sizes: kept as they are
        {"parent_span_id": b""},  # an empty parent: no parent
        {"parent_span_id": b"\x09" * 9},
        {"start_time_unix_nano": 0, "end_time_unix_nano": 5},  # zero: left out
        {"end_time_unix_nano": 0, "name": ""},
    ],
)
def test_ids_times_and_names_as_given(changes: dict) -> None:
    spans = [full_span(**changes), full_span(**changes)]  # the second from the encoder's caches
    request = decoded(spans)
    for span, sent in zip(request.resource_spans[0].scope_spans[0].spans, spans, strict=True):
        assert (span.trace_id, span.span_id, span.parent_span_id or None) == (
            sent.trace_id,
            sent.span_id,
            sent.parent_span_id or None,
        )
        assert (span.start_time_unix_nano, span.end_time_unix_nano, span.name) == (
            sent.start_time_unix_nano,
            sent.end_time_unix_nano,
            sent.name,
        )


def test_spans_are_grouped_by_resource_in_order():
    spans = [
        full_span(RESOURCE_A, name="a1"),
        full_span(RESOURCE_B, name="b1"),
        full_span(Resource(dict(RESOURCE_A.attributes)), name="a2"),  # equal, not identical
    ]
    request = decoded(spans)
    grouped = [
        (decode_attributes(rs.resource.attributes), [s.name for s in rs.scope_spans[0].spans])
        for rs in request.resource_spans
    ]
    assert grouped == [(RESOURCE_A.attributes, ["a1", "a2"]), (RESOURCE_B.attributes, ["b1"])]


def test_varint_boundaries_round_trip():
    """Ints and sizes at each width of their base-128 encoding (1 to 10 bytes)."""
    edges = [0, 127, 128, 2**14 - 1, 2**14, 2**21 - 1, 2**21, 2**62 - 1, 2**62, 2**63 - 1]
    attributes = {f"n{i}": n for i, n in enumerate(edges)}
    attributes |= {"negative": -1, "lowest": -(2**63), "long": "x" * 2**14, "longer": "y" * 2**21}
    span = only_span(decoded([full_span(attributes=attributes)]))
    assert decode_attributes(span.attributes) == attributes


attribute_values = st.one_of(
    st.text(max_size=20),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.lists(st.text(max_size=5), max_size=4),
    st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=4),
)


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=10), attribute_values, max_size=6))
def test_attributes_round_trip(attributes):
    request = decoded([full_span(attributes=attributes)])
    values = decode_attributes(only_span(request).attributes)
    assert values == attributes
    assert [type(v) for v in values.values()] == [type(v) for v in attributes.values()]


# -- over the wire ----


@pytest.fixture
def grpc_receiver():
    receiver = GrpcReceiver()
    yield receiver
    receiver.stop()


@pytest.fixture
def http_receiver():
    receiver = HttpReceiver()
    yield receiver
    receiver.stop()


def grpc_exporter(receiver, **options) -> OtlpGrpcSpanExporter:
    return OtlpGrpcSpanExporter(receiver.endpoint, timeout=10, **options)


def http_exporter(receiver, **options) -> OtlpHttpSpanExporter:
    return OtlpHttpSpanExporter(receiver.endpoint, timeout=10, **options)


TRANSPORTS = [("grpc", grpc_exporter), ("http", http_exporter)]


@pytest.fixture(params=TRANSPORTS, ids=[name for name, _ in TRANSPORTS])
def transport(request, grpc_receiver, http_receiver):
    """(receiver, make_exporter) for each protocol."""
    name, make = request.param
    return (grpc_receiver if name == "grpc" else http_receiver), make


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_spans_arrive_intact(transport, compression):
    receiver, make = transport
    spans = [full_span(RESOURCE_A, name="a"), full_span(RESOURCE_B, name="b")]
    exporter = make(receiver, compression=compression, headers={"Api-Key": "s3cret"})

    assert exporter.export(spans) is ExportResult.SUCCESS

    (received,) = receiver.wait_for(1)
    assert received.request == expected_request(spans)
    assert received.headers["api-key"] == "s3cret"
    assert received.headers["user-agent"].startswith(f"probe/{probe.__version__}")
    exporter.shutdown()


def test_http_request_headers(http_receiver):
    exporter = http_exporter(http_receiver, compression="gzip")
    exporter.export([full_span()])
    (received,) = http_receiver.wait_for(1)
    assert received.headers["content-type"] == "application/x-protobuf"
    assert received.headers["content-encoding"] == "gzip"


def test_http_keeps_the_connection_across_a_receiver_restart(http_receiver):
    exporter = http_exporter(http_receiver)
    assert exporter.export([full_span()]) is ExportResult.SUCCESS
    http_receiver.stop()
    again = HttpReceiver(port=http_receiver.port)
    try:
        # the kept-alive connection is dead: the exporter must reconnect, not fail
        assert exporter.export([full_span()]) is ExportResult.SUCCESS
        assert len(again.wait_for(1)) == 1
    finally:
        again.stop()


GRPC_ANSWERS = [
    (Reply(), SendOutcome(Outcome.SUCCESS)),
    (Reply(rejected=2, message="2 too old"), SendOutcome(Outcome.PARTIAL, 2, "2 too old")),
    (
        Reply(grpc.StatusCode.UNAVAILABLE, message="busy"),
        SendOutcome(Outcome.RETRYABLE, message="UNAVAILABLE: busy"),
    ),
    (
        Reply(grpc.StatusCode.RESOURCE_EXHAUSTED, retry_delay=2.5, message="slow down"),
        SendOutcome(Outcome.RETRYABLE, message="RESOURCE_EXHAUSTED: slow down", retry_after=2.5),
    ),
    (
        Reply(grpc.StatusCode.RESOURCE_EXHAUSTED, message="quota"),
        SendOutcome(Outcome.PERMANENT, message="RESOURCE_EXHAUSTED: quota"),
    ),
    (
        Reply(grpc.StatusCode.INVALID_ARGUMENT, message="bad span"),
        SendOutcome(Outcome.PERMANENT, message="INVALID_ARGUMENT: bad span"),
    ),
    (
        Reply(grpc.StatusCode.UNAUTHENTICATED, message="who"),
        SendOutcome(Outcome.PERMANENT, message="UNAUTHENTICATED: who"),
    ),
]
GRPC_ANSWERS += [
    (Reply(code, message="x"), SendOutcome(Outcome.RETRYABLE, message=f"{code.name}: x"))
    for code in (
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.DATA_LOSS,
    )
]


@pytest.mark.parametrize(("reply", "expected"), GRPC_ANSWERS)
def test_grpc_answers_are_classified(grpc_receiver, reply, expected):
    grpc_receiver.script(reply)
    exporter = grpc_exporter(grpc_receiver)
    assert exporter.send(encoded([full_span()])) == expected


HTTP_ANSWERS = [
    (Reply(), SendOutcome(Outcome.SUCCESS)),
    (Reply(rejected=3, message="dup"), SendOutcome(Outcome.PARTIAL, 3, "dup")),
    (
        Reply(http_status=429, retry_delay=7, message="slow"),
        SendOutcome(Outcome.RETRYABLE, message="HTTP 429 Too Many Requests: slow", retry_after=7.0),
    ),
    (
        Reply(http_status=503, retry_delay=0),
        SendOutcome(Outcome.RETRYABLE, message="HTTP 503 Service Unavailable: ", retry_after=0.0),
    ),
    (Reply(http_status=502), SendOutcome(Outcome.RETRYABLE, message="HTTP 502 Bad Gateway: ")),
    (
        Reply(http_status=504),
        SendOutcome(Outcome.RETRYABLE, message="HTTP 504 Gateway Timeout: "),
    ),
    (
        Reply(http_status=400, message="bad span"),
        SendOutcome(Outcome.PERMANENT, message="HTTP 400 Bad Request: bad span"),
    ),
    (
        Reply(http_status=500, message="oops"),
        SendOutcome(Outcome.PERMANENT, message="HTTP 500 Internal Server Error: oops"),
    ),
]


@pytest.mark.parametrize(("reply", "expected"), HTTP_ANSWERS)
def test_http_answers_are_classified(http_receiver, reply, expected):
    http_receiver.script(reply)
    exporter = http_exporter(http_receiver)
    assert exporter.send(encoded([full_span()])) == expected


def test_export_reports_failure_and_partial_success(transport):
    receiver, make = transport
    receiver.script(Reply(rejected=1), Reply(grpc.StatusCode.INVALID_ARGUMENT, http_status=400))
    exporter = make(receiver)
    assert exporter.export([full_span()]) is ExportResult.SUCCESS
    assert exporter.export([full_span()]) is ExportResult.FAILURE
    exporter.shutdown()
    assert exporter.export([full_span()]) is ExportResult.FAILURE
    assert len(receiver.received) == 2


@pytest.mark.parametrize("name", ["grpc", "http"])
def test_no_collector_is_retryable(name, grpc_receiver, http_receiver):
    receiver = grpc_receiver if name == "grpc" else http_receiver
    exporter = (grpc_exporter if name == "grpc" else http_exporter)(receiver)
    receiver.stop()
    outcome = exporter.send(encoded([full_span()]))
    assert outcome.outcome is Outcome.RETRYABLE
    assert outcome.retry_after is None


def test_retry_after_forms():
    assert _retry_after("120") == 120.0
    assert _retry_after(None) is None
    assert _retry_after("soon") is None
    past = email.utils.formatdate(time.time() - 60, usegmt=True)
    assert _retry_after(past) == 0.0
    future = email.utils.formatdate(time.time() + 3600, usegmt=True)
    assert 3000 < _retry_after(future) <= 3600


@pytest.mark.parametrize(
    "endpoint", ["ftp://collector:4318/v1/traces", "collector:4318", "http:///v1/traces"]
)
def test_http_rejects_bad_endpoints(endpoint):
    with pytest.raises(ValueError, match="bad OTLP/HTTP endpoint"):
        OtlpHttpSpanExporter(endpoint)


def test_unknown_compression_is_refused():
    with pytest.raises(ValueError, match="unsupported compression 'br'"):
        OtlpHttpSpanExporter("http://localhost:4318/v1/traces", compression="br")
    with pytest.raises(ValueError, match="unsupported compression 'br'"):
        OtlpGrpcSpanExporter("localhost:4317", compression="br")


@pytest.mark.parametrize(
    ("endpoint", "insecure", "expected"),
    [
        ("http://collector:4317", False, ("collector:4317", False)),
        ("https://collector:4317", True, ("collector:4317", True)),  # the scheme wins
        ("collector:4317", True, ("collector:4317", False)),
        ("collector:4317", False, ("collector:4317", True)),
        ("http://[::1]:4317", False, ("[::1]:4317", False)),
    ],
)
def test_grpc_target_and_tls(endpoint, insecure, expected):
    assert _grpc_target(endpoint, insecure) == expected


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_processor_from_configuration(protocol, grpc_receiver, http_receiver):
    receiver = grpc_receiver if protocol == "grpc" else http_receiver
    config = load(
        {
            "otlp_protocol": protocol,
            "otlp_endpoint": receiver.endpoint,
            "otlp_compression": "gzip",
            "otlp_headers": {"x-tenant": "t1"},
            "bsp_schedule_delay_ms": 60_000,
        },
        {},
    )
    stats = Stats()
    processor = create_processor(config, stats)
    spans = [full_span(name="a"), full_span(name="b")]
    for span in spans:
        processor.on_end(span)

    assert processor.shutdown(timeout_millis=20_000)

    (received,) = receiver.wait_for(1)
    assert received.request == expected_request(spans)
    assert received.headers["x-tenant"] == "t1"
    assert stats["spans_exported"] == 2


@pytest.mark.parametrize("name", ["grpc", "http"])
def test_tls_with_a_trusted_certificate(name, tmp_path):
    tls = Tls.self_signed(tmp_path)
    receiver = (GrpcReceiver if name == "grpc" else HttpReceiver)(tls=tls)
    make = OtlpGrpcSpanExporter if name == "grpc" else OtlpHttpSpanExporter
    try:
        assert receiver.endpoint.startswith("https://")
        trusting = make(receiver.endpoint, certificate_file=tls.cert_file, timeout=10)
        assert trusting.export([full_span()]) is ExportResult.SUCCESS
        assert receiver.wait_for(1)[0].request == expected_request([full_span()])

        # without the CA the certificate is not trusted: nothing is sent in the clear
        untrusting = make(receiver.endpoint, timeout=10)
        assert untrusting.send(encoded([full_span()])).outcome is Outcome.RETRYABLE
        assert len(receiver.received) == 1
    finally:
        receiver.stop()


# A fresh interpreter: the test session itself has imported grpc long before.
_GRPC_IMPORTED_AFTER_EXPORTER = """
import sys
from probe.config import load
from probe.export.otlp import create_exporter
protocol = sys.argv[1]
create_exporter(load({}, {"OTEL_EXPORTER_OTLP_PROTOCOL": protocol})).shutdown()
print("grpc" in sys.modules)
"""


@pytest.mark.parametrize(("protocol", "imported"), [("http/protobuf", False), ("grpc", True)])
def test_grpc_is_imported_only_for_the_grpc_transport(protocol: str, imported: bool) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _GRPC_IMPORTED_AFTER_EXPORTER, protocol],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert done.stdout.strip() == str(imported)
