"""The kernel stage's books on connections, kept as their records are read.

Every record other than plain data on a settled connection comes to
`ConnectionRegistry.settle`: a connection's OPEN (held until a client's local
address comes, then offered to ``on_open``, which may refuse it), its ADDR,
its CLOSE, a process's EXIT or EXEC, and the data of a connection whose
OPEN is held. The registry knows which connections each process has open,
which are ignored (their records still in flight are dropped as they are
read), and which image of its process each belongs to.

A connection per request passes here twice, so the module is compiled with
the hot path (probe.compiled). What touches the kernel's maps or the
binaries to probe is the owner's (`EventSource`), reached through `KernelSide`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Final, Protocol

from probe.kernel import sockets
from probe.kernel.decode import AddressUpdate
from probe.kernel.events import (
    ConnClose,
    ConnKey,
    ConnOpen,
    KernelEvent,
    ProcessExec,
    ProcessExit,
    Role,
)
from probe.stats import Stats

IGNORED_MEMORY: Final = 4096  # recently ignored connections whose records are still in flight
MAX_PROCESSES: Final = 65536  # whose exec()s are counted


class KernelSide(Protocol):
    """What the registry asks of its owner: the binaries to probe, the kernel's maps."""

    def scan_process(self, pid: int) -> None:
        """It opened its first connection: look for TLS libraries and Go."""

    def scan_executable(self, event: ProcessExec) -> None:
        """It exec'd: look in its new executable for TLS and Go."""

    def rescan_soon(self, pid: int) -> None:
        """It exec'd: ld.so maps the new image's libraries a moment later."""

    def read_addresses_at_reads(self) -> None:
        """A connection was accepted without its addresses: have the kernel
        read those of the next ones at their reads."""

    def forget_process(self, pid: int) -> None: ...

    def ignore_in_kernel(self, key: ConnKey) -> None:
        """No more records of this connection."""

    def delete_in_kernel(self, keys: Iterable[ConnKey]) -> None:
        """These connections are gone (their process exited or exec'd)."""


class ConnectionRegistry:
    def __init__(
        self,
        kernel: KernelSide,
        stats: Stats,
        ports: tuple[int, ...] = (),
        on_open: Callable[[ConnOpen], bool] | None = None,
    ) -> None:
        """``ports``: trace only connections with one of these ports, once
        their addresses are known; ``on_open``: told of each connection as it
        is settled, from inside the ring-buffer read, i.e. as early as user
        space can (a short-lived client is best looked up in /proc now);
        False means "ignore it"."""
        self.on_open = on_open
        # Read by the per-record callback (decode.RecordReader) too:
        # client connections whose local address the kernel will send later,
        self.awaiting_address: dict[ConnKey, ConnOpen] = {}
        # and those whose records are dropped.
        self.ignored: OrderedDict[ConnKey, None] = OrderedDict()
        self._kernel = kernel
        self._stats = stats
        self._ports = frozenset(ports)
        self._open_by_pid: dict[int, set[ConnKey]] = {}
        self._connected_pids: set[int] = set()  # pids whose first connection was seen
        # pid -> exec()s seen, for the live processes that made one: records arrive
        # in the order they were made, so each ConnOpen knows which image it is of.
        self._images: dict[int, int] = {}

    def settle(self, event: KernelEvent, batch: list[KernelEvent]) -> None:
        """One record's event; what is to be handed on goes to ``batch``."""
        if isinstance(event, (ConnClose, ConnOpen)):
            key = event.key
            if key in self.ignored:
                return
            if isinstance(event, AddressUpdate):
                pending = self.awaiting_address.pop(key, None)
                if pending is not None:
                    pending.local, pending.peer = event.local, event.peer
                    self._open(pending, batch)
            elif isinstance(event, ConnOpen):
                self._opened(event, batch)
            elif not self._settle_pending(key, batch):  # a close
                self._forget_open(key)
                batch.append(event)
        elif isinstance(event, ProcessExit):
            self._process_exited(event.pid)
            batch.append(event)
        elif isinstance(event, ProcessExec):
            self._close_on_exec(event, batch)
            event.image = self._images[event.pid] = self._images.get(event.pid, 0) + 1
            if len(self._images) > MAX_PROCESSES:  # exits lost: the oldest go
                del self._images[next(iter(self._images))]
            self._connected_pids.discard(event.pid)
            self._kernel.scan_executable(event)
            self._kernel.rescan_soon(event.pid)
            batch.append(event)
        else:  # data of a connection whose OPEN is held
            key = event.key
            if key not in self.ignored and not self._settle_pending(key, batch):
                batch.append(event)

    def _opened(self, event: ConnOpen, batch: list[KernelEvent]) -> None:
        pid = event.key.pid
        event.image = self._images.get(pid, 0)
        if pid not in self._connected_pids:  # it may have loaded a TLS library
            self._connected_pids.add(pid)
            self._kernel.scan_process(pid)
        if event.role == Role.CLIENT and event.local is None:
            self.awaiting_address[event.key] = event
        else:
            self._open(event, batch)

    def _settle_pending(self, key: ConnKey, batch: list[KernelEvent]) -> bool:
        """Data or close before the address: the held OPEN goes without it.
        True if the connection then turned out ignored."""
        pending = self.awaiting_address.pop(key, None)
        if pending is None:
            return False
        self._open(pending, batch)
        return key in self.ignored

    def _open(self, event: ConnOpen, batch: list[KernelEvent]) -> None:
        if event.local is None or event.peer is None:
            # The kernel could not send them (see sockets.lookup): a read of
            # the process's whole TCP table, counted, as it costs far more.
            self._stats["addresses_looked_up"] += 1
            if event.role == Role.SERVER and event.peer is None:  # accept() without a buffer
                self._kernel.read_addresses_at_reads()
            found = sockets.lookup(event.key.pid, event.key.fd)
            # A connection the kernel saw open (connect/accept) and that is
            # already closed is kept, without addresses. One picked up from
            # bytes that merely looked like HTTP must prove it is a TCP socket:
            # not a file, pipe, unix socket or UDP socket.
            if event.role == Role.UNKNOWN:
                unwanted = not found.is_tcp
            else:
                unwanted = not found.gone and not found.is_socket
            if unwanted:
                self.ignore(event.key)
                return
            event.local = event.local or found.local
            event.peer = event.peer or found.peer
        if self._ports and not self._port_wanted(event):
            self.ignore(event.key)
            return
        if self.on_open is not None and not self.on_open(event):
            self.ignore(event.key)
            return
        keys = self._open_by_pid.get(event.key.pid)
        if keys is None:
            keys = self._open_by_pid[event.key.pid] = set()
        keys.add(event.key)
        self._stats["connections_traced"] += 1
        batch.append(event)

    def _port_wanted(self, event: ConnOpen) -> bool:
        # An end still unknown may be the one with the wanted port: an accepted
        # connection whose local address the kernel lost (its slot taken by
        # another connection's at the same moment) and which was gone from
        # /proc before it was read, or one accepted without any address. Keep
        # it rather than lose a span, as the kernel let it through; its HTTP is
        # still parsed, only its addresses are missing.
        if event.local is None or event.peer is None:
            return True
        return not self._ports.isdisjoint((event.local.port, event.peer.port))

    def ignore(self, key: ConnKey) -> None:
        """Stop tracing a connection, in the kernel too."""
        self._stats["connections_ignored"] += 1
        self._drop_records(key)
        self._kernel.ignore_in_kernel(key)

    def _drop_records(self, key: ConnKey) -> None:
        """Records of this connection still to be read are dropped on reading."""
        self.ignored[key] = None
        if len(self.ignored) > IGNORED_MEMORY:
            self.ignored.popitem(last=False)

    def _forget_open(self, key: ConnKey) -> None:
        """The connection is closed: no longer one of its process's open ones."""
        keys = self._open_by_pid.get(key.pid)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._open_by_pid[key.pid]

    def _close_on_exec(self, event: ProcessExec, batch: list[KernelEvent]) -> None:
        """End the connections that an exec closed (close-on-exec, as Python's
        sockets are by default): the kernel saw no close(), and their
        descriptors may already be the new image's files, whose bytes would
        be taken for the connection's. A socket the new image kept goes on."""
        keys = self._open_by_pid.get(event.pid, set())
        closed = [key for key in keys if not sockets.is_socket(key.pid, key.fd)]
        for key in closed:
            self._forget_open(key)
            self._drop_records(key)  # those the kernel sent before its entry goes
            batch.append(ConnClose(key, event.pid, event.timestamp_ns))
        if closed:
            self._kernel.delete_in_kernel(closed)

    def _process_exited(self, pid: int) -> None:
        self._connected_pids.discard(pid)
        self._images.pop(pid, None)
        self._kernel.forget_process(pid)
        keys = self._open_by_pid.pop(pid, set())
        for key in [k for k in self.awaiting_address if k.pid == pid]:
            del self.awaiting_address[key]
        if keys:
            self._kernel.delete_in_kernel(keys)
