"""The span linker: every rule, its counters, the wait, reordering and bounded memory.

Exchanges are built by hand on a fake clock; a "start" is what the protocol
stage reports when a request head is parsed, an "end" the built span.
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from probe.kernel.events import ConnKey, ConnOpen, DataEvent, Direction, Endpoint, Role
from probe.protocol.connection import SEQUENCE_SHIFT
from probe.protocol.model import ConnectionInfo, HttpExchange, HttpRequest, HttpResponse
from probe.protocol.tracker import ConnectionTracker
from probe.stats import Stats
from probe.trace.linker import MAX_THREAD_SLOTS, SpanLinker
from probe.trace.span import UNSET_SPAN_ID, UNSET_TRACE_ID, Resource, Span, SpanKind

WAIT_NS = 1_000
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = ("traceparent", f"00-{TRACE}-{PARENT}-01")
_fds = itertools.count(3)


class Host:
    """Processes, their connections and a linker watching them, on a fake clock."""

    def __init__(self, wait_ns: int = WAIT_NS, go_pids: tuple[int, ...] = (), **kwargs) -> None:
        self.now = 0
        self.stats = Stats()
        self.exported: list[Span] = []
        self.linker = SpanLinker(
            self.exported.append,
            self.stats,
            wait_ns=wait_ns,
            clock=lambda: self.now,
            is_go=lambda pid: pid in go_pids,
            **kwargs,
        )

    def connect(self, client_pid: int, server_pid: int, port: int, client_port: int = 40000):
        """Both ends of one TCP connection: (client's, server's)."""
        client, server = Endpoint("10.0.0.1", client_port), Endpoint("10.0.0.2", port)
        return (
            ConnectionInfo(ConnKey(client_pid, next(_fds), 1), Role.CLIENT, client, server),
            ConnectionInfo(ConnKey(server_pid, next(_fds), 1), Role.SERVER, server, client),
        )

    def start(
        self,
        connection: ConnectionInfo,
        at: int,
        tid: int = 0,
        sequence: int = 0,
        headers: list[tuple[str, str]] | None = None,
        goroutine: int = 0,
    ) -> HttpExchange:
        request = HttpRequest(
            "1.1",
            headers or [],
            start_ns=at,
            end_ns=at,
            tid=tid or connection.key.pid,
            goroutine=goroutine,
            method="GET",
            target="/",
            sequence=sequence,
        )
        self.linker.request_started(connection, request)
        return HttpExchange(connection, request, None)

    def end(self, exchange: HttpExchange, at: int) -> Span:
        exchange.response = HttpResponse("1.1", [], at, at, exchange.request.tid, status_code=200)
        kind = SpanKind.SERVER if exchange.connection.role == Role.SERVER else SpanKind.CLIENT
        resource = Resource({"process.pid": exchange.connection.key.pid})
        # as SpanBuilder builds it: without ids
        span = Span(
            "GET", kind, exchange.request.start_ns, at, resource, UNSET_TRACE_ID, UNSET_SPAN_ID
        )
        self.linker.span_ended(exchange, span)
        return span

    def rules(self) -> dict[str, int]:
        return {k: v for k, v in self.stats.items() if k.startswith("links_")}


def parents(spans: list[Span]) -> list[Span | None]:
    """Each span's parent among ``spans`` (None: a root, or a parent outside)."""
    by_id = {span.span_id: span for span in spans}
    return [by_id.get(span.parent_span_id) for span in spans]


def test_a_thread_per_request_chain_is_one_trace() -> None:
    host = Host()
    curl_a, a_in = host.connect(1, 2, 8080)
    a_b, b_in = host.connect(2, 3, 9090)
    curl = host.start(curl_a, 10)
    a_server = host.start(a_in, 11, tid=21)
    a_client = host.start(a_b, 12, tid=21)
    b_server = host.start(b_in, 13, tid=31)
    spans = [
        host.end(b_server, 14),
        host.end(a_client, 15),
        host.end(a_server, 16),
        host.end(curl, 17),
    ]
    assert host.exported == spans  # each went out as it ended: its trace was final
    assert parents(spans) == [spans[1], spans[2], spans[3], None]
    assert {span.trace_id for span in spans} == {spans[3].trace_id}
    assert [span.attributes["probe.link.rule"] for span in spans] == [
        "same_host",
        "thread",
        "same_host",
        "none",
    ]
    assert host.rules() == {"links_same_host": 2, "links_thread": 1, "links_none": 1}
    assert len(host.linker) == 0


def test_every_span_gets_fresh_ids_linked_or_not() -> None:
    host = Host(wait_ns=0)
    client, server = host.connect(1, 2, 80)
    unknown = ConnectionInfo(ConnKey(3, next(_fds), 1), Role.UNKNOWN, None, None)
    ends = [host.start(c, at=10) for c in (client, server, unknown, unknown)]
    spans = [host.end(exchange, at=20) for exchange in ends]
    assert len(host.exported) == 4
    assert UNSET_TRACE_ID not in {span.trace_id for span in spans}
    assert UNSET_SPAN_ID not in {span.span_id for span in spans}
    assert len({span.span_id for span in spans}) == 4
    assert spans[2].trace_id != spans[3].trace_id  # unlinked: a trace each


def test_go_links_by_goroutine_and_never_by_thread() -> None:
    host = Host(wait_ns=0, go_pids=(2,))
    _, b_in = host.connect(1, 2, 8080)
    b_out, _ = host.connect(2, 3, 9090)
    other_out, _ = host.connect(2, 3, 9090, client_port=40001)
    server = host.start(b_in, 10, tid=21, goroutine=7)
    client = host.start(b_out, 11, tid=22, goroutine=7)  # another thread, same goroutine
    # no goroutine known: the thread of the server says nothing in Go
    unknown = host.start(other_out, 12, tid=21)
    spans = [host.end(client, 13), host.end(unknown, 14), host.end(server, 15)]
    assert parents(spans) == [spans[2], None, None]
    assert spans[0].trace_id == spans[2].trace_id != spans[1].trace_id
    [link] = spans[1].links
    assert (link.trace_id, link.span_id, link.attributes) == (
        spans[2].trace_id,
        spans[2].span_id,
        {"probe.link.inferred": True},
    )
    assert host.rules() == {"links_goroutine": 1, "links_inferred": 1, "links_none": 1}


def test_an_event_loop_never_gets_a_silent_parent() -> None:
    host = Host()
    _, first_in = host.connect(1, 2, 8080, client_port=40001)
    _, second_in = host.connect(1, 2, 8080, client_port=40002)
    out_1, _ = host.connect(2, 3, 9090, client_port=40003)
    out_2, _ = host.connect(2, 3, 9090, client_port=40004)
    first = host.start(first_in, 10, tid=2)
    second = host.start(second_in, 11, tid=2)
    both = host.start(out_1, 12, tid=2)  # two requests in progress on the loop's thread
    host.now = WAIT_NS
    host.linker.expire()  # the two SERVER spans stop waiting for a client
    first_span = host.end(first, 13)
    alone = host.start(out_2, 14, tid=2)  # only the second is left
    spans = [host.end(both, 15), host.end(alone, 16), host.end(second, 17)]
    assert parents([*spans, first_span]) == [None, spans[2], None, None]
    [link] = spans[0].links
    assert (link.span_id, link.trace_id) == (spans[2].span_id, spans[2].trace_id)
    assert link.attributes == {"probe.link.inferred": True}
    assert spans[0].trace_id not in (spans[2].trace_id, first_span.trace_id)
    assert host.rules() == {"links_inferred": 1, "links_thread": 1, "links_none": 2}
    assert host.stats["link_wait_expired"] == 2


def test_a_thread_is_known_by_its_process_and_id() -> None:
    """A thread's slot is kept for its next requests; another process's
    request on a thread of the same id is not in that slot."""
    host = Host(wait_ns=0)
    _, a_in = host.connect(1, 2, 8080)
    c_out, _ = host.connect(3, 4, 9090)
    first = host.end(host.start(a_in, 10, tid=21), 11)  # process 2's thread 21, once
    server = host.start(a_in, 12, tid=21, sequence=1)
    client = host.start(c_out, 13, tid=21)  # process 3's thread 21
    client_span, server_span = host.end(client, 14), host.end(server, 15)
    assert client_span.parent_span_id is None and client_span.links == []
    assert client_span.trace_id not in {first.trace_id, server_span.trace_id}


def test_work_handed_to_another_thread_is_an_inferred_link() -> None:
    host = Host(wait_ns=0)
    _, a_in = host.connect(1, 2, 8080)
    a_out, _ = host.connect(2, 3, 9090)
    server = host.start(a_in, 10, tid=21)
    client = host.start(a_out, 11, tid=22)
    client_span, server_span = host.end(client, 12), host.end(server, 13)
    assert client_span.parent_span_id is None
    assert [link.span_id for link in client_span.links] == [server_span.span_id]
    assert host.rules() == {"links_inferred": 1, "links_none": 1}


def test_incoming_traceparent_sets_trace_and_parent() -> None:
    host = Host()
    _, a_in = host.connect(1, 2, 8080)
    a_out, b_in = host.connect(2, 3, 9090)
    server = host.start(a_in, 10, tid=21, headers=[TRACEPARENT])
    client = host.start(a_out, 11, tid=21)
    b_server = host.start(b_in, 12)
    spans = [host.end(b_server, 13), host.end(client, 14), host.end(server, 15)]
    assert {span.trace_id.hex() for span in spans} == {TRACE}
    assert spans[2].parent_span_id.hex() == PARENT
    assert parents(spans) == [spans[1], spans[2], None]
    assert host.rules() == {"links_traceparent": 1, "links_thread": 1, "links_same_host": 1}


def test_an_instrumented_clients_traceparent_is_kept_on_both_ends() -> None:
    host = Host()
    out, into = host.connect(1, 2, 8080)
    client = host.start(out, 10, headers=[TRACEPARENT])
    server = host.start(into, 11, headers=[TRACEPARENT])
    spans = [host.end(server, 12), host.end(client, 13)]
    # both the application's span's children: the trace does not fork
    assert [(s.trace_id.hex(), s.parent_span_id.hex()) for s in spans] == [(TRACE, PARENT)] * 2
    assert host.rules() == {"links_traceparent": 2}


def test_a_malformed_traceparent_is_counted_and_ignored() -> None:
    host = Host()
    out, into = host.connect(1, 2, 8080)
    bad = [("traceparent", f"00-{'0' * 32}-{PARENT}-01")]
    client = host.start(out, 10, headers=bad)
    server = host.start(into, 11, headers=bad)
    spans = [host.end(server, 12), host.end(client, 13)]
    assert parents(spans) == [spans[1], None]
    assert spans[0].trace_id == spans[1].trace_id
    assert spans[0].trace_id.hex() != "0" * 32
    assert host.stats["traceparent_malformed"] == 2


def test_same_host_matches_requests_by_their_order_on_the_connection() -> None:
    host = Host()
    out, into = host.connect(1, 2, 8080)
    clients, servers = [], []
    for sequence in range(3):
        clients.append(host.start(out, 10 * sequence + 1, sequence=sequence))
        servers.append(host.start(into, 10 * sequence + 2, sequence=sequence))
    server_spans = [host.end(server, 10 * i + 3) for i, server in enumerate(servers)]
    client_spans = [host.end(client, 10 * i + 4) for i, client in enumerate(clients)]
    assert [s.parent_span_id for s in server_spans] == [c.span_id for c in client_spans]
    assert [s.trace_id for s in server_spans] == [c.trace_id for c in client_spans]
    assert len({c.trace_id for c in client_spans}) == 3


def test_a_server_end_that_shed_its_first_exchange_finds_its_client_by_number() -> None:
    """The kernel shed the server end's first exchange (over the rate limit): the
    first request it parsed is the connection's second, and carries the
    kernel's number for it, as the client end's second request does. The
    client span of that request is its parent, not the first one's."""
    host = Host()
    out, into = host.connect(1, 2, 8080)
    first = host.start(out, 1, sequence=1 << SEQUENCE_SHIFT)
    second = host.start(out, 11, sequence=2 << SEQUENCE_SHIFT)
    served = host.start(into, 12, sequence=2 << SEQUENCE_SHIFT)
    server_span = host.end(served, 13)
    client_spans = [host.end(first, 5), host.end(second, 14)]
    assert server_span.parent_span_id == client_spans[1].span_id
    assert server_span.trace_id == client_spans[1].trace_id != client_spans[0].trace_id
    assert host.rules()["links_same_host"] == 1


def test_a_server_reported_before_its_client_waits_and_so_does_its_subtree() -> None:
    host = Host()
    curl_a, a_in = host.connect(1, 2, 8080)
    a_b, b_in = host.connect(2, 3, 9090)
    a_server = host.start(a_in, 11, tid=21)  # the client's start is delivered late
    a_client = host.start(a_b, 12, tid=21)
    b_server = host.start(b_in, 13)
    b_span, a_client_span = host.end(b_server, 14), host.end(a_client, 15)
    assert host.exported == []  # their trace is not known yet
    host.now = WAIT_NS - 1
    host.linker.expire()
    assert host.exported == []
    curl = host.start(curl_a, 10)  # within the wait
    a_span = host.end(a_server, 16)
    curl_span = host.end(curl, 17)
    spans = [b_span, a_client_span, a_span, curl_span]
    assert host.exported == spans
    assert parents(spans) == [spans[1], spans[2], spans[3], None]
    assert {span.trace_id for span in spans} == {curl_span.trace_id}
    assert host.stats["link_wait_expired"] == 0


def test_a_server_without_a_traced_client_is_a_root_once_the_wait_ends() -> None:
    host = Host()
    _, into = host.connect(1, 2, 8080)
    span = host.end(host.start(into, 10), 20)
    host.now = WAIT_NS - 1
    host.linker.expire()
    assert host.exported == []
    host.now = WAIT_NS
    host.linker.expire()
    assert host.exported == [span] and span.parent_span_id is None
    assert host.rules() == {"links_none": 1}
    assert host.stats["link_wait_expired"] == 1
    assert len(host.linker) == 0


def test_a_connection_whose_client_end_was_not_seen_does_not_wait_again() -> None:
    host = Host()
    _, lone = host.connect(1, 2, 8080, client_port=40001)
    first = host.end(host.start(lone, 10), 20)
    host.now = WAIT_NS
    host.linker.expire()
    assert host.exported == [first]
    second = host.end(host.start(lone, 30, sequence=1), 40)
    assert host.exported == [first, second]  # at once, as a root
    assert second.parent_span_id is None and second.trace_id != first.trace_id
    assert host.stats["link_wait_skipped"] == 1
    # Another connection to the same server still waits for its client.
    curl_out, other = host.connect(1, 2, 8080, client_port=40002)
    third = host.end(host.start(other, 50), 60)
    assert host.exported == [first, second]
    host.start(curl_out, 45)  # its client end, reported late
    assert third in host.exported and third.parent_span_id is not None


def test_a_lone_connection_still_takes_a_client_end_known_at_its_start() -> None:
    host = Host()
    client_end, server_end = host.connect(1, 2, 8080)
    host.end(host.start(server_end, 10), 20)
    host.now = WAIT_NS
    host.linker.expire()  # the first request's client end was not seen
    call = host.start(client_end, 30, sequence=1)  # the second's is
    served = host.end(host.start(server_end, 31, sequence=1), 40)
    called = host.end(call, 41)
    assert served.parent_span_id == called.span_id
    assert host.stats["link_wait_skipped"] == 0


def test_a_server_whose_client_end_cannot_be_traced_here_does_not_wait() -> None:
    untraced: set[int] = {2}  # server pids whose connections have no client end here
    host = Host(client_end=lambda server: server.key.pid not in untraced)
    _, remote = host.connect(1, 2, 8080)
    span = host.end(host.start(remote, 10), 20)
    assert host.exported == [span] and span.parent_span_id is None  # at once, a root
    assert host.stats["link_wait_skipped"] == 1
    # Where a client end may be traced, the wait is as before.
    _, local = host.connect(1, 3, 8080)
    waiting = host.end(host.start(local, 30), 40)
    assert waiting not in host.exported
    host.now = WAIT_NS + 30
    host.linker.expire()
    assert host.exported == [span, waiting]
    assert host.stats["link_wait_expired"] == 1


def test_no_wait_exports_at_once_and_flush_ends_every_wait() -> None:
    host = Host(wait_ns=0)
    _, into = host.connect(1, 2, 8080)
    span = host.end(host.start(into, 10), 20)
    assert host.exported == [span]
    waiting = Host()
    _, into = waiting.connect(1, 2, 8080)
    span = waiting.end(waiting.start(into, 10), 20)
    waiting.linker.flush()
    assert waiting.exported == [span]


def test_namespaces_that_reuse_addresses_are_not_guessed_silently() -> None:
    host = Host()
    # Two client processes in two namespaces, with the same addresses.
    out_1, into = host.connect(1, 2, 8080)
    out_2 = ConnectionInfo(ConnKey(5, 3, 1), Role.CLIENT, out_1.local, out_1.peer)
    late = ConnectionInfo(ConnKey(6, 3, 1), Role.CLIENT, out_1.local, out_1.peer)
    first, second = host.start(out_1, 10), host.start(out_2, 11)
    host.start(late, 13)  # started after the server's request: cannot be its client
    server = host.start(into, 12)
    server_span = host.end(server, 14)
    first_span, second_span = host.end(first, 15), host.end(second, 16)
    assert server_span.parent_span_id is None
    [link] = server_span.links
    assert (link.span_id, link.trace_id) == (second_span.span_id, second_span.trace_id)
    assert server_span.trace_id not in (first_span.trace_id, second_span.trace_id)
    assert host.stats["links_inferred"] == 1


def test_a_span_whose_start_was_never_reported_is_linked_when_it_ends() -> None:
    host = Host(wait_ns=0)
    _, a_in = host.connect(1, 2, 8080)
    a_out, _ = host.connect(2, 3, 9090)
    server = host.start(a_in, 10, tid=21)
    request = HttpRequest("1.1", [], 11, 11, tid=21, method="GET", target="/")
    client = HttpExchange(a_out, request, None)  # no request_started for this one
    client_span = host.end(client, 12)
    server_span = host.end(server, 13)
    assert client_span.parent_span_id == server_span.span_id


def test_memory_is_bounded_and_a_process_exit_forgets_its_threads() -> None:
    host = Host(wait_ns=0, max_contexts=4)
    for port in range(10):
        _, into = host.connect(1, 2, 8000 + port)
        host.start(into, port, tid=21)
    assert len(host.linker) == 4
    assert host.stats["link_contexts_evicted"] == 6
    host.linker.process_exited(2)
    out, _ = host.connect(2, 3, 9090)
    span = host.end(host.start(out, 20, tid=21), 21)
    assert span.parent_span_id is None and span.links == []
    assert host.rules() == {"links_none": 1}


def test_a_thread_serving_request_after_request_parents_only_the_one_in_progress() -> None:
    host = Host(wait_ns=0)
    _, into = host.connect(1, 2, 8080)
    out, _ = host.connect(2, 3, 9090)
    first = host.end(host.start(into, 10, tid=21, sequence=1), 11)
    after_first = host.end(host.start(out, 12, tid=21), 13)
    second = host.start(into, 14, tid=21, sequence=2)
    during_second = host.end(host.start(out, 15, tid=21), 16)
    second_span = host.end(second, 17)
    assert after_first.parent_span_id is None and after_first.links == []
    assert first.span_id != second_span.span_id
    assert during_second.parent_span_id == second_span.span_id
    assert host.rules() == {"links_none": 3, "links_thread": 1}


def test_what_idle_threads_leave_behind_is_bounded() -> None:
    """A thread stays registered between its requests; thousands of threads
    that served once do not stay forever, nor are they searched for work
    handed on, nor does forgetting them lose a request still in progress."""
    host = Host(wait_ns=0)
    _, into = host.connect(1, 2, 8080)
    busy = host.start(into, 1, tid=7, sequence=1)
    for tid in range(100, 100 + MAX_THREAD_SLOTS + 10):
        host.end(host.start(into, tid, tid=tid, sequence=tid), tid)
    assert len(host.linker._in_progress) <= MAX_THREAD_SLOTS
    assert len(host.linker._serving[2]) == 1  # what a handed-on request searches
    out, _ = host.connect(2, 3, 9090)
    client = host.end(host.start(out, 20_000, tid=7), 20_001)
    handed_on = host.end(host.start(out, 20_002, tid=50_000), 20_003)
    busy_span = host.end(busy, 20_004)
    assert client.parent_span_id == busy_span.span_id
    assert [link.span_id for link in handed_on.links] == [busy_span.span_id]


def test_held_spans_are_bounded_too() -> None:
    host = Host(max_held=2)
    spans = []
    for port in range(5):  # servers whose clients never show: each waits, held
        _, into = host.connect(1, 2, 8000 + port)
        spans.append(host.end(host.start(into, port), 10 + port))
    assert len(host.linker) == 2
    assert host.exported == spans[:3]  # the oldest stopped waiting to make room
    assert host.stats["link_wait_cut"] == 3


def test_the_tracker_reports_request_starts() -> None:
    """The protocol stage's callback: a request head, before its response exists."""
    host = Host(wait_ns=0)
    started: list[tuple[ConnectionInfo, HttpRequest]] = []

    def on_request(connection: ConnectionInfo, request: HttpRequest) -> None:
        started.append((connection, request))
        host.linker.request_started(connection, request)

    tracker = ConnectionTracker(lambda exchange: None, host.stats, on_request=on_request)
    key = ConnKey(2, 5, 1)
    tracker.handle(ConnOpen(key, 2, 0, Role.SERVER, Endpoint("10.0.0.2", 80), None))
    for i in range(2):
        data = f"GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        tracker.handle(DataEvent(key, 7, 10 * i, 10 * i + 1, Direction.INGRESS, len(data), data))
    assert [(c.key, r.target, r.sequence, r.tid) for c, r in started] == [
        (key, "/0", 0, 7),
        (key, "/1", 1, 7),
    ]


_header_values = st.one_of(
    st.text(max_size=70),
    st.builds(
        lambda parts, sep: sep.join(parts),
        st.lists(st.text("0123456789abcdefABCDEF-", max_size=33), min_size=1, max_size=5),
        st.sampled_from(["-", "", "_"]),
    ),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_header_values, max_size=3), st.lists(_header_values, max_size=2))
def test_fuzzed_traceparent_never_crashes_nor_exports_bad_ids(
    traceparents: list[str], tracestates: list[str]
) -> None:
    host = Host(wait_ns=0)
    headers = [("traceparent", v) for v in traceparents] + [("tracestate", v) for v in tracestates]
    out, into = host.connect(1, 2, 8080)
    client = host.start(out, 10, headers=headers)
    server = host.start(into, 11, headers=headers)
    for span in (host.end(server, 12), host.end(client, 13)):
        assert len(span.trace_id) == 16 and any(span.trace_id)
        assert len(span.span_id) == 8 and any(span.span_id)
        assert span.parent_span_id is None or (
            len(span.parent_span_id) == 8 and any(span.parent_span_id)
        )
