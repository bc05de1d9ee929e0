"""Spans to an OTLP ``ExportTraceServiceRequest``, written straight in protobuf's wire format.

Filling the official protobuf messages field by field was the export thread's
largest cost (issue 6). The request is simple enough to write by hand, and most
of it repeats from span to span: a process's resource, the scope, the attributes
spans share (`Span.shared_attributes`: a connection's), and most other attribute
pairs (method, server address, port, user agent...). Those are encoded once and
their bytes reused.

The mapping, field for field, is the one the official messages would get:
proto3 scalars at their default value are left out as they would be; a oneof
member, a submessage that was set and a repeated element are written even when
empty. Field numbers are those of opentelemetry/proto/{collector/trace,trace,
common,resource}/v1; tests/unit/test_otlp_wire.py parses the output with the
official classes and compares it with the messages built the official way.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

import probe
from probe.trace.span import (
    Attributes,
    AttributeValue,
    Resource,
    Span,
    SpanEvent,
    SpanKind,
    SpanLink,
    StatusCode,
)

SCOPE_NAME: Final = "probe"

# Strings longer than this are rarely repeated: not worth their memory in the cache.
MAX_CACHED_STRING: Final = 256
MAX_CACHED_NAMES: Final = 4096  # span names (a method, or a method and a route)

_VARINT, _FIXED64, _LEN = 0, 1, 2
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1
# Up to this, an int is one machine word to compiled code, where bigger ones
# (such as the bounds above, and 2**62 itself) take the slow way of every
# comparison.
_MAX_SMALL_INT: Final = 2**62 - 1
_MAX_SMALL_INT_VARINT: Final = 9  # bytes of its varint: 62 bits in groups of 7
_ONE_BYTE: Final = [bytes((n,)) for n in range(0x80)]
_FIXED64_LE: Final = struct.Struct("<Q").pack
_TWO_BYTES: Final = struct.Struct("<BB").pack
_THREE_BYTES: Final = struct.Struct("<BBB").pack
_DOUBLE_LE: Final = struct.Struct("<d").pack


def _varint(value: int) -> bytes:
    """An unsigned integer in base-128, least significant group first."""
    if value < 0x80:
        return _ONE_BYTE[value]
    # Two and three bytes (a span's size, a port) packed at once: no list made.
    if value < 0x4000:
        return _TWO_BYTES(value & 0x7F | 0x80, value >> 7)
    if value < 0x20_0000:
        return _THREE_BYTES(value & 0x7F | 0x80, value >> 7 & 0x7F | 0x80, value >> 14)
    groups = []
    while value >= 0x80:
        groups.append(value & 0x7F | 0x80)
        value >>= 7
    groups.append(value)
    return bytes(groups)


def _tag(field_number: int, wire_type: int) -> bytes:
    return _varint(field_number << 3 | wire_type)


def _len_field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: a string, bytes, or an embedded message."""
    return tag + _varint(len(payload)) + payload


# ExportTraceServiceRequest, ResourceSpans, Resource, ScopeSpans, InstrumentationScope
_REQUEST_RESOURCE_SPANS: Final = _tag(1, _LEN)
_RESOURCE_SPANS_RESOURCE: Final = _tag(1, _LEN)
_RESOURCE_SPANS_SCOPE_SPANS: Final = _tag(2, _LEN)
_RESOURCE_ATTRIBUTES: Final = _tag(1, _LEN)
_SCOPE_SPANS_SCOPE: Final = _tag(1, _LEN)
_SCOPE_SPANS_SPANS: Final = _tag(2, _LEN)
_SCOPE_NAME: Final = _tag(1, _LEN)
_SCOPE_VERSION: Final = _tag(2, _LEN)
# Span
_SPAN_TRACE_ID: Final = _tag(1, _LEN)
_SPAN_SPAN_ID: Final = _tag(2, _LEN)
_SPAN_PARENT_SPAN_ID: Final = _tag(4, _LEN)
_SPAN_NAME: Final = _tag(5, _LEN)
_SPAN_KIND: Final = _tag(6, _VARINT)
_SPAN_START_TIME: Final = _tag(7, _FIXED64)
_SPAN_END_TIME: Final = _tag(8, _FIXED64)
_SPAN_ATTRIBUTES: Final = _tag(9, _LEN)
_SPAN_EVENTS: Final = _tag(11, _LEN)
_SPAN_LINKS: Final = _tag(13, _LEN)
_SPAN_STATUS: Final = _tag(15, _LEN)
# Span.Event, Span.Link, Status
_EVENT_TIME: Final = _tag(1, _FIXED64)
_EVENT_NAME: Final = _tag(2, _LEN)
_EVENT_ATTRIBUTES: Final = _tag(3, _LEN)
_LINK_TRACE_ID: Final = _tag(1, _LEN)
_LINK_SPAN_ID: Final = _tag(2, _LEN)
_LINK_ATTRIBUTES: Final = _tag(4, _LEN)
_STATUS_MESSAGE: Final = _tag(2, _LEN)
_STATUS_CODE: Final = _tag(3, _VARINT)
# KeyValue, AnyValue, ArrayValue
_KEY_VALUE_KEY: Final = _tag(1, _LEN)
_KEY_VALUE_VALUE: Final = _tag(2, _LEN)
_ANY_STRING: Final = _tag(1, _LEN)
_ANY_BOOL: Final = _tag(2, _VARINT)
_ANY_INT: Final = _tag(3, _VARINT)
_ANY_DOUBLE: Final = _tag(4, _FIXED64)
_ANY_ARRAY: Final = _tag(5, _LEN)
_ARRAY_VALUES: Final = _tag(1, _LEN)

# Span.SpanKind and Status.StatusCode numbers, with their tags; UNSET status is no status.
_KIND_FIELDS: Final = {
    kind: _SPAN_KIND + _varint(number)
    for kind, number in ((SpanKind.INTERNAL, 1), (SpanKind.SERVER, 2), (SpanKind.CLIENT, 3))
}
_STATUS_CODE_FIELDS: Final = {
    StatusCode.OK: _STATUS_CODE + _varint(1),
    StatusCode.ERROR: _STATUS_CODE + _varint(2),
}

# A span's ids (16 and 8 bytes, as OTLP has them) and times, fields every span
# has, each group packed in one call: (tag, length, id) per id; (tag, fixed64)
# per time. Single-byte tags, which these field numbers have.
_TRACE_ID_SIZE: Final = 16
_SPAN_ID_SIZE: Final = 8
_IDS: Final = struct.Struct("<BB16sBB8s").pack
_IDS_AND_PARENT: Final = struct.Struct("<BB16sBB8sBB8s").pack
_TIMES: Final = struct.Struct("<BQBQ").pack
_TRACE_ID_TAG: Final = _SPAN_TRACE_ID[0]
_SPAN_ID_TAG: Final = _SPAN_SPAN_ID[0]
_PARENT_SPAN_ID_TAG: Final = _SPAN_PARENT_SPAN_ID[0]
_START_TIME_TAG: Final = _SPAN_START_TIME[0]
_END_TIME_TAG: Final = _SPAN_END_TIME[0]


def _string_field(tag: bytes, text: str) -> bytes:
    """An implicit-presence string field: left out when empty."""
    return _len_field(tag, text.encode()) if text else b""


def _add_bytes(parts: list[bytes], tag: bytes, value: bytes) -> None:
    """An implicit-presence bytes field (a string's too, encoded), left out
    when empty, as pieces of the caller's join: no bytes made for it here."""
    if value:
        parts.append(tag)
        parts.append(_varint(len(value)))
        parts.append(value)


def _add_fixed64(parts: list[bytes], tag: bytes, value: int) -> None:
    """An implicit-presence fixed64 field, left out when zero, as pieces of a join."""
    if value:
        parts.append(tag)
        parts.append(_FIXED64_LE(value))


def _any_value(value: AttributeValue) -> bytes:
    """The body of an AnyValue: exactly one member of its oneof, written even when empty."""
    # bool first: it is a subclass of int
    if isinstance(value, str):
        encoded = value.encode()
        return _ANY_STRING + _varint(len(encoded)) + encoded
    if isinstance(value, bool):
        return _ANY_BOOL + _ONE_BYTE[value]
    if isinstance(value, int):
        if 0 <= value <= _MAX_SMALL_INT:
            return _ANY_INT + _varint(value)
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ValueError(f"attribute value out of int64 range: {value}")
        return _ANY_INT + _varint(value & 0xFFFF_FFFF_FFFF_FFFF)  # two's complement, 10 bytes
    if isinstance(value, float):
        return _ANY_DOUBLE + _DOUBLE_LE(value)
    if isinstance(value, list | tuple):
        items = b"".join(_len_field(_ARRAY_VALUES, _any_value(item)) for item in value)
        return _len_field(_ANY_ARRAY, items)
    raise TypeError(f"unsupported attribute value {value!r}")


def _key_value_field(tag: bytes, key_field: bytes, value: AttributeValue) -> bytes:
    """One attribute as a KeyValue field with the given tag; ``key_field`` is its key's."""
    any_value = _any_value(value)
    any_size = _varint(len(any_value))
    size = len(key_field) + len(_KEY_VALUE_VALUE) + len(any_size) + len(any_value)
    # Sizes first, then one join: no bytes made for the value field on the way.
    return b"".join((tag, _varint(size), key_field, _KEY_VALUE_VALUE, any_size, any_value))


def _attribute_fields(tag: bytes, attributes: Attributes) -> list[bytes]:
    return [
        _key_value_field(tag, _string_field(_KEY_VALUE_KEY, key), value)
        for key, value in attributes.items()
    ]


class _CachedAttributes:
    """Attributes as KeyValue fields of one tag, remembering the pairs it has encoded.

    Looked up by key, then by value: no tuple is built and hashed per attribute.
    An int not found is written after its key's prefix, kept per length of the
    int's varint, with no AnyValue made: a connection per request brings two
    new ports a span. Bounded: when full it starts over, which costs one
    encoding per pair that is still in use; the ports, paths and addresses
    that never repeat are what fills it.
    """

    def __init__(self, tag: bytes, max_entries: int) -> None:
        self._tag = tag
        self._max_entries = max_entries
        # key -> value -> (the value's type, the KeyValue field)
        self._fields: dict[str, dict[AttributeValue, tuple[type, bytes]]] = {}
        self._entries = 0
        self._key_fields: dict[str, bytes] = {}  # KeyValue.key fields
        # key -> the KeyValue field up to an int's varint, by the varint's length
        self._int_prefixes: dict[str, list[bytes]] = {}

    def append_fields(self, out: list[bytes], attributes: Attributes) -> None:
        by_key = self._fields
        for key, value in attributes.items():
            # Values whose pairs are cached: str, int and bool, hashable and equal
            # only when they encode alike but for True == 1, which the cached type
            # tells apart (floats are not: 0.0 == -0.0). Compared one by one: a
            # set's lookup measured 8 ns more an attribute.
            value_type = type(value)
            if value_type is not str and value_type is not int and value_type is not bool:
                out.append(self._encode(key, value))
                continue
            by_value = by_key.get(key)
            if by_value is None:
                by_value = by_key[key] = {}
            cached = by_value.get(value)
            if cached is not None and cached[0] is value_type:
                out.append(cached[1])
                continue
            field = self._encode(key, value)
            out.append(field)
            if cached is None and (not isinstance(value, str) or len(value) <= MAX_CACHED_STRING):
                if self._entries >= self._max_entries:
                    by_key.clear()
                    self._entries = 0
                    by_value = by_key[key] = {}
                by_value[value] = (value_type, field)
                self._entries += 1

    def _encode(self, key: str, value: AttributeValue) -> bytes:
        if type(value) is int and 0 <= value <= _MAX_SMALL_INT:
            encoded = _varint(value)
            prefixes = self._int_prefixes.get(key)
            if prefixes is None:
                prefixes = self._int_prefixes_of(key)
            return prefixes[len(encoded)] + encoded
        return _key_value_field(self._tag, self._key_field(key), value)

    def _key_field(self, key: str) -> bytes:
        key_field = self._key_fields.get(key)
        if key_field is None:
            key_field = _string_field(_KEY_VALUE_KEY, key)
            if len(self._key_fields) >= self._max_entries:
                self._key_fields.clear()
            self._key_fields[key] = key_field
        return key_field

    def _int_prefixes_of(self, key: str) -> list[bytes]:
        """The KeyValue field of ``key`` and an int, up to the int's varint,
        for each of a small int's varint lengths (1 to 9: index 0 is unused):
        the field of the smallest int of that length, its varint cut off."""
        key_field = self._key_field(key)
        prefixes = [b""]
        for length in range(1, _MAX_SMALL_INT_VARINT + 1):
            field = _key_value_field(self._tag, key_field, 1 << 7 * (length - 1))
            prefixes.append(field[:-length])
        if len(self._int_prefixes) >= self._max_entries:
            self._int_prefixes.clear()
        self._int_prefixes[key] = prefixes
        return prefixes


class TraceRequestEncoder:
    """Encodes batches of spans as ExportTraceServiceRequest bytes.

    One ResourceSpans per distinct resource (by `Resource.key`), in order of
    first appearance, each with the single `probe` scope. Safe to share between
    threads: a cache entry, whenever it is found, is right.
    """

    def __init__(
        self,
        max_cached_attributes: int = 4096,
        max_cached_resources: int = 1024,
        max_cached_shared: int = 4096,
    ) -> None:
        self._span_attributes = _CachedAttributes(_SPAN_ATTRIBUTES, max_cached_attributes)
        self._max_cached_resources = max_cached_resources
        self._max_cached_shared = max_cached_shared
        # id(shared attributes) -> (them, their KeyValue fields), held as resources are:
        # the shared attributes of a connection's spans, encoded once per connection.
        self._shared: dict[int, tuple[Attributes, bytes]] = {}
        self._names: dict[str, bytes] = {}  # span name -> its field: names repeat
        # id(resource) -> (resource, its Resource field). The entry holds the resource
        # so that its id cannot pass to another while cached; a Resource does not
        # change once made.
        self._resources: dict[int, tuple[Resource, bytes]] = {}
        scope = _string_field(_SCOPE_NAME, SCOPE_NAME) + _string_field(
            _SCOPE_VERSION, probe.__version__
        )
        self._scope_field = _len_field(_SCOPE_SPANS_SCOPE, scope)

    def encode(self, spans: Sequence[Span]) -> bytes:
        by_key: dict[tuple, tuple[Resource, list[bytes]]] = {}  # Resource.key() -> span fields
        by_identity: dict[int, list[bytes]] = {}  # id(resource) -> the same lists: key() is costly
        for span in spans:
            span_fields = by_identity.get(id(span.resource))
            if span_fields is None:
                resource = span.resource
                _, span_fields = by_key.setdefault(resource.key(), (resource, []))
                by_identity[id(resource)] = span_fields
            span_fields.append(self._span_field(span))
        return b"".join(
            self._resource_spans_field(resource, span_fields)
            for resource, span_fields in by_key.values()
        )

    def _resource_spans_field(self, resource: Resource, span_fields: list[bytes]) -> bytes:
        # Sizes first, then a single join: the spans' bytes are copied once.
        resource_field = self._resource_field(resource)
        scope_spans_size = len(self._scope_field) + sum(map(len, span_fields))
        scope_spans_head = _RESOURCE_SPANS_SCOPE_SPANS + _varint(scope_spans_size)
        size = len(resource_field) + len(scope_spans_head) + scope_spans_size
        head = [_REQUEST_RESOURCE_SPANS, _varint(size), resource_field, scope_spans_head]
        return b"".join([*head, self._scope_field, *span_fields])

    def _resource_field(self, resource: Resource) -> bytes:
        cached = self._resources.get(id(resource))
        if cached is not None:
            return cached[1]
        attributes = b"".join(_attribute_fields(_RESOURCE_ATTRIBUTES, resource.attributes))
        # Without attributes the Resource message was never set: no field at all.
        field = _len_field(_RESOURCE_SPANS_RESOURCE, attributes) if attributes else b""
        if len(self._resources) >= self._max_cached_resources:
            self._resources.clear()
        self._resources[id(resource)] = (resource, field)
        return field

    def _span_field(self, span: Span) -> bytes:
        # The fields' pieces, joined once: no bytes made per field on the way.
        parts: list[bytes] = []
        trace_id, span_id, parent_id = span.trace_id, span.span_id, span.parent_span_id
        if len(trace_id) == _TRACE_ID_SIZE and len(span_id) == _SPAN_ID_SIZE:
            if parent_id is None:
                parts.append(
                    _IDS(
                        _TRACE_ID_TAG, _TRACE_ID_SIZE, trace_id,
                        _SPAN_ID_TAG, _SPAN_ID_SIZE, span_id,
                    )
                )  # fmt: skip
            elif len(parent_id) == _SPAN_ID_SIZE:
                parts.append(
                    _IDS_AND_PARENT(
                        _TRACE_ID_TAG, _TRACE_ID_SIZE, trace_id,
                        _SPAN_ID_TAG, _SPAN_ID_SIZE, span_id,
                        _PARENT_SPAN_ID_TAG, _SPAN_ID_SIZE, parent_id,
                    )
                )  # fmt: skip
            else:
                self._add_ids(parts, span)
        else:
            self._add_ids(parts, span)
        parts.append(self._name_field(span.name))
        parts.append(_KIND_FIELDS[span.kind])
        start, end = span.start_time_unix_nano, span.end_time_unix_nano
        if start and end:
            parts.append(_TIMES(_START_TIME_TAG, start, _END_TIME_TAG, end))
        else:
            _add_fixed64(parts, _SPAN_START_TIME, start)
            _add_fixed64(parts, _SPAN_END_TIME, end)
        if span.shared_attributes:
            parts.append(self._shared_fields(span.shared_attributes))
        self._span_attributes.append_fields(parts, span.attributes)
        if span.events:  # each test saves a map and its call, most spans having none
            parts += map(_event_field, span.events)
        if span.links:
            parts += map(_link_field, span.links)
        if span.status_code is not StatusCode.UNSET:
            status = _string_field(_STATUS_MESSAGE, span.status_message)
            parts.append(_len_field(_SPAN_STATUS, status + _STATUS_CODE_FIELDS[span.status_code]))
        return _len_field(_SCOPE_SPANS_SPANS, b"".join(parts))

    @staticmethod
    def _add_ids(parts: list[bytes], span: Span) -> None:
        """Ids of other sizes than OTLP's, or an empty parent id: as they are."""
        _add_bytes(parts, _SPAN_TRACE_ID, span.trace_id)
        _add_bytes(parts, _SPAN_SPAN_ID, span.span_id)
        _add_bytes(parts, _SPAN_PARENT_SPAN_ID, span.parent_span_id or b"")

    def _name_field(self, name: str) -> bytes:
        field = self._names.get(name)
        if field is None:
            field = _string_field(_SPAN_NAME, name)
            if len(self._names) >= MAX_CACHED_NAMES:
                self._names.clear()
            self._names[name] = field
        return field

    def _shared_fields(self, shared: Attributes) -> bytes:
        cached = self._shared.get(id(shared))
        if cached is not None:
            return cached[1]
        fields: list[bytes] = []
        self._span_attributes.append_fields(fields, shared)
        encoded = b"".join(fields)
        if len(self._shared) >= self._max_cached_shared:
            self._shared.clear()
        self._shared[id(shared)] = (shared, encoded)
        return encoded


def _event_field(event: SpanEvent) -> bytes:
    parts: list[bytes] = []
    _add_fixed64(parts, _EVENT_TIME, event.time_unix_nano)
    _add_bytes(parts, _EVENT_NAME, event.name.encode())
    parts += _attribute_fields(_EVENT_ATTRIBUTES, event.attributes)
    return _len_field(_SPAN_EVENTS, b"".join(parts))  # written even when empty, as repeated


def _link_field(link: SpanLink) -> bytes:
    parts: list[bytes] = []
    _add_bytes(parts, _LINK_TRACE_ID, link.trace_id)
    _add_bytes(parts, _LINK_SPAN_ID, link.span_id)
    parts += _attribute_fields(_LINK_ATTRIBUTES, link.attributes)
    return _len_field(_SPAN_LINKS, b"".join(parts))
