"""Pairing requests with responses on one connection, fed as kernel events."""

from __future__ import annotations

import gc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probe.kernel.events import ConnKey, DataEvent, Direction, Role
from probe.protocol.connection import SEQUENCE_SHIFT
from probe.protocol.model import HttpExchange

T0 = 1_000_000  # the fake clock's start; syscall i enters at T0 + 1000 i, returns 400 later


def enter(i: int) -> int:
    return T0 + 1000 * i


def exit_(i: int) -> int:
    return T0 + 1000 * i + 400


def get(target: str = "/", extra: str = "") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: svc\r\nUser-Agent: curl/8.5.0\r\n{extra}\r\n".encode()


def ok(body: bytes = b"", status: str = "200 OK", extra: str = "") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


def summary(exchange: HttpExchange) -> tuple:
    """Everything about an exchange that does not depend on how bytes were split."""
    request, response = exchange.request, exchange.response
    return (
        request.method,
        request.target,
        request.version,
        request.headers,
        request.body_size,
        request.head_truncated,
        request.body_framing_lost,
        None
        if response is None
        else (
            response.status_code,
            response.reason,
            response.version,
            response.headers,
            response.body_size,
            response.head_truncated,
            response.body_framing_lost,
        ),
        [r.status_code for r in exchange.informational],
        exchange.error,
    )


def test_curl_get_exchange_with_exact_timing(wire, recorder) -> None:
    recorder.feed(
        wire.open(),
        wire.read(get("/index.html"), tid=11),
        wire.write(ok(b"<html></html>")[:20], tid=12),
        wire.write(ok(b"<html></html>")[20:], tid=13),
        wire.close(),
    )
    [exchange] = recorder.exchanges
    request, response = exchange.request, exchange.response
    assert (request.method, request.target, request.header("host")) == ("GET", "/index.html", "svc")
    # a read counts from its return, a write from its entry; both end at a return
    assert (request.start_ns, request.end_ns, request.tid) == (exit_(0), exit_(0), 11)
    assert (response.status_code, response.body_size) == (200, 13)
    assert (response.start_ns, response.end_ns, response.tid) == (enter(1), exit_(2), 12)
    assert exchange.connection.key == wire.key
    assert exchange.error is None
    assert recorder.stats["exchanges"] == 1


def test_client_role_writes_requests_and_reads_responses(make_wire, recorder) -> None:
    wire = make_wire(role=Role.CLIENT)
    recorder.feed(wire.open(), wire.write(get("/x")), wire.read(ok(b"hi")))
    [exchange] = recorder.exchanges
    assert (exchange.request.start_ns, exchange.response.start_ns) == (enter(0), exit_(1))
    assert exchange.connection.role is Role.CLIENT


def test_response_reported_before_its_request_still_pairs(make_wire, recorder) -> None:
    # Go's client writes requests on one goroutine and reads responses on
    # another: the read can return (and be reported) before the write does.
    wire = make_wire(role=Role.CLIENT)
    request_write = wire.write(get("/a"))  # enters first...
    recorder.feed(wire.open(), wire.read(ok(b"a")), request_write)  # ...reported last
    recorder.feed(wire.write(get("/b")), wire.read(ok(b"bb")))
    assert [(e.request.target, e.response.body_size) for e in recorder.exchanges] == [
        ("/a", 1),
        ("/b", 2),
    ]
    assert recorder.exchanges[0].request.start_ns < recorder.exchanges[0].response.end_ns
    assert recorder.stats["responses_before_requests"] == 1
    assert recorder.stats["parse_errors"] == 0


def test_a_response_no_request_claims_is_a_parse_error_at_close(make_wire, recorder) -> None:
    wire = make_wire(role=Role.CLIENT)
    recorder.feed(wire.open(), wire.read(ok(b"stray")), wire.close())
    assert recorder.exchanges == []
    assert recorder.stats["parse_errors"] == 1


def test_keep_alive_200_requests_in_order(wire, recorder) -> None:
    recorder.feed(wire.open())
    for i in range(200):
        recorder.feed(wire.read(get(f"/item/{i}")), wire.write(ok(str(i).encode())))
    assert [(e.request.target, e.response.body_size) for e in recorder.exchanges] == [
        (f"/item/{i}", len(str(i))) for i in range(200)
    ]
    assert recorder.exchanges[199].response.end_ns == exit_(399)
    assert recorder.stats["parse_errors"] == 0


def test_pipelined_requests_pair_in_order(wire, recorder) -> None:
    requests = b"".join(get(f"/{i}") for i in range(5))
    responses = b"".join(ok(f"body{i}".encode() * (i + 1)) for i in range(5))
    recorder.feed(wire.open(), wire.read(requests), wire.write(responses, sizes=[100, 7]))
    assert [(e.request.target, e.response.body_size) for e in recorder.exchanges] == [
        (f"/{i}", 5 * (i + 1)) for i in range(5)
    ]
    assert {e.request.end_ns for e in recorder.exchanges} == {exit_(0)}


def numbered(events: list[DataEvent], exchange: int) -> list[DataEvent]:
    """``events`` as the kernel numbers them: calls of its ``exchange``-th exchange."""
    for event in events:
        event.exchange = exchange
    return events


def test_requests_are_numbered_by_the_kernels_exchanges(wire, recorder) -> None:
    """A request's sequence is its exchange's number, as the kernel counts them
    (shed ones included, so both ends agree), then its order among the
    pipelined requests of that exchange."""
    recorder.feed(
        wire.open(),
        numbered(wire.read(get("/a")), 2),  # the first exchange was shed
        numbered(wire.write(ok()), 2),
        numbered(wire.read(get("/b") + get("/c"), sizes=[20]), 5),
        numbered(wire.write(ok() + ok()), 5),
    )
    assert [(e.request.target, e.request.sequence) for e in recorder.exchanges] == [
        ("/a", 2 << SEQUENCE_SHIFT),
        ("/b", 5 << SEQUENCE_SHIFT),
        ("/c", 5 << SEQUENCE_SHIFT | 1),
    ]


def test_requests_the_kernel_did_not_number_are_numbered_in_order(wire, recorder) -> None:
    recorder.feed(wire.open())
    for target in ("/a", "/b", "/c"):
        recorder.feed(wire.read(get(target)), wire.write(ok()))
    assert [e.request.sequence for e in recorder.exchanges] == [0, 1, 2]


def test_expect_100_continue(wire, recorder) -> None:
    head = b"PUT /f HTTP/1.1\r\nHost: svc\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    recorder.feed(wire.open(), wire.read(head), wire.write(b"HTTP/1.1 100 Continue\r\n\r\n"))
    assert recorder.exchanges == []
    recorder.feed(wire.read(b"data"), wire.write(ok(status="201 Created")))
    [exchange] = recorder.exchanges
    assert [(r.status_code, r.start_ns) for r in exchange.informational] == [(100, enter(1))]
    assert (exchange.request.body_size, exchange.request.end_ns) == (4, exit_(2))
    assert exchange.response.status_code == 201


def test_switching_protocols_ends_http(wire, recorder) -> None:
    upgrade = get("/chat", "Connection: Upgrade\r\nUpgrade: websocket\r\n")
    switched = (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    recorder.feed(
        wire.open(),
        wire.read(upgrade),
        wire.write(switched + b"\x81\x05hello"),
        wire.read(b"\x81\x85\x00\x00\x00\x00hello"),
        wire.close(),
    )
    [exchange] = recorder.exchanges
    assert (exchange.request.target, exchange.response.status_code) == ("/chat", 101)
    assert recorder.stats["parse_errors"] == 0


def test_connect_tunnel_ends_http(make_wire, recorder) -> None:
    wire = make_wire(role=Role.CLIENT)
    recorder.feed(
        wire.write(b"CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n\r\n"),
        wire.read(b"HTTP/1.1 200 Connection established\r\n\r\n"),
        wire.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
        wire.read(b"\x16\x03\x03\x00\x7a\x02\x00\x00\x76\x03\x03"),
        wire.close(),
    )
    [exchange] = recorder.exchanges
    assert (exchange.request.target, exchange.response.body_size) == ("api.test:443", 0)
    assert recorder.stats["parse_errors"] == 0


def test_close_before_response(wire, recorder) -> None:
    recorder.feed(wire.open(), wire.read(get("/slow")), wire.read(get("/slower")), wire.close())
    assert [(e.request.target, e.response, e.error) for e in recorder.exchanges] == [
        ("/slow", None, "connection closed before response"),
        ("/slower", None, "connection closed before response"),
    ]


def test_a_closed_connection_leaves_no_cycle(wire, recorder) -> None:
    """A connection and its streams let go of each other at close: freed by
    reference counting, with no work left for the cyclic collector."""
    gc.collect()
    gc.disable()
    try:
        recorder.feed(wire.open(), wire.read(get()), wire.write(ok(b"x")), wire.read(get()))
        recorder.feed(wire.close())
        assert len(recorder.tracker) == 0 and len(recorder.exchanges) == 2
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_process_exit_before_response(wire, recorder) -> None:
    recorder.feed(wire.open(), wire.read(get()), wire.exit())
    [exchange] = recorder.exchanges
    assert (exchange.response, exchange.error) == (None, "process exited before response")


def test_response_without_request_is_dropped(wire, recorder) -> None:
    recorder.feed(wire.open(), wire.write(ok(b"orphan")), wire.read(get()), wire.write(ok(b"x")))
    assert [(e.request.target, e.response.body_size) for e in recorder.exchanges] == [("/", 1)]
    assert recorder.stats["parse_errors"] == 1


def test_http10_response_ended_by_close(wire, recorder) -> None:
    recorder.feed(
        wire.open(),
        wire.read(b"GET /old HTTP/1.0\r\n\r\n"),
        wire.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst "),
        wire.write(b"second"),
    )
    assert recorder.exchanges == []
    recorder.feed(wire.close())
    [exchange] = recorder.exchanges
    response = exchange.response
    assert (response.version, response.body_size, response.body_framing_lost) == ("1.0", 12, False)
    assert response.end_ns == exit_(2)
    assert exchange.error is None


def test_unframed_response_ends_when_next_request_starts(wire, recorder) -> None:
    recorder.feed(
        wire.open(),
        wire.read(get("/1")),
        wire.write(b"HTTP/1.1 200 OK\r\n\r\nstream"),
        wire.read(get("/2")),
        wire.write(ok()),
    )
    first, second = recorder.exchanges
    assert (first.response.body_size, first.response.body_framing_lost) == (6, True)
    assert first.response.end_ns == exit_(1)
    assert (second.request.target, second.response.body_framing_lost) == ("/2", False)


def test_large_post_with_partial_capture(wire, recorder) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    post = b"POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: 1048576\r\n\r\n" + body
    sizes = [65536] * (len(post) // 65536)
    recorder.feed(wire.open(), wire.read(post, sizes=sizes), wire.write(ok(b"stored")))
    [exchange] = recorder.exchanges
    assert exchange.request.body_size == 1_048_576
    assert exchange.request.end_ns == exit_(len(sizes))  # the last, short syscall
    assert exchange.response.body_size == 6


def test_8k_headers_with_4k_capture(wire, recorder) -> None:
    cookie = "Cookie: " + "k=v; " * 1640 + "\r\n"
    big_response = ok(b"fine", extra="Set-" + cookie)
    recorder.feed(
        wire.open(),
        wire.read(get("/big", extra=cookie)),
        wire.write(big_response),
        wire.read(get("/next")),
        wire.write(ok(b"1")),
        wire.close(),
    )
    first, second = recorder.exchanges
    assert (first.request.target, first.request.header("host")) == ("/big", "svc")
    assert (first.request.head_truncated, first.request.body_framing_lost) == (True, True)
    assert first.request.end_ns == exit_(0)
    assert (first.response.status_code, first.response.header("content-length")) == (200, "4")
    assert (first.response.head_truncated, first.response.end_ns) == (True, exit_(1))
    assert (second.request.target, second.response.body_size) == ("/next", 1)
    assert recorder.stats["parse_errors"] == 0


def test_garbage_makes_no_exchange(wire, recorder) -> None:
    recorder.feed(
        wire.open(),
        wire.read(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(200))),
        wire.write(b"\x00\xff" * 300),
        wire.read(b"\x17\x03\x03\x00\x20" + b"\xaa" * 32),
        wire.close(),
    )
    assert recorder.exchanges == []
    assert recorder.stats["parse_errors"] == 2  # once per direction


def test_response_before_request_body_ends(wire, recorder) -> None:
    head = b"POST /too-big HTTP/1.1\r\nContent-Length: 100000\r\n\r\n"
    recorder.feed(
        wire.open(),
        wire.read(head + b"x" * 1000),
        wire.write(ok(status="413 Content Too Large")),
    )
    [exchange] = recorder.exchanges
    assert (exchange.request.body_size, exchange.request.end_ns) == (1000, exit_(0))
    recorder.feed(wire.read(b"x" * 99000), wire.close())
    assert (exchange.request.body_size, exchange.request.end_ns) == (1000, exit_(0))
    assert len(recorder.exchanges) == 1


def test_pending_requests_are_bounded(wire, recorder) -> None:
    recorder.feed(wire.open(), wire.read(b"".join(get(f"/{i}") for i in range(70))), wire.close())
    assert len(recorder.exchanges) == 64
    assert recorder.stats["requests_dropped"] == 6


@pytest.mark.parametrize(
    ("direction", "data", "role"),
    [
        (Direction.INGRESS, get(), Role.SERVER),
        (Direction.EGRESS, get(), Role.CLIENT),
        (Direction.INGRESS, ok(), Role.CLIENT),
        (Direction.EGRESS, ok(), Role.SERVER),
    ],
)
def test_unknown_role_is_inferred_from_first_message(
    make_wire, recorder, direction: Direction, data: bytes, role: Role
) -> None:
    wire = make_wire(role=Role.UNKNOWN)
    recorder.feed(wire.syscalls(direction, b"mid-body bytes of an earlier message"))
    recorder.feed(wire.syscalls(direction, data))
    requests = Direction.INGRESS if role is Role.SERVER else Direction.EGRESS
    recorder.feed(
        wire.syscalls(requests, get("/2")),
        wire.syscalls(Direction(1 - requests), ok()),
        wire.close(),
    )
    # a first request is answered by the later response; a first response answers nothing
    targets = ["/", "/2"] if data.startswith(b"GET") else ["/2"]
    assert [(e.connection.role, e.request.target) for e in recorder.exchanges] == [
        (role, target) for target in targets
    ]


def test_a_calls_last_bytes_never_tell_a_role(make_wire, recorder) -> None:
    """Last bytes that look like a message's start are no start: a connection
    picked up mid-stream learns its role from a call's first bytes only (a
    server reading a response would be a client)."""
    wire = make_wire(role=Role.UNKNOWN)
    [last] = wire.read(ok(b"the end of a request's body"))
    last.tail = True
    recorder.feed([last], wire.read(get("/real")), wire.write(ok(b"yes")))
    assert [(e.connection.role, e.request.target) for e in recorder.exchanges] == [
        (Role.SERVER, "/real")
    ]


def test_unknown_role_server_exchange(make_wire, recorder) -> None:
    wire = make_wire(role=Role.UNKNOWN)
    recorder.feed(wire.read(b"tail of a body"), wire.read(get("/late")), wire.write(ok(b"yes")))
    [exchange] = recorder.exchanges
    assert (exchange.connection.role, exchange.request.target) == (Role.SERVER, "/late")
    assert recorder.stats["parse_errors"] == 0


# A conversation exercising every framing rule, as a server sees it. Pieces are
# (bytes, framing): framing bytes must be captured for the result to be exact.
CHUNKS = [(b"1a;name=value\r\n", True), (b"abcdefghijklmnopqrstuvwxyz", False)]
CONVERSATION: list[tuple[Direction, list[tuple[bytes, bool]]]] = [
    (Direction.INGRESS, [(get("/a", "Accept: */*\r\n"), True)]),
    (Direction.EGRESS, [(ok()[:-2] + b"X: 1\r\n\r\n", True)]),
    (Direction.INGRESS, [(get("/b"), True)]),
    (Direction.EGRESS, [(ok(b"Hello, world!")[:-13], True), (b"Hello, world!", False)]),
    (
        Direction.INGRESS,
        [
            (b"POST /up HTTP/1.1\r\nContent-Length: 300\r\nExpect: 100-continue\r\n\r\n", True),
        ],
    ),
    (Direction.EGRESS, [(b"HTTP/1.1 100 Continue\r\n\r\n", True)]),
    (Direction.INGRESS, [(b"p" * 300, False)]),
    (
        Direction.EGRESS,
        [
            (b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n", True),
            *CHUNKS,
            (b"\r\n", True),
            (b"3\r\n", True),
            (b"xyz", False),
            (b"\r\n0\r\nDigest: sha-256=abc\r\n\r\n", True),
        ],
    ),
    (
        Direction.INGRESS,
        [
            (b"HEAD /h HTTP/1.1\r\nHost: svc\r\n\r\n", True),
            (get("/nc", 'If-None-Match: "e1"\r\n'), True),
            (b"DELETE /d HTTP/1.1\r\nHost: svc\r\n\r\n", True),
            (b"PURGE /p HTTP/1.1\r\nHost: svc\r\n\r\n", True),
            (b"FOO /f HTTP/1.1\r\n\r\n", True),
        ],
    ),
    (
        Direction.EGRESS,
        [
            (b"HTTP/1.1 200 OK\r\nContent-Length: 5120\r\n\r\n", True),
            (b'HTTP/1.1 304 Not Modified\r\nETag: "e1"\r\n\r\n', True),
            (b"HTTP/1.1 204 No Content\r\n\r\n", True),
            (ok(b"ok")[:-2], True),
            (b"ok", False),
            (b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\n", True),
            (b"until close", False),
        ],
    ),
]
EXPECTED = [
    ("GET", "/a", 0, 200, 0, []),
    ("GET", "/b", 0, 200, 13, []),
    ("POST", "/up", 300, 201, 29, [100]),
    ("HEAD", "/h", 0, 200, 0, []),
    ("GET", "/nc", 0, 304, 0, []),
    ("DELETE", "/d", 0, 204, 0, []),
    ("PURGE", "/p", 0, 200, 2, []),
    ("FOO", "/f", 0, 200, 11, []),
]


def play(make_wire, make_recorder, splits: list[list[int]] | None, capture: int):
    """Plays CONVERSATION with each segment cut into syscalls at ``splits``.

    A syscall captures ``capture`` bytes, or more when needed to keep every
    framing byte: the result must then not depend on how bytes were split.
    """
    wire = make_wire(capture=1 << 30)
    recorder = make_recorder()
    recorder.feed(wire.open())
    for index, (direction, pieces) in enumerate(CONVERSATION):
        data = b"".join(piece for piece, _ in pieces)
        framing, pos = [], 0
        for piece, is_framing in pieces:
            framing += [is_framing] * len(piece)
            pos += len(piece)
        points = sorted({p for p in (splits[index] if splits else []) if 0 < p < len(data)})
        for start, end in zip([0, *points], [*points, len(data)], strict=True):
            needed = max((i - start + 1 for i in range(start, end) if framing[i]), default=0)
            for event in wire.syscalls(direction, data[start:end]):
                event.payload = event.payload[: max(capture, needed)]
                recorder.tracker.handle(event)
    recorder.feed(wire.close())
    return recorder


def check(recorder) -> None:
    assert [
        (
            e.request.method,
            e.request.target,
            e.request.body_size,
            e.response.status_code,
            e.response.body_size,
            [r.status_code for r in e.informational],
        )
        for e in recorder.exchanges
    ] == EXPECTED
    assert recorder.stats["parse_errors"] == 0


@pytest.fixture(scope="module")
def reference(make_wire, make_recorder) -> list[tuple]:
    recorder = play(make_wire, make_recorder, None, 1 << 30)
    check(recorder)
    return [summary(e) for e in recorder.exchanges]


def test_conversation_one_byte_per_syscall(make_wire, make_recorder, reference) -> None:
    splits = [list(range(1, sum(len(p) for p, _ in pieces))) for _, pieces in CONVERSATION]
    recorder = play(make_wire, make_recorder, splits, 1)
    check(recorder)
    assert [summary(e) for e in recorder.exchanges] == reference


@settings(max_examples=150, deadline=None)
@given(
    splits=st.tuples(*(st.lists(st.integers(1, 300), max_size=12) for _ in CONVERSATION)),
    capture=st.integers(0, 64),
)
def test_conversation_split_anywhere(make_wire, make_recorder, reference, splits, capture) -> None:
    recorder = play(make_wire, make_recorder, list(splits), capture)
    check(recorder)
    assert [summary(e) for e in recorder.exchanges] == reference


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_gaps_in_bodies_count_exactly(make_wire, make_recorder, data) -> None:
    body_size = data.draw(st.integers(1, 50_000))
    head = f"POST /p HTTP/1.1\r\nContent-Length: {body_size}\r\n\r\n".encode()
    sizes = data.draw(st.lists(st.integers(1, 9000), max_size=20))
    capture = data.draw(st.integers(0, 4096))
    wire = make_wire(key=ConnKey(1, 2, 3))
    body = wire.read(b"b" * body_size, sizes=sizes)
    for event in body:
        event.payload = event.payload[:capture]
    recorder = make_recorder()
    recorder.feed(
        wire.open(),
        wire.read(head),
        body,
        wire.read(get("/after")),
        wire.write(ok(b"1") + ok(b"22")),
    )
    assert [(e.request.target, e.request.body_size) for e in recorder.exchanges] == [
        ("/p", body_size),
        ("/after", 0),
    ]


def test_switching_protocols_without_request_still_ends_http(make_wire, recorder) -> None:
    wire = make_wire(role=Role.UNKNOWN)  # picked up after the upgrade request
    switched = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
    recorder.feed(wire.read(switched + b"\x81\x02hi"), wire.write(b"\x81\x82abcdhi"))
    assert recorder.exchanges == []
    assert recorder.stats["parse_errors"] == 1  # the response answered no request we saw
