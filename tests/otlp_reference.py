"""The OTLP request for some spans, built with the official protobuf messages.

What `probe.export.otlp_wire` must encode, field for field: tests parse its
bytes with the official classes and compare them with `expected_request`.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    InstrumentationScope,
    KeyValue,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as ResourceMessage
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Status
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanMessage

import probe
from probe.trace.span import Attributes, AttributeValue, Span, SpanKind, StatusCode

KINDS = {
    SpanKind.INTERNAL: SpanMessage.SPAN_KIND_INTERNAL,
    SpanKind.SERVER: SpanMessage.SPAN_KIND_SERVER,
    SpanKind.CLIENT: SpanMessage.SPAN_KIND_CLIENT,
}
STATUS_CODES = {StatusCode.OK: Status.STATUS_CODE_OK, StatusCode.ERROR: Status.STATUS_CODE_ERROR}


def expected_request(spans: Sequence[Span]) -> ExportTraceServiceRequest:
    """One ResourceSpans per `Resource.key`, in order of first appearance, with the
    resource's attributes as the first span of the group has them; one `probe` scope."""
    groups: dict[tuple, ResourceSpans] = {}
    for span in spans:
        group = groups.get(span.resource.key())
        if group is None:
            scope = InstrumentationScope(name="probe", version=probe.__version__)
            group = groups[span.resource.key()] = ResourceSpans(
                scope_spans=[ScopeSpans(scope=scope)]
            )
            if span.resource.attributes:  # an empty Resource is left unset
                group.resource.CopyFrom(
                    ResourceMessage(attributes=key_values(span.resource.attributes))
                )
        group.scope_spans[0].spans.append(span_message(span))
    return ExportTraceServiceRequest(resource_spans=list(groups.values()))


def span_message(span: Span) -> SpanMessage:
    message = SpanMessage(
        trace_id=span.trace_id,
        span_id=span.span_id,
        parent_span_id=span.parent_span_id or b"",
        name=span.name,
        kind=KINDS[span.kind],
        start_time_unix_nano=span.start_time_unix_nano,
        end_time_unix_nano=span.end_time_unix_nano,
        attributes=key_values(span.all_attributes()),
        events=[
            SpanMessage.Event(
                time_unix_nano=event.time_unix_nano,
                name=event.name,
                attributes=key_values(event.attributes),
            )
            for event in span.events
        ],
        links=[
            SpanMessage.Link(
                trace_id=link.trace_id, span_id=link.span_id, attributes=key_values(link.attributes)
            )
            for link in span.links
        ],
    )
    if span.status_code is not StatusCode.UNSET:
        message.status.CopyFrom(
            Status(code=STATUS_CODES[span.status_code], message=span.status_message)
        )
    return message


def key_values(attributes: Attributes) -> list[KeyValue]:
    return [KeyValue(key=key, value=any_value(value)) for key, value in attributes.items()]


def any_value(value: AttributeValue) -> AnyValue:
    if isinstance(value, str):
        return AnyValue(string_value=value)
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    # an empty list is still an array
    return AnyValue(array_value=ArrayValue(values=[any_value(item) for item in value]))
