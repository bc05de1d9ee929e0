"""Ring-buffer records -> the dataclasses of `probe.kernel.events`.

Layouts come from `probe.kernel.contract` (cffi reading bpf/probe.h), turned
into one `struct.Struct` per record type: a data record, the bulk of them,
is unpacked in one call and its fields picked by name. An ADDR record (a
client's local address, learnt after connect() returned) is decoded into a
`ConnOpen` carrying both addresses; `EventSource` merges it.
"""

from __future__ import annotations

import socket
from operator import itemgetter

from probe.kernel.contract import DATA_HEADER_SIZE, ffi, flat_struct, lib
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


def _picker(layout: tuple[str, ...], *names: str) -> itemgetter:
    """Picks ``names``, in that order, out of a tuple unpacked by ``layout``."""
    return itemgetter(*(layout.index(name) for name in names))


# A record's type, alone: which layout to unpack the whole record with.
_TYPE, _ = flat_struct(
    "struct probe_event_header", ffi.offsetof("struct probe_event_header", "tid")
)
_DATA, _DATA_NAMES = flat_struct("struct probe_data_event", DATA_HEADER_SIZE)
_CONN, _CONN_NAMES = flat_struct("struct probe_conn_event")
# Every record starts with the same header fields, picked first.
_HEADER_NAMES = (
    "header.tid",
    "header.conn.pid",
    "header.conn.fd",
    "header.conn.generation",
    "header.timestamp_ns",
)
_DATA_FIELDS = _picker(
    _DATA_NAMES,
    *_HEADER_NAMES,
    "exit_ns",
    "direction",
    "bytes",
    "captured",
    "role",
    "goroutine",
    "flags",
)
_CONN_FIELDS = _picker(
    _CONN_NAMES,
    *_HEADER_NAMES,
    "role",
    "local.family",
    "local.addr",
    "local.port",
    "peer.family",
    "peer.addr",
    "peer.port",
    "comm",
)
# Enum members by value, without the enum call on the hot path.
_DIRECTIONS = {member.value: member for member in Direction}
_ROLES = {member.value: member for member in Role}


def _endpoint(family: int, addr: bytes, port: int) -> Endpoint | None:
    if family == lib.PROBE_AF_INET:
        address = socket.inet_ntop(socket.AF_INET, addr[:4])
    elif family == lib.PROBE_AF_INET6:
        address = unmap_ipv4(socket.inet_ntop(socket.AF_INET6, addr))
    else:
        return None
    return Endpoint(address, port)


def _comm(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def decode(raw: bytes) -> KernelEvent | None:
    """Decode one record; None if it is malformed."""
    if len(raw) < _TYPE.size:
        return None
    (kind,) = _TYPE.unpack_from(raw)
    if kind == lib.PROBE_EVENT_DATA:
        if len(raw) < DATA_HEADER_SIZE:
            return None
        (
            tid, pid, fd, generation, timestamp_ns,
            exit_ns, direction, size, captured, role, goroutine, flags,
        ) = _DATA_FIELDS(_DATA.unpack_from(raw))  # fmt: skip
        if direction not in _DIRECTIONS:
            return None
        return DataEvent(
            key=ConnKey(pid, fd, generation),
            tid=tid,
            enter_ns=timestamp_ns,
            exit_ns=exit_ns,
            direction=_DIRECTIONS[direction],
            size=size,
            payload=raw[DATA_HEADER_SIZE : DATA_HEADER_SIZE + captured],
            role=_ROLES.get(role, Role.UNKNOWN),
            goroutine=goroutine,
            tls=bool(flags & lib.PROBE_DATA_TLS),
        )
    if len(raw) < _CONN.size:
        return None
    (
        tid, pid, fd, generation, timestamp_ns,
        role, local_family, local_addr, local_port, peer_family, peer_addr, peer_port, comm,
    ) = _CONN_FIELDS(_CONN.unpack_from(raw))  # fmt: skip
    if kind == lib.PROBE_EVENT_OPEN or kind == lib.PROBE_EVENT_ADDR:
        cls = ConnOpen if kind == lib.PROBE_EVENT_OPEN else AddressUpdate
        return cls(
            key=ConnKey(pid, fd, generation),
            tid=tid,
            timestamp_ns=timestamp_ns,
            role=_ROLES.get(role, Role.UNKNOWN),
            local=_endpoint(local_family, local_addr, local_port),
            peer=_endpoint(peer_family, peer_addr, peer_port),
            comm=_comm(comm),
        )
    if kind == lib.PROBE_EVENT_CLOSE:
        return ConnClose(key=ConnKey(pid, fd, generation), tid=tid, timestamp_ns=timestamp_ns)
    if kind == lib.PROBE_EVENT_EXIT:
        return ProcessExit(pid=pid, timestamp_ns=timestamp_ns)
    if kind == lib.PROBE_EVENT_EXEC:
        return ProcessExec(pid=pid, timestamp_ns=timestamp_ns, comm=_comm(comm))
    return None
