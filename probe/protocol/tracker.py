"""The protocol stage's entry point: every traced connection, by key.

`ConnectionTracker` takes the kernel stage's events one by one, keeps an
`HttpConnection` per live connection (bounded, least recently used evicted
first) and hands each completed `HttpExchange` to a callback (and each request
whose head is parsed to another, so spans can be linked as requests start).
It runs for every syscall event, so the per-event path is a dict lookup and a
feed. It also answers whether the client end of a server's connection is
traced here (`has_client_end`), so the linker knows whether to wait for it.

Counters it maintains in `Stats`: ``connections_opened`` (connections it
started to follow, from ConnOpen or from the first data of one it had not
seen), ``connections_closed``, ``connections_evicted``, ``exchanges``; the
streams and connections add ``parse_errors`` and ``requests_dropped``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Final

from probe.kernel.events import (
    ConnClose,
    ConnKey,
    ConnOpen,
    DataEvent,
    Endpoint,
    KernelEvent,
    ProcessExit,
    Role,
)
from probe.protocol.connection import HttpConnection, RequestStarted
from probe.protocol.model import ConnectionInfo, HttpExchange
from probe.stats import Stats

Resolver = Callable[[int, int], tuple[Endpoint | None, Endpoint | None]]
"""(pid, fd) -> (local, peer) addresses of a connection opened before the probe."""

CLOSED: Final = "connection closed before response"
EXITED: Final = "process exited before response"
EVICTED: Final = "connection evicted before response"
STOPPED: Final = "probe stopped before response"

# A client connection by (its local address, its peer's): the local address
# is None while unknown, and then the connection may be any server's peer.
_ClientEnd = tuple[Endpoint | None, Endpoint]


class ConnectionTracker:
    """Routes kernel events to per-connection HTTP state."""

    __slots__ = (
        "_on_exchange",
        "_on_request",
        "_stats",
        "_resolve",
        "_max_connections",
        "_connections",
        "_by_pid",
        "_client_ends",
        "_sniffed",
        "_recent",
    )

    def __init__(
        self,
        on_exchange: Callable[[HttpExchange], None],
        stats: Stats,
        resolve: Resolver | None = None,
        max_connections: int = 65536,
        on_request: RequestStarted | None = None,
    ) -> None:
        self._on_exchange = on_exchange
        self._on_request = on_request
        self._stats = stats
        self._resolve = resolve
        self._max_connections = max_connections
        # insertion order doubles as recency order: the first entry is evicted first
        self._connections: OrderedDict[ConnKey, HttpConnection] = OrderedDict()
        # The connection last moved or added to the end, while it is there: a
        # connection's records come in runs (a request's reads, then its
        # response's writes), and each lookup in the OrderedDict, and each
        # move, is a method call (compiled).
        self._recent: HttpConnection | None = None
        self._by_pid: dict[int, set[ConnKey]] = {}
        # Open CLIENT connections, counted by addresses: those whose role was
        # CLIENT when added (a role is learnt later only for sniffed ones, and
        # addresses never change, so removal finds the same entry).
        self._client_ends: dict[_ClientEnd, int] = {}
        # Connections open before the probe, picked up from their bytes: a
        # role inferred later, and a client end that may be reported late.
        self._sniffed: set[ConnKey] = set()

    def __len__(self) -> int:
        return len(self._connections)

    def handle(self, event: KernelEvent) -> None:
        """Takes one kernel event; exchanges it completes go to ``on_exchange``."""
        if isinstance(event, DataEvent):  # the per-syscall path: kept to one call deep
            connection = self._recent
            # decode gives a connection one key object
            if connection is None or event.key is not connection.info.key:
                connection = self._connections.get(event.key)
                if connection is None:
                    connection = self._unseen(event)
                else:
                    self._connections.move_to_end(event.key)
                    self._recent = connection
            connection.feed(event)
        elif isinstance(event, ConnOpen):
            if event.key not in self._connections:
                self._add(
                    ConnectionInfo(
                        event.key, event.role, event.local, event.peer, image=event.image
                    )
                )
        elif isinstance(event, ConnClose):
            self._remove(event.key, CLOSED)
        elif isinstance(event, ProcessExit):
            for key in self._by_pid.pop(event.pid, ()):
                self._remove(key, EXITED)

    def has_client_end(self, server: ConnectionInfo) -> bool:
        """Is a traced connection open here that may be this server
        connection's client end (its addresses mirrored)? Records arrive in
        the order the kernel reserved them, and a client's connect() (with
        its address) is reported before it writes its first request, so by
        the time a server reads that request its client end, if traced, is
        known. Unknown addresses, and connections open before the probe, whose
        client ends are picked up only as they send, answer yes."""
        if server.local is None or server.peer is None or server.key in self._sniffed:
            return True
        ends = self._client_ends
        return (server.peer, server.local) in ends or (None, server.local) in ends

    def flush(self) -> None:
        """Completes everything pending, e.g. when the probe stops."""
        connections = list(self._connections.values())
        self._connections.clear()
        self._recent = None
        self._by_pid.clear()
        self._client_ends.clear()
        self._sniffed.clear()
        for connection in connections:
            connection.close(STOPPED)

    def _unseen(self, event: DataEvent) -> HttpConnection:
        """A connection opened before the probe started, or whose ConnOpen was lost."""
        local, peer = self._resolve(event.key.pid, event.key.fd) if self._resolve else (None, None)
        return self._add(ConnectionInfo(event.key, event.role, local, peer))

    def _add(self, info: ConnectionInfo) -> HttpConnection:
        if len(self._connections) >= self._max_connections:
            _, evicted = self._connections.popitem(last=False)
            self._forget(evicted.info)
            self._stats["connections_evicted"] += 1
            evicted.close(EVICTED)
        connection = HttpConnection(info, self._emit, self._stats, on_request=self._on_request)
        self._connections[info.key] = connection
        self._recent = connection
        self._by_pid.setdefault(info.key.pid, set()).add(info.key)
        end = _client_end(info)
        if end is not None:
            self._client_ends[end] = self._client_ends.get(end, 0) + 1
        elif info.role == Role.UNKNOWN:
            self._sniffed.add(info.key)
        self._stats["connections_opened"] += 1
        return connection

    def _remove(self, key: ConnKey, reason: str) -> None:
        connection = self._connections.pop(key, None)
        if connection is None:
            return
        if connection is self._recent:
            self._recent = None
        self._forget(connection.info)
        self._stats["connections_closed"] += 1
        connection.close(reason)

    def _forget(self, info: ConnectionInfo) -> None:
        key = info.key
        keys = self._by_pid.get(key.pid)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_pid[key.pid]
        end = _client_end(info)
        if key in self._sniffed:  # never counted, whatever role it was found to have
            self._sniffed.discard(key)
        elif end is not None:
            left = self._client_ends[end] - 1
            if left:
                self._client_ends[end] = left
            else:
                del self._client_ends[end]

    def _emit(self, exchange: HttpExchange) -> None:
        self._stats["exchanges"] += 1
        self._on_exchange(exchange)


def _client_end(info: ConnectionInfo) -> _ClientEnd | None:
    """How an open CLIENT connection is counted in ``_client_ends``; None for others."""
    if info.role != Role.CLIENT or info.peer is None:
        return None
    return (info.local, info.peer)
