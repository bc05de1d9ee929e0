"""What the kernel stage hands to the protocol stage: plain, decoded events.

These are built by `probe.kernel.decode` from the records that `bpf/probe.h`
defines, and by tests from captured bytes; the protocol stage never sees a
C struct.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Final, NamedTuple


class Direction(IntEnum):
    """Which way the bytes went, seen from the traced process."""

    INGRESS = 0  # read or received by the process
    EGRESS = 1  # written or sent by the process


class Role(IntEnum):
    """How the traced process got the socket."""

    UNKNOWN = 0  # it existed before the probe started; inferred from traffic
    CLIENT = 1  # the process called connect()
    SERVER = 2  # the process called accept()


class ConnKey(NamedTuple):
    """Identifies one connection for its whole life.

    ``generation`` is the kernel's monotonic time when the probe first saw
    the connection, so a reused pid or fd never joins two connections.
    A named tuple, not a frozen dataclass: it keys every per-connection
    table on every event, and a tuple is built and hashed in C.
    """

    pid: int
    fd: int
    generation: int


# Named tuples built in C: a named tuple's own ``__new__`` is Python code.
tuple_new: Final = tuple.__new__


def conn_key(pid: int, fd: int, generation: int) -> ConnKey:
    """``ConnKey(pid, fd, generation)``, built in C: a named tuple's own
    ``__new__`` is Python code, about 150 ns more, and every record has a key."""
    return tuple_new(ConnKey, (pid, fd, generation))


class Endpoint(NamedTuple):
    address: str  # textual IPv4 or IPv6 address, without brackets
    port: int


def endpoint(address: str, port: int) -> Endpoint:
    """``Endpoint(address, port)``, built in C, as `conn_key` builds keys."""
    return tuple_new(Endpoint, (address, port))


@dataclass(slots=True, init=False)
class ConnOpen:
    key: ConnKey
    tid: int
    timestamp_ns: int  # kernel monotonic clock
    role: Role
    local: Endpoint | None  # None when the kernel could not tell
    peer: Endpoint | None
    comm: str = ""  # the process's name when the kernel saw it
    # Which image of its process it belongs to: the exec()s the process made
    # before it opened, as far as the probe saw (ConnectionRegistry counts them).
    image: int = 0

    def __init__(  # written out for mypyc (probe/compiled.py), as DataEvent's
        self,
        key: ConnKey,
        tid: int,
        timestamp_ns: int,
        role: Role,
        local: Endpoint | None,
        peer: Endpoint | None,
        comm: str = "",
        image: int = 0,
    ) -> None:
        self.key = key
        self.tid = tid
        self.timestamp_ns = timestamp_ns
        self.role = role
        self.local = local
        self.peer = peer
        self.comm = comm
        self.image = image


@dataclass(slots=True, init=False)
class DataEvent:
    """One read- or write-like syscall on a traced connection."""

    key: ConnKey
    tid: int
    enter_ns: int  # kernel monotonic clock at a write's entry; a read's return (exit_ns)
    exit_ns: int  # ... and at its return
    direction: Direction
    size: int  # bytes the syscall moved (its return value), > 0
    payload: bytes  # the first bytes of those, at most the capture size
    role: Role = Role.UNKNOWN  # as the kernel knows it (UNKNOWN: picked up mid-stream)
    goroutine: int = 0  # Go: the goroutine the I/O was done for; 0 elsewhere
    tls: bool = False  # plaintext from a TLS library rather than bytes on the socket
    # Which exchange of its connection this call belongs to, as the kernel
    # numbers them from 1 (shed ones included, so both ends of a connection
    # agree); 0: not numbered (a connection picked up mid-stream).
    exchange: int = 0
    # The payload is the call's last bytes, not its first: the call came past
    # its message's first capture-size bytes (bpf/probe.h, PROBE_DATA_TAIL).
    tail: bool = False

    def __init__(  # written out for mypyc (probe/compiled.py): a generated one runs interpreted
        self,
        key: ConnKey,
        tid: int,
        enter_ns: int,
        exit_ns: int,
        direction: Direction,
        size: int,
        payload: bytes,
        role: Role = Role.UNKNOWN,
        goroutine: int = 0,
        tls: bool = False,
        exchange: int = 0,
        tail: bool = False,
    ) -> None:
        self.key = key
        self.tid = tid
        self.enter_ns = enter_ns
        self.exit_ns = exit_ns
        self.direction = direction
        self.size = size
        self.payload = payload
        self.role = role
        self.goroutine = goroutine
        self.tls = tls
        self.exchange = exchange
        self.tail = tail


@dataclass(slots=True, init=False)
class ConnClose:
    key: ConnKey
    tid: int
    timestamp_ns: int

    def __init__(self, key: ConnKey, tid: int, timestamp_ns: int) -> None:  # for mypyc
        self.key = key
        self.tid = tid
        self.timestamp_ns = timestamp_ns


@dataclass(slots=True)
class ProcessExit:
    pid: int
    timestamp_ns: int


@dataclass(slots=True)
class ProcessExec:
    """A process replaced its image (execve): new libraries and binaries to probe."""

    pid: int
    timestamp_ns: int
    comm: str = ""
    image: int = 0  # the new image's number, as ConnOpen.image counts them
    # The kernel's name for the image (a struct probe_image_key's bytes), b""
    # if it has none; and whether the kernel knew it as examined already.
    image_key: bytes = b""
    image_known: bool = False


KernelEvent = ConnOpen | DataEvent | ConnClose | ProcessExit | ProcessExec
