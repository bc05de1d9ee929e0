"""The span model, shaped like OTLP's so exporters map it field by field."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

# OpenTelemetry's attribute values: a primitive, or a homogeneous array of one.
AttributeValue = str | bool | int | float | list[str] | list[bool] | list[int] | list[float]
Attributes = dict[str, AttributeValue]


class SpanKind(Enum):
    INTERNAL = 1
    SERVER = 2
    CLIENT = 3

    # Enum hashes a member's name in Python code, 150-300 ns a lookup, and the
    # encoder looks every span's kind up. Members are singletons compared by
    # identity, so the identity's hash, in C, is as good.
    __hash__ = object.__hash__


class StatusCode(Enum):
    UNSET = 0
    OK = 1
    ERROR = 2

    __hash__ = object.__hash__  # as SpanKind's


@dataclass(frozen=True, slots=True)
class Resource:
    """The entity that produced spans: here, one traced process."""

    attributes: Attributes

    def key(self) -> tuple:
        """A hashable identity, for grouping spans by resource."""
        return tuple(sorted((k, str(v)) for k, v in self.attributes.items()))


@dataclass(slots=True)
class SpanEvent:
    name: str
    time_unix_nano: int
    attributes: Attributes = field(default_factory=dict)


@dataclass(slots=True)
class SpanLink:
    trace_id: bytes
    span_id: bytes
    attributes: Attributes = field(default_factory=dict)


# The ids of a span built before it is linked: all zero, which W3C and OTLP
# hold invalid, so never taken for real ones. The linker gives the real ids.
UNSET_TRACE_ID: Final = bytes(16)
UNSET_SPAN_ID: Final = bytes(8)

_POOL_BYTES: Final = 4096


class RandomIds:
    """Random ids, cut from a pool of random bytes drawn 4 KiB at a time: a
    slice of the pool costs about half a draw of its own.

    Ids must be unique, not secret: a PRNG seeded once from the OS costs a
    fraction of os.urandom, which is a syscall per draw (and every syscall
    of the probe passes through the tracepoints it attaches). Not for
    threads to share: the linker draws every id, on the pipeline's thread."""

    __slots__ = ("random", "_pool", "_at")

    def __init__(self) -> None:
        self.random = random.Random(os.urandom(32))
        self._pool = b""
        self._at = 0

    def take(self, unset: bytes) -> bytes:
        """An id of the size of ``unset``, the all-zero id (UNSET_TRACE_ID or
        UNSET_SPAN_ID), which W3C and OTLP hold invalid: never that one."""
        size = len(unset)
        while True:
            at = self._at
            if at + size > len(self._pool):
                self._pool = self.random.getrandbits(_POOL_BYTES * 8).to_bytes(_POOL_BYTES, "big")
                at = 0
            self._at = at + size
            taken = self._pool[at : at + size]
            if taken != unset:
                return taken


_ids: Final = RandomIds()


def new_trace_id() -> bytes:
    return _ids.take(UNSET_TRACE_ID)


def new_span_id() -> bytes:
    return _ids.take(UNSET_SPAN_ID)


@dataclass(slots=True, init=False)
class Span:
    """One operation. Its attributes are ``attributes``, its own, together with
    ``shared_attributes``: those it has in common with other spans (of its
    connection; a connection's first span, with the first spans of other
    connections to the same server end), one dict for all of them. The two
    never name the same key, and a shared dict does not change once a span
    holds it, so that exporters may encode it once, by identity (as they do
    resources). `all_attributes` merges them."""

    name: str
    kind: SpanKind
    start_time_unix_nano: int
    end_time_unix_nano: int
    resource: Resource
    trace_id: bytes = field(default_factory=new_trace_id)  # 16 bytes
    span_id: bytes = field(default_factory=new_span_id)  # 8 bytes
    parent_span_id: bytes | None = None  # 8 bytes, or None for a root span
    status_code: StatusCode = StatusCode.UNSET
    status_message: str = ""
    attributes: Attributes = field(default_factory=dict)
    events: list[SpanEvent] = field(default_factory=list)
    links: list[SpanLink] = field(default_factory=list)
    shared_attributes: Attributes | None = None

    def __init__(  # written out for mypyc (probe/compiled.py)
        self,
        name: str,
        kind: SpanKind,
        start_time_unix_nano: int,
        end_time_unix_nano: int,
        resource: Resource,
        trace_id: bytes | None = None,  # None: a new one
        span_id: bytes | None = None,  # None: a new one
        parent_span_id: bytes | None = None,
        status_code: StatusCode = StatusCode.UNSET,
        status_message: str = "",
        attributes: Attributes | None = None,
        events: list[SpanEvent] | None = None,
        links: list[SpanLink] | None = None,
        shared_attributes: Attributes | None = None,
    ) -> None:
        self.name = name
        self.kind = kind
        self.start_time_unix_nano = start_time_unix_nano
        self.end_time_unix_nano = end_time_unix_nano
        self.resource = resource
        self.trace_id = new_trace_id() if trace_id is None else trace_id
        self.span_id = new_span_id() if span_id is None else span_id
        self.parent_span_id = parent_span_id
        self.status_code = status_code
        self.status_message = status_message
        self.attributes = {} if attributes is None else attributes
        self.events = [] if events is None else events
        self.links = [] if links is None else links
        self.shared_attributes = shared_attributes

    def all_attributes(self) -> Attributes:
        """Every attribute of the span, shared and its own."""
        if not self.shared_attributes:
            return self.attributes
        return {**self.shared_attributes, **self.attributes}

    @property
    def duration_ns(self) -> int:
        return self.end_time_unix_nano - self.start_time_unix_nano
