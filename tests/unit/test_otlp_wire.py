"""The hand-written OTLP encoder against the official protobuf messages.

Its bytes are parsed with the official ExportTraceServiceRequest and compared
with the request the official messages make of the same spans
(`tests.otlp_reference`): a wrong field number, wire type or length fails.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from probe.export.otlp_wire import MAX_CACHED_STRING, TraceRequestEncoder
from probe.trace.span import Resource, Span, SpanEvent, SpanKind, SpanLink, StatusCode
from tests.otlp_reference import expected_request

int64s = st.integers(min_value=-(2**63), max_value=2**63 - 1)
scalars = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "GET", "héllo wörld ✓", "\U0001f600", "x" * (MAX_CACHED_STRING + 1)]),
    st.booleans(),
    st.sampled_from([0, 1, -1, 2**63 - 1, -(2**63), 127, 128, 2**14, 2**35, 2**62 - 1, 2**62]),
    int64s,
    st.floats(allow_nan=False),
)
values = st.one_of(scalars, st.lists(scalars, max_size=4))
# Few keys, so that pairs recur between spans and are read back from the cache.
keys = st.one_of(st.sampled_from(["http.request.method", "server.port", "ключ", ""]), st.text())
attributes = st.dictionaries(keys, values, max_size=8)
times = st.integers(min_value=0, max_value=2**64 - 1)
ids = st.one_of(st.binary(min_size=16, max_size=16), st.binary(max_size=20))

RESOURCES = [
    Resource({"service.name": "nginx", "process.pid": 42, "host.arch": "amd64"}),
    Resource({"service.name": "nginx", "process.pid": 42, "host.arch": "amd64"}),  # equal
    Resource({"service.name": "curl", "process.pid": 7, "tags": ["a", "b"]}),
    Resource({"service.name": "curl", "process.pid": "7", "tags": ["a", "b"]}),  # same key()
    Resource({}),
    Resource({"service.name": "ünïcode", "process.command_line": "x" * 300}),
]

# A connection's shared attributes: keys of their own (Span keeps the two
# apart), and few dicts, so that the same one recurs and is read from the cache.
SHARED = [
    None,
    {},
    {"shared.address": "10.0.0.1", "shared.port": 8080},
    {"shared.address": "10.0.0.1", "shared.port": 8081},
    {"shared.flag": True, "shared.list": ["a", "b"], "shared.ratio": 0.5},
]

spans = st.builds(
    Span,
    shared_attributes=st.sampled_from(SHARED),
    name=st.text(max_size=20),
    kind=st.sampled_from(SpanKind),
    start_time_unix_nano=times,
    end_time_unix_nano=times,
    resource=st.sampled_from(RESOURCES),
    trace_id=ids,
    span_id=ids,
    parent_span_id=st.none() | st.binary(max_size=8),
    status_code=st.sampled_from(StatusCode),
    status_message=st.text(max_size=20),
    attributes=attributes,
    events=st.lists(st.builds(SpanEvent, st.text(max_size=10), times, attributes), max_size=2),
    links=st.lists(st.builds(SpanLink, ids, ids, attributes), max_size=2),
)


def assert_encodes_as_official(encoder: TraceRequestEncoder, batch: list[Span]) -> None:
    data = encoder.encode(batch)
    expected = expected_request(batch)
    assert ExportTraceServiceRequest.FromString(data) == expected
    # Nothing more than the official form: no unknown fields, no repeats, no defaults written.
    assert len(data) == expected.ByteSize()


@settings(max_examples=300, deadline=None)
@given(st.lists(spans, max_size=8))
def test_encoding_matches_the_official_messages(batch):
    # Small caches, so they fill up and start over within one example.
    encoder = TraceRequestEncoder(
        max_cached_attributes=8, max_cached_resources=2, max_cached_shared=2
    )
    assert_encodes_as_official(encoder, batch)
    assert_encodes_as_official(encoder, batch)  # again, now from the caches


def test_edge_values_of_every_kind():
    encoder = TraceRequestEncoder()
    batch = [
        Span(
            name="",
            kind=kind,
            start_time_unix_nano=0,
            end_time_unix_nano=2**64 - 1,
            resource=resource,
            trace_id=b"",
            span_id=b"",
            status_code=status,
            attributes={"empty": "", "false": False, "zero": 0, "float": 0.0, "list": []},
            events=[SpanEvent("", 0)],
            links=[SpanLink(b"", b"")],
        )
        for kind in SpanKind
        for status in StatusCode
        for resource in (RESOURCES[0], RESOURCES[4])
    ]
    assert_encodes_as_official(encoder, batch)


def test_equal_values_of_other_types_stay_apart():
    """True == 1 == 1.0 and 0.0 == -0.0 in Python, but not on the wire."""
    encoder = TraceRequestEncoder()
    values = [-0.0, 1, True, 1.0, 0, False, 0.0, "1"]
    batch = [Span("s", SpanKind.SERVER, 1, 2, RESOURCES[0], attributes={"v": v}) for v in values]
    for _ in range(2):  # cold, then warm caches
        request = ExportTraceServiceRequest.FromString(encoder.encode(batch))
        decoded = []
        for span in request.resource_spans[0].scope_spans[0].spans:
            value = span.attributes[0].value
            decoded.append(getattr(value, value.WhichOneof("value")))
        assert [type(v) for v in decoded] == [type(v) for v in values]
        assert decoded == values
        signs = [math.copysign(1, v) for v in decoded if isinstance(v, float)]
        assert signs == [-1, 1, 1]


def test_ints_of_every_varint_length_encode_as_official():
    """New ints are written after a prefix chosen by their varint's length."""
    encoder = TraceRequestEncoder()
    values = [0, 1, 127, 128, *(2**shift for shift in range(14, 63, 7)), 2**62 - 1, 2**63 - 1]
    values += [-1, -(2**63)]  # ten bytes, two's complement: the general way
    batch = [
        Span("s", SpanKind.SERVER, 1, 2, RESOURCES[0], attributes={"n": v, "m": v // 3})
        for v in values
    ]
    for _ in range(2):  # new ints, then remembered ones
        assert_encodes_as_official(encoder, batch)


def test_caches_stay_bounded():
    encoder = TraceRequestEncoder(
        max_cached_attributes=64, max_cached_resources=4, max_cached_shared=8
    )
    for i in range(500):
        resource = Resource({"process.pid": i})
        span = Span("s", SpanKind.CLIENT, 1, 2, resource, attributes={"port": i, "path": f"/{i}"})
        span.shared_attributes = {"peer.port": i}
        assert_encodes_as_official(encoder, [span])
    cache = encoder._span_attributes  # the only way to see its size
    assert 0 < sum(map(len, cache._fields.values())) <= 64  # pairs, under their keys
    assert len(encoder._resources) <= 4
    assert 0 < len(encoder._shared) <= 8


def test_shared_attributes_are_encoded_once_per_dict():
    encoder = TraceRequestEncoder()
    shared = {"network.peer.address": "10.0.0.2", "network.peer.port": 51000}
    batch = [Span("s", SpanKind.SERVER, 1, 2, RESOURCES[0], attributes={"n": n}) for n in range(3)]
    for span in batch:
        span.shared_attributes = shared
    assert_encodes_as_official(encoder, batch)
    assert list(encoder._shared.values()) == [(shared, encoder._shared[id(shared)][1])]


@pytest.mark.parametrize(
    ("value", "error"),
    [(2**63, ValueError), (-(2**63) - 1, ValueError), (None, TypeError), ({"a": 1}, TypeError)],
)
def test_values_outside_otlp_are_refused(value, error):
    span = Span("s", SpanKind.SERVER, 1, 2, RESOURCES[0], attributes={"v": value})
    with pytest.raises(error):
        TraceRequestEncoder().encode([span])
