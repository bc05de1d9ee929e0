"""Ring-buffer records -> the dataclasses of `probe.kernel.events`.

Layouts come from `probe.kernel.contract` (cffi reading bpf/probe.h). An
ADDR record (a client's local address, learnt after connect() returned) is
decoded into a `ConnOpen` carrying both addresses; `EventSource` merges it.
"""

from __future__ import annotations

import socket

from probe.kernel.contract import DATA_HEADER_SIZE, ffi, lib
from probe.kernel.events import (
    ConnClose,
    ConnKey,
    ConnOpen,
    DataEvent,
    Direction,
    Endpoint,
    KernelEvent,
    ProcessExec,
    ProcessExit,
    Role,
)
from probe.kernel.sockets import unmap_ipv4


class AddressUpdate(ConnOpen):
    """A client connection's local address, known only after ESTABLISHED."""

    __slots__ = ()


def _endpoint(raw) -> Endpoint | None:
    if raw.family == lib.PROBE_AF_INET:
        address = socket.inet_ntop(socket.AF_INET, bytes(raw.addr)[:4])
    elif raw.family == lib.PROBE_AF_INET6:
        address = unmap_ipv4(socket.inet_ntop(socket.AF_INET6, bytes(raw.addr)))
    else:
        return None
    return Endpoint(address, raw.port)


def _key(header) -> ConnKey:
    return ConnKey(header.conn.pid, header.conn.fd, header.conn.generation)


def decode(address: int, size: int) -> KernelEvent | None:
    """Decode the record at ``address`` (``size`` bytes); None if malformed."""
    if size < ffi.sizeof("struct probe_event_header"):
        return None
    header = ffi.cast("struct probe_event_header *", address)
    kind = header.type
    if kind == lib.PROBE_EVENT_DATA:
        if size < DATA_HEADER_SIZE:
            return None
        data = ffi.cast("struct probe_data_event *", address)
        captured = min(data.captured, size - DATA_HEADER_SIZE)
        return DataEvent(
            key=_key(header),
            tid=header.tid,
            enter_ns=header.timestamp_ns,
            exit_ns=data.exit_ns,
            direction=Direction(data.direction),
            size=data.bytes,
            payload=ffi.buffer(data.payload, captured)[:],
            role=Role(data.role),
            goroutine=data.goroutine,
            tls=bool(data.flags & lib.PROBE_DATA_TLS),
        )
    if size < ffi.sizeof("struct probe_conn_event"):
        return None
    conn = ffi.cast("struct probe_conn_event *", address)
    if kind == lib.PROBE_EVENT_OPEN or kind == lib.PROBE_EVENT_ADDR:
        cls = ConnOpen if kind == lib.PROBE_EVENT_OPEN else AddressUpdate
        return cls(
            key=_key(header),
            tid=header.tid,
            timestamp_ns=header.timestamp_ns,
            role=Role(conn.role),
            local=_endpoint(conn.local),
            peer=_endpoint(conn.peer),
            comm=ffi.string(conn.comm).decode("utf-8", "replace"),
        )
    if kind == lib.PROBE_EVENT_CLOSE:
        return ConnClose(key=_key(header), tid=header.tid, timestamp_ns=header.timestamp_ns)
    if kind == lib.PROBE_EVENT_EXIT:
        return ProcessExit(pid=header.conn.pid, timestamp_ns=header.timestamp_ns)
    if kind == lib.PROBE_EVENT_EXEC:
        return ProcessExec(
            pid=header.conn.pid,
            timestamp_ns=header.timestamp_ns,
            comm=ffi.string(conn.comm).decode("utf-8", "replace"),
        )
    return None
