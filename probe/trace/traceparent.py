"""W3C Trace Context: reading the ``traceparent`` and ``tracestate`` headers.

Parsing follows the recommendation's rules for a receiver: a value that is not
exactly right is rejected whole (``None``), never repaired, and nothing here
raises on what came off the wire. A higher version than ``00`` is read as far
as version ``00`` defines, as the recommendation asks.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Final

_TRACEPARENT: Final = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_TRACESTATE_MEMBER: Final = re.compile(
    r"(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
MAX_TRACESTATE_MEMBERS: Final = 32
_INVALID_VERSION: Final = "ff"
_ZERO_TRACE_ID: Final = bytes(16)
_ZERO_SPAN_ID: Final = bytes(8)


@dataclass(frozen=True, slots=True)
class TraceParent:
    """A valid ``traceparent``: whose trace a request is in, and which span sent it."""

    trace_id: bytes  # 16 bytes, not all zero
    parent_id: bytes  # 8 bytes, not all zero
    flags: int  # trace-flags; bit 0 is "sampled"
    version: int = 0
    state: str = ""  # the request's ``tracestate``, when present and well-formed

    def header(self) -> str:
        """The value as version 00 writes it."""
        return f"00-{self.trace_id.hex()}-{self.parent_id.hex()}-{self.flags:02x}"


def parse_traceparent(value: str) -> TraceParent | None:
    """The trace context in one ``traceparent`` value, or None when it is invalid."""
    value = value.strip(" \t")
    match = _TRACEPARENT.match(value)
    if match is None:
        return None
    version, trace_hex, parent_hex, flags_hex = match.groups()
    if version == _INVALID_VERSION:
        return None
    # version 00 is exactly 55 characters; later versions may append "-..." fields
    if len(value) != match.end() and (version == "00" or value[match.end()] != "-"):
        return None
    trace_id, parent_id = bytes.fromhex(trace_hex), bytes.fromhex(parent_hex)
    if trace_id == _ZERO_TRACE_ID or parent_id == _ZERO_SPAN_ID:
        return None
    return TraceParent(trace_id, parent_id, int(flags_hex, 16), int(version, 16))


def valid_tracestate(value: str) -> bool:
    """Whether a ``tracestate`` value (list members joined by commas) is well-formed."""
    members = [member.strip(" \t") for member in value.split(",")]
    members = [member for member in members if member]  # empty members are allowed
    if len(members) > MAX_TRACESTATE_MEMBERS:
        return False
    keys = [member.partition("=")[0] for member in members]
    return len(set(keys)) == len(keys) and all(
        _TRACESTATE_MEMBER.fullmatch(member) for member in members
    )


def find_traceparent(headers: list[tuple[str, str]]) -> tuple[TraceParent | None, bool]:
    """(the request's trace context, whether a header was present but malformed).

    More than one ``traceparent`` is malformed: a receiver cannot tell which to
    trust. A malformed ``tracestate`` is dropped without costing the
    ``traceparent``, as the recommendation says; several are one list.
    """
    values = [value for name, value in headers if name == "traceparent"]
    if not values:
        return None, False
    parent = parse_traceparent(values[0]) if len(values) == 1 else None
    if parent is None:
        return None, True
    states = [value for name, value in headers if name == "tracestate"]
    if not states:
        return parent, False
    state = ",".join(states)
    if not valid_tracestate(state):
        return parent, True
    return dataclasses.replace(parent, state=state), False
