"""The connection table: opening, adopting, closing, evicting, counting."""

from __future__ import annotations

from probe.kernel.events import ConnKey, Endpoint, ProcessExit, Role
from probe.protocol.model import ConnectionInfo

LOCAL = Endpoint("10.0.0.1", 8080)
PEER = Endpoint("10.0.0.2", 51234)
GET = b"GET /x HTTP/1.1\r\nHost: svc\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_open_exchange_close(wire, recorder) -> None:
    recorder.feed(wire.open(LOCAL, PEER), wire.read(GET), wire.write(OK), wire.close())
    [exchange] = recorder.exchanges
    info = exchange.connection
    assert (info.key, info.role, info.local, info.peer) == (wire.key, Role.SERVER, LOCAL, PEER)
    assert (exchange.request.target, exchange.response.body_size) == ("/x", 2)
    assert recorder.stats.snapshot() == {
        "connections_closed": 1,
        "connections_opened": 1,
        "exchanges": 1,
    }
    assert len(recorder.tracker) == 0


def test_data_of_an_unseen_connection_resolves_its_addresses_once(make_wire, make_recorder) -> None:
    calls = []

    def resolve(pid: int, fd: int) -> tuple[Endpoint | None, Endpoint | None]:
        calls.append((pid, fd))
        return LOCAL, PEER

    wire = make_wire(key=ConnKey(pid=321, fd=9, generation=5), role=Role.CLIENT)
    recorder = make_recorder(resolve=resolve)
    recorder.feed(wire.write(GET), wire.read(OK), wire.write(GET), wire.read(OK))
    assert calls == [(321, 9)]
    assert [
        (e.connection.role, e.connection.local, e.connection.peer) for e in recorder.exchanges
    ] == [(Role.CLIENT, LOCAL, PEER)] * 2
    assert recorder.stats["connections_opened"] == 1


def test_unseen_connection_without_resolver_has_no_addresses(make_wire, recorder) -> None:
    wire = make_wire(role=Role.SERVER)
    recorder.feed(wire.read(GET), wire.write(OK))
    [exchange] = recorder.exchanges
    assert (exchange.connection.local, exchange.connection.peer) == (None, None)


def test_close_of_an_unknown_connection_is_ignored(wire, recorder) -> None:
    recorder.feed(wire.close())
    assert (recorder.exchanges, recorder.stats.snapshot()) == ([], {})


def test_process_exit_closes_only_that_process(make_wire, recorder) -> None:
    a1 = make_wire(key=ConnKey(1, 3, 10))
    a2 = make_wire(clock=a1.clock, key=ConnKey(1, 4, 11))
    b = make_wire(clock=a1.clock, key=ConnKey(2, 3, 12))
    recorder.feed(a1.open(), a2.open(), b.open(), a1.read(GET), a2.read(GET), b.read(GET))
    recorder.feed(ProcessExit(pid=1, timestamp_ns=a1.clock.now))
    assert sorted((e.connection.key.fd, e.error) for e in recorder.exchanges) == [
        (3, "process exited before response"),
        (4, "process exited before response"),
    ]
    assert len(recorder.tracker) == 1
    recorder.feed(b.write(OK))
    assert (recorder.exchanges[-1].connection.key, recorder.exchanges[-1].error) == (b.key, None)
    assert recorder.stats["connections_closed"] == 2


def test_connections_used_in_turn_are_evicted_by_their_last_use(make_wire, make_recorder) -> None:
    """Recency follows every record, runs on one connection and turns between two."""
    recorder = make_recorder(max_connections=2)
    first = make_wire(key=ConnKey(1, 3, 1))
    second = make_wire(clock=first.clock, key=ConnKey(1, 4, 2))
    recorder.feed(first.open(), second.open(), first.read(GET), second.read(GET))
    recorder.feed(second.write(OK), second.read(GET))  # a run on second: first is older
    recorder.feed(make_wire(clock=first.clock, key=ConnKey(1, 5, 3)).open())
    assert [(e.connection.key, e.error) for e in recorder.exchanges] == [
        (second.key, None),
        (first.key, "connection evicted before response"),
    ]


def test_least_recently_used_connection_is_evicted(make_wire, make_recorder) -> None:
    recorder = make_recorder(max_connections=2)
    first = make_wire(key=ConnKey(1, 3, 1))
    second = make_wire(clock=first.clock, key=ConnKey(1, 4, 2))
    third = make_wire(clock=first.clock, key=ConnKey(1, 5, 3))
    recorder.feed(first.open(), second.open(), first.read(GET), second.read(GET))
    recorder.feed(first.read(GET))  # first is now the more recently used
    recorder.feed(third.open())
    [evicted] = recorder.exchanges
    assert (evicted.connection.key, evicted.error) == (
        second.key,
        "connection evicted before response",
    )
    assert recorder.stats["connections_evicted"] == 1
    assert len(recorder.tracker) == 2
    recorder.feed(first.write(OK + OK))
    assert [e.connection.key for e in recorder.exchanges[1:]] == [first.key, first.key]


def test_records_after_a_connection_ended_start_a_new_one(make_wire, make_recorder) -> None:
    """Closed, its process gone, evicted or flushed, a connection takes no
    more records, not even those of its last run (the tracker keeps the
    connection it fed last at hand): its key's next record starts another."""
    recorder = make_recorder(max_connections=1)
    wire = make_wire(key=ConnKey(1, 3, 1))
    other = make_wire(clock=wire.clock, key=ConnKey(1, 4, 2))
    ways_out = (
        lambda: recorder.feed(wire.close()),
        lambda: recorder.feed(wire.exit()),
        lambda: recorder.feed(other.open()),  # evicts wire's: one connection at most
        recorder.tracker.flush,
    )
    for end in ways_out:
        recorder.feed(wire.read(GET[:5]))  # half a head: the connection is at hand
        end()
        recorder.feed(wire.read(GET), wire.write(OK))  # not after that half
        exchange = recorder.exchanges[-1]
        assert (exchange.request.target, exchange.error) == ("/x", None)
    # the first connection, one after each way out, and the one that evicted
    assert recorder.stats["connections_opened"] == 6


def test_flush_completes_everything(make_wire, recorder) -> None:
    server = make_wire(key=ConnKey(1, 3, 1))
    client = make_wire(clock=server.clock, key=ConnKey(2, 3, 2), role=Role.CLIENT)
    recorder.feed(
        server.open(),
        server.read(GET),
        client.open(),
        client.write(GET),
        client.read(b"HTTP/1.0 200 OK\r\n\r\nstreaming"),
    )
    recorder.tracker.flush()
    assert sorted(
        (e.connection.key.pid, e.response and e.response.body_size, e.error)
        for e in recorder.exchanges
    ) == [(1, None, "probe stopped before response"), (2, 9, None)]
    assert len(recorder.tracker) == 0


def test_parse_errors_are_counted_per_connection_direction(make_wire, recorder) -> None:
    first = make_wire(key=ConnKey(1, 3, 1))
    second = make_wire(clock=first.clock, key=ConnKey(1, 4, 2))
    for wire in (first, second):
        recorder.feed(wire.open(), wire.read(b"\x16\x03\x01\x00\xa5" * 10), wire.read(b"\x16\x03"))
    assert recorder.stats["parse_errors"] == 2
    assert recorder.exchanges == []


def test_a_server_connection_knows_whether_its_client_end_is_traced(make_wire, recorder) -> None:
    tracker = recorder.tracker
    server = ConnectionInfo(ConnKey(1, 3, 1), Role.SERVER, LOCAL, PEER)
    assert not tracker.has_client_end(server)  # a client on another host, or excluded
    client = make_wire(key=ConnKey(2, 3, 2), role=Role.CLIENT)
    twin = make_wire(clock=client.clock, key=ConnKey(3, 3, 3), role=Role.CLIENT)
    recorder.feed(client.open(PEER, LOCAL), twin.open(PEER, LOCAL))  # e.g. two namespaces
    assert tracker.has_client_end(server)
    recorder.feed(client.close())
    assert tracker.has_client_end(server)
    recorder.feed(twin.close())
    assert not tracker.has_client_end(server)
    # A client whose own address is not known yet may be anyone's client end.
    unaddressed = make_wire(clock=client.clock, key=ConnKey(4, 3, 4), role=Role.CLIENT)
    recorder.feed(unaddressed.open(None, LOCAL))
    assert tracker.has_client_end(server)
    recorder.feed(ProcessExit(pid=4, timestamp_ns=client.clock.now))
    assert not tracker.has_client_end(server)
    # Unknown addresses rule nothing out.
    assert tracker.has_client_end(ConnectionInfo(ConnKey(1, 4, 5), Role.SERVER, LOCAL, None))


def test_a_connection_open_before_the_probe_may_have_a_late_client_end(make_wire, recorder) -> None:
    old = make_wire(key=ConnKey(1, 3, 1), role=Role.UNKNOWN)
    recorder.feed(old.open(LOCAL, PEER), old.read(GET), old.write(OK))
    [exchange] = recorder.exchanges
    info = exchange.connection
    assert info.role == Role.SERVER  # learnt from its bytes
    assert recorder.tracker.has_client_end(info)
    recorder.feed(old.close())
    assert not recorder.tracker.has_client_end(info)
