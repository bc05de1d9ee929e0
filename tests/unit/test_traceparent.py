"""W3C traceparent/tracestate parsing: exact on valid values, None on anything else."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probe.trace.traceparent import (
    TraceParent,
    find_traceparent,
    parse_traceparent,
    valid_tracestate,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01"


def test_valid_value() -> None:
    assert parse_traceparent(VALID) == TraceParent(
        bytes.fromhex(TRACE), bytes.fromhex(PARENT), flags=1, version=0
    )
    assert parse_traceparent(VALID).header() == VALID


def test_later_version_is_read_as_far_as_00_goes() -> None:
    parsed = parse_traceparent(f"cc-{TRACE}-{PARENT}-00-what-the-future-holds")
    assert parsed == TraceParent(bytes.fromhex(TRACE), bytes.fromhex(PARENT), 0, version=0xCC)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "00",
        f"ff-{TRACE}-{PARENT}-01",  # version ff is forbidden
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE.upper()}-{PARENT}-01",  # upper case
        f"00-{TRACE}-{PARENT}-01-extra",  # version 00 has exactly four fields
        f"cc-{TRACE}-{PARENT}-01extra",  # a later version still separates with "-"
        f"00-{TRACE[:-1]}-{PARENT}-01",
        f"00-{TRACE}-{PARENT}-1",
        f"00_{TRACE}_{PARENT}_01",
        f"0g-{TRACE}-{PARENT}-01",
        f"00-{TRACE}-{PARENT}-0x",
        f"00-{TRACE}x-{PARENT}-01",
    ],
)
def test_invalid_values(value: str) -> None:
    assert parse_traceparent(value) is None


def test_tracestate() -> None:
    assert valid_tracestate("congo=t61rcWkgMzE, rojo=00f067aa0ba902b7")
    assert valid_tracestate("vendor@tenant=x,,")
    assert not valid_tracestate("a=1,a=2")  # a key appears once
    assert not valid_tracestate("Upper=1")
    assert not valid_tracestate("a=b=c,")  # "=" cannot be in a value
    assert not valid_tracestate(",".join(f"k{i}=v" for i in range(33)))


def test_find_in_headers() -> None:
    header = [("traceparent", VALID)]
    parsed = parse_traceparent(VALID)
    assert find_traceparent([("host", "x")]) == (None, False)
    assert find_traceparent(header) == (parsed, False)
    assert find_traceparent(header * 2) == (None, True)  # which one would be true?
    assert find_traceparent([("traceparent", "junk")]) == (None, True)
    with_state = find_traceparent([*header, ("tracestate", "a=1"), ("tracestate", "b=2")])
    assert with_state[0] is not None and with_state == (
        TraceParent(parsed.trace_id, parsed.parent_id, 1, state="a=1,b=2"),
        False,
    )
    # a bad tracestate is dropped, the traceparent still counts
    assert find_traceparent([*header, ("tracestate", "A=1")]) == (parsed, True)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_fuzz_never_raises_and_only_valid_ids(value: str) -> None:
    parsed = parse_traceparent(value)
    if parsed is not None:
        assert len(parsed.trace_id) == 16 and any(parsed.trace_id)
        assert len(parsed.parent_id) == 8 and any(parsed.parent_id)
        assert parsed.version != 0xFF


_HEX = "0123456789abcdef"


@settings(max_examples=200, deadline=None)
@given(
    st.text(_HEX, min_size=32, max_size=32),
    st.text(_HEX, min_size=16, max_size=16),
    st.integers(0, 255),
    st.integers(0, 54),
    st.characters(),
)
def test_fuzz_one_changed_character(
    trace: str, parent: str, flags: int, where: int, replacement: str
) -> None:
    value = f"00-{trace}-{parent}-{flags:02x}"
    parsed = parse_traceparent(value)
    if any(c != "0" for c in trace) and any(c != "0" for c in parent):
        assert parsed is not None and parsed.header() == value
    mutated = value[:where] + replacement + value[where + 1 :]
    reparsed = parse_traceparent(mutated)
    if reparsed is not None:  # only a hex digit for a hex digit keeps it valid
        assert f"{reparsed.version:02x}{reparsed.header()[2:]}" == mutated
