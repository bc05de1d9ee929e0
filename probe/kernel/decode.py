"""Ring-buffer records -> the dataclasses of `probe.kernel.events`.

Layouts come from `probe.kernel.contract` (cffi reading bpf/probe.h), turned
into one `struct.Struct` per record type: a data record, the bulk of them,
is unpacked in one call, into just the fields it needs. An ADDR record (a
client's local address, learnt after connect() returned) is decoded into a
`ConnOpen` carrying both addresses; `EventSource` merges it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any, Final, TypeVar

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
    conn_key,
    endpoint,
)
from probe.kernel.sockets import unmap_ipv4


class AddressUpdate(ConnOpen):
    """A client connection's local address, known only after ESTABLISHED."""

    __slots__ = ()


# A record's type, alone: which layout to unpack the whole record with. A
# 32-bit word that decode() reads from the bytes themselves.
_TYPE, _ = flat_struct(
    "struct probe_event_header", ffi.offsetof("struct probe_event_header", "tid")
)
if _TYPE.format != "<I":
    raise RuntimeError(f"bpf/probe.h: a record's type is no longer a u32 at its start: {_TYPE}")
# Every record starts with the same header fields.
_HEADER_NAMES: Final = (
    "header.tid",
    "header.conn.pid",
    "header.conn.fd",
    "header.conn.generation",
    "header.timestamp_ns",
)
# The fields decode() reads, in the order they lie (flat_struct checks it), so
# that one unpack returns exactly them, in the order they are unpacked into.
_DATA, _ = flat_struct(
    "struct probe_data_event",
    DATA_HEADER_SIZE,
    only=(
        *_HEADER_NAMES,
        "exit_ns",
        "bytes",
        "goroutine",
        "captured",
        "direction",
        "role",
        "flags",
        "exchange",
    ),
)
_CONN, _ = flat_struct(
    "struct probe_conn_event",
    only=(
        *_HEADER_NAMES,
        "local.addr",
        "local.port",
        "local.family",
        "peer.addr",
        "peer.port",
        "peer.family",
        "role",
        "comm",
    ),
)
_EXEC, _ = flat_struct("struct probe_exec_event", only=(*_HEADER_NAMES, "comm", "known"))
# The image's key, as bytes to give back to the kernel's map; its path's
# first byte, 0 when the kernel named no image.
_IMAGE_START: Final = ffi.offsetof("struct probe_exec_event", "image")
_IMAGE_END: Final = _IMAGE_START + ffi.sizeof("struct probe_image_key")
_IMAGE_PATH: Final = ffi.offsetof("struct probe_exec_event", "image", "path")
# A CLOSE and an EXIT are a header alone.
_HEADER, _ = flat_struct(
    "struct probe_event_header", only=tuple(name.split(".", 1)[1] for name in _HEADER_NAMES)
)
# Their sizes and bound unpack methods, read once: compiled, a Final is a
# constant of the C code, where a Struct's method is looked up at every call.
_TYPE_SIZE: Final = _TYPE.size
_DATA_HEADER_SIZE: Final = DATA_HEADER_SIZE
_CONN_SIZE: Final = _CONN.size
_HEADER_SIZE: Final = _HEADER.size
_EXEC_SIZE: Final = _EXEC.size
_unpack_data: Final = _DATA.unpack_from
_unpack_conn: Final = _CONN.unpack_from
_unpack_header: Final = _HEADER.unpack_from
_unpack_exec: Final = _EXEC.unpack_from
# Constants and enum members by value, read once: not a cffi attribute
# lookup or an enum call per record.
_EVENT_DATA: Final = lib.PROBE_EVENT_DATA
_EVENT_OPEN: Final = lib.PROBE_EVENT_OPEN
_EVENT_ADDR: Final = lib.PROBE_EVENT_ADDR
_EVENT_CLOSE: Final = lib.PROBE_EVENT_CLOSE
_EVENT_EXIT: Final = lib.PROBE_EVENT_EXIT
_EVENT_EXEC: Final = lib.PROBE_EVENT_EXEC
_DATA_TLS: Final = lib.PROBE_DATA_TLS
_DATA_TAIL: Final = lib.PROBE_DATA_TAIL
_AF_INET: Final = lib.PROBE_AF_INET
_AF_INET6: Final = lib.PROBE_AF_INET6
_DIRECTIONS: Final = {member.value: member for member in Direction}
_ROLES: Final = {member.value: member for member in Role}


# Addresses and process names, as the kernel sends them -> as text. A node's
# connections come from few of each (its own addresses, its clients', its
# programs'), and every connection's record carries two addresses and a
# name: each is converted once. Past this many, the memory starts over.
MAX_REMEMBERED = 4096
K = TypeVar("K")
V = TypeVar("V")
_ipv4_addresses: Final[dict[bytes, str]] = {}  # by the whole field: no slice made to look one up
_ipv6_addresses: Final[dict[bytes, str]] = {}
_comms: Final[dict[bytes, str]] = {}


def _remember(remembered: dict[K, V], key: K, value: V) -> V:
    if len(remembered) >= MAX_REMEMBERED:
        remembered.clear()
    remembered[key] = value
    return value


def _endpoint(family: int, addr: bytes, port: int) -> Endpoint | None:
    if family == _AF_INET:
        address = _ipv4_addresses.get(addr)
        if address is None:
            text = socket.inet_ntop(socket.AF_INET, addr[:4])
            address = _remember(_ipv4_addresses, addr, text)
    elif family == _AF_INET6:
        address = _ipv6_addresses.get(addr)
        if address is None:
            text = unmap_ipv4(socket.inet_ntop(socket.AF_INET6, addr))
            address = _remember(_ipv6_addresses, addr, text)
    else:
        return None
    return endpoint(address, port)


# The keys of the connections whose records were read lately, by generation
# (the kernel's clock when it first saw the connection): a connection sends
# many records, and its key is built at the first. A CLOSE takes its own out;
# past MAX_REMEMBERED, the memory starts over too.
_keys: Final[dict[int, ConnKey]] = {}


def _key(pid: int, fd: int, generation: int) -> ConnKey:
    key = _keys.get(generation)
    if key is None or key[0] != pid or key[1] != fd:  # two in one nanosecond: rebuilt
        key = _remember(_keys, generation, conn_key(pid, fd, generation))
    return key


def _comm(raw: bytes) -> str:
    comm = _comms.get(raw)
    if comm is None:
        comm = _remember(_comms, raw, raw.split(b"\0", 1)[0].decode("utf-8", "replace"))
    return comm


def decode(raw: bytes) -> KernelEvent | None:
    """Decode one record; None if it is malformed."""
    if len(raw) < _TYPE_SIZE:
        return None
    # Little-endian, as flat_struct reads every field: from the bytes, where a
    # struct's unpack is a call through Python's protocol.
    kind = raw[0] | raw[1] << 8 | raw[2] << 16 | raw[3] << 24
    if kind == _EVENT_DATA:
        if len(raw) < _DATA_HEADER_SIZE:
            return None
        captured: int  # typed: the payload's slice is then compiled, not a call
        (
            tid, pid, fd, generation, timestamp_ns,
            exit_ns, size, goroutine, captured, direction, role, flags, exchange,
        ) = _unpack_data(raw)  # fmt: skip
        known_direction = _DIRECTIONS.get(direction)
        if known_direction is None:
            return None
        return DataEvent(
            key=_key(pid, fd, generation),
            tid=tid,
            enter_ns=timestamp_ns,
            exit_ns=exit_ns,
            direction=known_direction,
            size=size,
            payload=raw[_DATA_HEADER_SIZE : _DATA_HEADER_SIZE + captured],
            role=_ROLES.get(role, Role.UNKNOWN),
            goroutine=goroutine,
            tls=bool(flags & _DATA_TLS),
            exchange=exchange,
            tail=bool(flags & _DATA_TAIL),
        )
    if kind == _EVENT_EXEC:
        if len(raw) < _EXEC_SIZE:
            return None
        tid, pid, fd, generation, timestamp_ns, comm, known = _unpack_exec(raw)
        return ProcessExec(
            pid=pid,
            timestamp_ns=timestamp_ns,
            comm=_comm(comm),
            image_key=raw[_IMAGE_START:_IMAGE_END] if raw[_IMAGE_PATH] else b"",
            image_known=bool(known),
        )
    if kind in (_EVENT_CLOSE, _EVENT_EXIT):
        if len(raw) < _HEADER_SIZE:
            return None
        tid, pid, fd, generation, timestamp_ns = _unpack_header(raw)
        if kind == _EVENT_EXIT:
            return ProcessExit(pid=pid, timestamp_ns=timestamp_ns)
        key = _key(pid, fd, generation)
        del _keys[generation]
        return ConnClose(key=key, tid=tid, timestamp_ns=timestamp_ns)
    if len(raw) < _CONN_SIZE:
        return None
    (
        tid, pid, fd, generation, timestamp_ns,
        local_addr, local_port, local_family, peer_addr, peer_port, peer_family, role, comm,
    ) = _unpack_conn(raw)  # fmt: skip
    if kind in (_EVENT_OPEN, _EVENT_ADDR):
        key = _key(pid, fd, generation)
        known_role = _ROLES.get(role, Role.UNKNOWN)
        local = _endpoint(local_family, local_addr, local_port)
        peer = _endpoint(peer_family, peer_addr, peer_port)
        # Each class named, not one chosen into a variable: compiled, a call
        # through a variable parses its keywords at run time (0.2 us an OPEN).
        if kind == _EVENT_OPEN:
            return ConnOpen(key, tid, timestamp_ns, known_role, local, peer, _comm(comm))
        return AddressUpdate(key, tid, timestamp_ns, known_role, local, peer, _comm(comm))
    return None


class RecordReader:
    """libbpf's per-record callback, called through libbcc and ctypes.

    The bulk of records are data on a connection with nothing to settle
    first: decoded and batched here, compiled with the rest of the hot path.
    Every other record goes to ``settle`` with the batch, to which it adds
    what it keeps (the books on connections, probe.kernel.registry). Returns
    -1, which ends this read of the ring buffer after the record, once
    ``batch`` holds ``max_batch`` events.
    """

    def __init__(
        self,
        max_batch: int,
        ignored: dict[ConnKey, None],
        awaiting_address: dict[ConnKey, ConnOpen],
        settle: Callable[[KernelEvent, list[KernelEvent]], None],
    ) -> None:
        self.batch: list[KernelEvent] = []
        self.records = 0  # read since the owner last took them
        self.malformed = 0
        self._max_batch = max_batch
        self._ignored = ignored  # the owner's, which it keeps up to date
        self._awaiting_address = awaiting_address
        self._settle = settle

    def __call__(self, _ctx: object, data: Any, size: int) -> int:
        self.records += 1
        event = decode(data[:size])  # a char pointer: its slice copies in C
        if type(event) is DataEvent and not self._awaiting_address:
            if event.key not in self._ignored:
                self.batch.append(event)
        elif event is None:
            self.malformed += 1
            return 0
        else:
            self._settle(event, self.batch)
        return -1 if len(self.batch) >= self._max_batch else 0
