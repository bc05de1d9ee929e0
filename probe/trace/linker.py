"""Linking spans into traces: each span's trace id and parent, decided as its request starts.

`SpanLinker` sits between the span builder and the span processors. Trace ids
flow top-down (the outermost client first) while exchanges complete
bottom-up (the database's span ends first), so a span's context is decided
when its request head is parsed (`request_started`), from what is in
progress at that moment; the span, once built (`span_ended`), is exported as
soon as its trace id is final. A SERVER span whose client may still be
reported (the ring buffer can deliver the two ends out of order) waits at
most ``wait_ns`` for it, and with it the spans below it.

Rules, first match wins. A SERVER span:

- ``traceparent``: the request carries a valid W3C ``traceparent``: that trace,
  that parent.
- ``same_host``: the client end of the same TCP connection was traced here too
  (mirrored addresses, in any network namespace), and its request of the same
  place on the connection started first: the client span is the parent. The
  place is numbered by the kernel (`HttpRequest.sequence`), counting exchanges
  either end shed over the rate limit, so the two ends agree whatever was shed.
- ``inferred``: several client ends match (namespaces reusing addresses): a
  trace of its own, with a span link to the latest, marked inferred.
- ``none``: nothing matched within the wait: a root. There is no wait when no
  traced connection here can be the client end (``client_end``: most
  servers' clients are on other hosts, or excluded). Later requests on a
  connection whose wait ran out do not wait again unless a client end is
  already known: a connection's client end is traced from its first bytes
  or not at all.

A CLIENT span:

- ``traceparent``: the application sent its own: its trace, its span as parent.
- ``goroutine`` (Go) / ``thread`` (elsewhere): exactly one SERVER span is in
  progress on the request's goroutine or thread: it is the parent.
- ``inferred``: several are in progress there (event loops), or none there
  but some elsewhere in the process (work handed to another thread): a trace
  of its own, with a span link to the latest started, marked inferred.
  Threads say nothing in Go, whose goroutines hop between them.
- ``none``: a root.

Counters in `Stats`: ``links_<rule>`` per span exported, ``traceparent_malformed``,
``link_wait_expired`` (SERVER spans that became roots when the wait ran out),
``link_wait_skipped`` (SERVER roots that did not wait: their connection's client
end is known not to be traced here),
``link_contexts_evicted`` (requests forgotten to bound memory; their span is
linked when it ends, by the rules above, from what is in progress then),
``link_wait_cut`` (ended spans whose wait was cut short to bound memory).
Every span carries its rule as the ``probe.link.rule`` attribute.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from probe.kernel.events import ConnKey, Endpoint, Role, tuple_new
from probe.protocol.model import ConnectionInfo, HttpExchange, HttpRequest
from probe.stats import Stats
from probe.trace.span import Attributes, Span, SpanLink, new_span_id, new_trace_id
from probe.trace.traceparent import find_traceparent

TRACEPARENT: Final = "traceparent"
SAME_HOST: Final = "same_host"
GOROUTINE: Final = "goroutine"
THREAD: Final = "thread"
INFERRED: Final = "inferred"
NONE: Final = "none"

RULE_ATTRIBUTE: Final = "probe.link.rule"
INFERRED_ATTRIBUTE: Final = "probe.link.inferred"
DEFAULT_WAIT_NS: Final = 500_000_000
MAX_CONTEXTS: Final = 65536  # requests in progress
# Ended spans awaiting their trace. Each holds a whole span (a few KB), so
# this bound is what caps the linker's memory: 8192 is more than 8,000 spans
# a second waiting the default 500 ms.
MAX_HELD_SPANS: Final = 8192
MAX_PROCESSES: Final = 4096  # cached answers to "is this process Go?"
MAX_THREAD_SLOTS: Final = 4096  # threads' slots kept to be used again
# Server connections whose client end is known to be untraced. Forgetting one
# costs only a wait: its next request waits again.
MAX_LONE_CONNECTIONS: Final = 16384

_RequestKey = tuple[ConnKey, int]  # a connection and the request's order on it
_Wire = tuple[Endpoint, Endpoint, int]  # (client's address, server's address, order)
_LINKED_ROLES: Final = frozenset({Role.CLIENT, Role.SERVER})  # UNKNOWN: never inferred
_LINK_COUNTERS: Final = {
    rule: f"links_{rule}" for rule in (TRACEPARENT, SAME_HOST, GOROUTINE, THREAD, INFERRED, NONE)
}


class _Slot(NamedTuple):
    """Where a SERVER span is served while in progress. A named tuple, one
    object from start to end (a thread's kept for its next requests): compiled,
    a plain tuple type is kept unboxed and made into a new tuple object (its
    ints into new int objects) at every dict it keys."""

    pid: int
    kind: str  # THREAD, GOROUTINE, or "process" (a Go program's, no goroutine known)
    id: int  # the thread's or goroutine's id; 0 for a process


@dataclass(eq=False, slots=True, init=False)
class _Context:
    """What is known of one request's span before it ends."""

    key: _RequestKey
    role: Role
    start_ns: int
    span_id: bytes = field(default_factory=new_span_id)
    rule: str = NONE
    # Set when the trace is final; until then ``parent`` leads to whoever will know it.
    trace_id: bytes | None = None
    parent: _Context | None = None
    parent_span_id: bytes | None = None
    inferred: _Context | None = None  # the span an inferred link points at
    waiting: bool = False  # a SERVER root that may yet learn its client
    wire: _Wire | None = None  # where it sits in the same-host indexes
    slot: _Slot | None = None  # where a SERVER sits while in progress
    span: Span | None = None  # ended, awaiting its trace id

    def __init__(self, key: _RequestKey, role: Role, start_ns: int) -> None:
        # Written out for mypyc (probe/compiled.py); all but the first three start empty.
        self.key = key
        self.role = role
        self.start_ns = start_ns
        self.span_id = new_span_id()
        self.rule = NONE
        self.trace_id = None
        self.parent = None
        self.parent_span_id = None
        self.inferred = None
        self.waiting = False
        self.wire = None
        self.slot = None
        self.span = None


class SpanLinker:
    """Gives spans their trace and parent, then hands them to ``export``."""

    __slots__ = (
        "_export",
        "_stats",
        "_wait_ns",
        "_clock",
        "_is_go",
        "_client_end",
        "_max_contexts",
        "_max_held",
        "_started",
        "_held",
        "_in_progress",
        "_serving",
        "_thread_slots",
        "_clients",
        "_waiting",
        "_deadlines",
        "_lone",
        "_go",
    )

    def __init__(
        self,
        export: Callable[[Span], None],
        stats: Stats,
        *,
        wait_ns: int = DEFAULT_WAIT_NS,
        clock: Callable[[], int] = time.monotonic_ns,
        is_go: Callable[[int], bool] = lambda pid: False,
        client_end: Callable[[ConnectionInfo], bool] = lambda server: True,
        max_contexts: int = MAX_CONTEXTS,
        max_held: int = MAX_HELD_SPANS,
    ) -> None:
        self._export = export
        self._stats = stats
        self._wait_ns = wait_ns
        self._clock = clock
        self._is_go = is_go
        # May a traced connection here be this server connection's client end?
        self._client_end = client_end
        self._max_contexts = max_contexts
        self._max_held = max_held
        # In the order they started (a dict's): the oldest is evicted first. Not
        # an OrderedDict, whose every insertion and pop costs a method call.
        self._started: dict[_RequestKey, _Context] = {}
        self._held: OrderedDict[_Context, None] = OrderedDict()  # ended, trace not final
        # SERVER spans in progress by slot. A thread's list stays, empty, for its
        # next request: a kept-alive connection's requests would otherwise make
        # and drop it each time (_forget_idle_threads bounds them).
        self._in_progress: dict[_Slot, list[_Context]] = {}
        # SERVER spans in progress by process (an ordered set, contexts hashed by
        # identity): where a CLIENT request looks whose own slot has none (work
        # handed on). One stays, maybe empty, while its process does.
        self._serving: dict[int, dict[_Context, None]] = {}
        self._thread_slots: dict[int, _Slot] = {}  # by thread id: a thread serves many requests
        self._clients: dict[_Wire, list[_Context]] = {}  # CLIENT requests in progress
        self._waiting: dict[_Wire, list[_Context]] = {}  # SERVER roots awaiting a client
        self._deadlines: deque[tuple[int, _Context]] = deque()
        # SERVER connections where a request found no client within the wait.
        self._lone: OrderedDict[ConnKey, None] = OrderedDict()
        self._go: dict[int, bool] = {}

    def __len__(self) -> int:
        """Requests in progress plus ended spans awaiting their trace."""
        return len(self._started) + len(self._held)

    # -- what the pipeline reports

    def request_started(self, connection: ConnectionInfo, request: HttpRequest) -> None:
        """A request head was parsed: decide its span's context now."""
        if connection.role not in _LINKED_ROLES:
            return
        key = (connection.key, request.sequence)
        if key in self._started:
            return
        if len(self._started) >= self._max_contexts:
            evicted = self._started.pop(next(iter(self._started)))
            self._unregister(evicted)
            self._stats["link_contexts_evicted"] += 1
        context = _Context(key, connection.role, request.start_ns)
        self._started[key] = context

        wire = _wire(connection, request.sequence)
        header, malformed = find_traceparent(request.headers)
        if malformed:
            self._stats["traceparent_malformed"] += 1
        if header is not None:
            context.rule, context.trace_id = TRACEPARENT, header.trace_id
            context.parent_span_id = header.parent_id
        elif connection.role == Role.SERVER:
            self._find_client(context, wire, connection)
        else:
            self._find_server(context, connection.key.pid, request)

        if connection.role == Role.SERVER:
            self._start_server(context, connection.key.pid, request)
        elif wire is not None:
            context.wire = wire
            self._clients.setdefault(wire, []).append(context)
            self._wake_servers(context)

    def span_ended(self, exchange: HttpExchange, span: Span) -> None:
        """The exchange's span is built: give it its ids and context, export it
        when final. Whatever ids it came with are replaced."""
        connection = exchange.connection
        if connection.role not in _LINKED_ROLES:
            self._stats[_LINK_COUNTERS[NONE]] += 1
            span.trace_id, span.span_id = new_trace_id(), new_span_id()
            span.attributes[RULE_ATTRIBUTE] = NONE
            self._export(span)
            return
        key = (connection.key, exchange.request.sequence)
        context = self._started.pop(key, None)
        if context is None:  # evicted, or never reported as started
            self.request_started(connection, exchange.request)
            context = self._started.pop(key)
        self._unregister(context)
        context.span = span
        if not self._try_export(context):
            self._hold(context)

    def process_exited(self, pid: int) -> None:
        """Forget what was kept of a process; its requests were ended just before."""
        for context in self._serving.pop(pid, ()):
            if context.slot is not None:
                self._in_progress.pop(context.slot, None)
        self._go.pop(pid, None)

    def expire(self) -> None:
        """Settle the SERVER spans whose wait is over as roots; export what that frees."""
        now = self._clock()
        settled = False
        while self._deadlines and self._deadlines[0][0] <= now:
            _, context = self._deadlines.popleft()
            if context.waiting:
                self._settle(context)
                self._stats["link_wait_expired"] += 1
                self._remember_lone(context.key[0])
                settled = True
        if settled:
            self._release()

    def flush(self) -> None:
        """Stop waiting: export every ended span now (the probe is stopping)."""
        while self._deadlines:
            _, context = self._deadlines.popleft()
            if context.waiting:
                self._settle(context)
        self._release()

    # -- deciding a context

    def _find_client(
        self, context: _Context, wire: _Wire | None, connection: ConnectionInfo
    ) -> None:
        """Same host: the client end of this connection (``wire``), if it was traced here."""
        if wire is None:
            context.trace_id = new_trace_id()
            return
        clients = self._clients.get(wire)
        candidates = [c for c in clients if c.start_ns <= context.start_ns] if clients else []
        if len(candidates) == 1:
            self._adopt(context, candidates[0], SAME_HOST)
        elif candidates:
            self._infer(context, max(candidates, key=lambda c: c.start_ns))
        elif self._wait_ns <= 0:
            context.trace_id = new_trace_id()
        elif context.key[0] in self._lone or not self._client_end(connection):
            context.trace_id = new_trace_id()
            self._stats["link_wait_skipped"] += 1
        else:
            context.waiting, context.wire = True, wire
            self._waiting.setdefault(wire, []).append(context)
            self._deadlines.append((self._clock() + self._wait_ns, context))

    def _find_server(self, context: _Context, pid: int, request: HttpRequest) -> None:
        """Inside the process: the SERVER span this CLIENT request was made for."""
        slot = self._slot(pid, request)
        servers = self._in_progress.get(slot) if slot.kind != "process" else None
        if servers is not None and len(servers) == 1:
            self._adopt(context, servers[0], GOROUTINE if slot.kind == GOROUTINE else THREAD)
            return
        if not servers:  # handed to another thread, or no goroutine
            servers = list(self._serving.get(pid, ()))
        if servers:
            self._infer(context, max(servers, key=lambda s: s.start_ns))
        else:
            context.trace_id = new_trace_id()

    def _start_server(self, context: _Context, pid: int, request: HttpRequest) -> None:
        """Registers an in-progress SERVER span where its CLIENT requests will look."""
        slot = self._slot(pid, request)
        context.slot = slot
        servers = self._in_progress.get(slot)
        if servers is None:
            servers = self._in_progress[slot] = []
        servers.append(context)
        serving = self._serving.get(pid)
        if serving is None:
            serving = self._serving[pid] = {}
        serving[context] = None

    def _slot(self, pid: int, request: HttpRequest) -> _Slot:
        if request.goroutine:
            return tuple_new(_Slot, (pid, GOROUTINE, request.goroutine))
        is_go = self._go.get(pid)
        if is_go is None:
            if len(self._go) >= MAX_PROCESSES:
                self._go.clear()
            is_go = self._go[pid] = self._is_go(pid)
        if is_go:
            return tuple_new(_Slot, (pid, "process", 0))
        slot = self._thread_slots.get(request.tid)
        if slot is None or slot.pid != pid:  # a thread id is reused only after its thread ended
            if len(self._thread_slots) >= MAX_THREAD_SLOTS:
                self._forget_idle_threads()
            slot = self._thread_slots[request.tid] = tuple_new(_Slot, (pid, THREAD, request.tid))
        return slot

    def _forget_idle_threads(self) -> None:
        """Bounds what threads leave behind: their slots, the lists that idle
        threads keep for their next request, idle processes' sets."""
        self._thread_slots.clear()
        for slot in [s for s, servers in self._in_progress.items() if not servers]:
            del self._in_progress[slot]
        for pid in [p for p, serving in self._serving.items() if not serving]:
            del self._serving[pid]

    def _wake_servers(self, client: _Context) -> None:
        """A CLIENT request reported after the SERVER end it caused (ring-buffer order)."""
        assert client.wire is not None
        waiting = self._waiting.get(client.wire)
        if waiting is None:
            return
        matches = [s for s in waiting if s.start_ns >= client.start_ns]
        if len(matches) != 1:
            return  # none, or ambiguous: they settle as roots when their wait ends
        server = matches[0]
        self._forget_waiting(server)
        self._adopt(server, client, SAME_HOST)
        self._release()

    @staticmethod
    def _adopt(context: _Context, parent: _Context, rule: str) -> None:
        context.rule, context.parent, context.parent_span_id = rule, parent, parent.span_id

    @staticmethod
    def _infer(context: _Context, likely: _Context) -> None:
        context.rule, context.inferred, context.trace_id = INFERRED, likely, new_trace_id()

    def _settle(self, context: _Context) -> None:
        """A waiting SERVER span becomes the root of a trace of its own."""
        self._forget_waiting(context)
        context.trace_id = new_trace_id()

    def _remember_lone(self, connection: ConnKey) -> None:
        """No client end of this connection was seen in time: none will be."""
        self._lone[connection] = None
        if len(self._lone) > MAX_LONE_CONNECTIONS:
            self._lone.popitem(last=False)

    def _forget_waiting(self, context: _Context) -> None:
        context.waiting = False
        if context.wire is None:
            return
        waiting = self._waiting.get(context.wire, [])
        if context in waiting:
            waiting.remove(context)
            if not waiting:
                del self._waiting[context.wire]
        context.wire = None

    def _unregister(self, context: _Context) -> None:
        """The request ended or was forgotten: it is no longer anyone's candidate."""
        slot = context.slot
        if slot is not None:
            servers = self._in_progress.get(slot)
            if servers is not None and context in servers:
                servers.remove(context)
                if not servers and slot.kind != THREAD:
                    del self._in_progress[slot]  # a goroutine's, never seen again, or a process's
                serving = self._serving.get(slot.pid)
                if serving is not None:
                    serving.pop(context, None)
            context.slot = None
        if context.role == Role.CLIENT and context.wire is not None:
            clients = self._clients.get(context.wire)
            if clients is not None and context in clients:
                clients.remove(context)
                if not clients:
                    del self._clients[context.wire]
            context.wire = None

    # -- exporting

    def _trace_id(self, context: _Context) -> bytes | None:
        """The context's trace id if final, following (and then shortening) parents."""
        path = []
        node = context
        while node.trace_id is None:
            if node.parent is None:
                return None  # under a SERVER span still waiting for its client
            path.append(node)
            node = node.parent
        for child in path:
            child.trace_id, child.parent = node.trace_id, None
        return node.trace_id

    def _try_export(self, context: _Context) -> bool:
        trace_id = self._trace_id(context)
        if trace_id is None:
            return False
        span = context.span
        assert span is not None
        span.trace_id, span.span_id = trace_id, context.span_id
        span.parent_span_id = context.parent_span_id
        if context.inferred is not None:
            # a link to a span whose trace is not final yet would name a wrong trace
            if (linked := self._trace_id(context.inferred)) is not None:
                attributes: Attributes = {INFERRED_ATTRIBUTE: True}
                span.links.append(SpanLink(linked, context.inferred.span_id, attributes))
            context.inferred = None
        span.attributes[RULE_ATTRIBUTE] = context.rule
        self._stats[_LINK_COUNTERS[context.rule]] += 1
        self._export(span)
        return True

    def _hold(self, context: _Context) -> None:
        if len(self._held) >= self._max_held:
            # bounded memory: the oldest held span's trace root stops waiting
            self._stats["link_wait_cut"] += 1
            oldest = next(iter(self._held))
            root = oldest
            while root.parent is not None:
                root = root.parent
            self._settle(root)
            self._release()
        self._held[context] = None

    def _release(self) -> None:
        """Exports every held span whose trace became final."""
        for context in [c for c in self._held if self._trace_id(c) is not None]:
            del self._held[context]
            self._try_export(context)


def _wire(connection: ConnectionInfo, sequence: int) -> _Wire | None:
    """(client address, server address, place): the same for both ends of a connection."""
    if connection.local is None or connection.peer is None:
        return None
    if connection.role == Role.CLIENT:
        return (connection.local, connection.peer, sequence)
    return (connection.peer, connection.local, sequence)
