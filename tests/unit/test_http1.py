"""Message framing of one direction: heads, bodies, gaps, garbage."""

from __future__ import annotations

import dataclasses

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probe.protocol import http1
from probe.protocol.http1 import (
    HEAD_CACHE_MAX,
    MAX_HEAD_SIZE,
    MessageStream,
    RequestStream,
    ResponseStream,
    looks_like_request,
    looks_like_response,
)
from probe.protocol.model import HttpMessage, HttpRequest, HttpResponse
from probe.stats import Stats

CURL_GET = (
    b"GET /api/items?page=2 HTTP/1.1\r\n"
    b"Host: example.test:8080\r\n"
    b"User-Agent: curl/8.5.0\r\n"
    b"Accept: */*\r\n"
    b"\r\n"
)
CHUNKED_RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/plain\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
    b"7\r\nMozilla\r\n"
    b"11;ext=1\r\nDeveloper Network\r\n"
    b"0\r\n"
    b"Expires: Wed, 21 Oct 2015 07:28:00 GMT\r\n"
    b"\r\n"
)


class Sink:
    """Records what a stream reports; answers as if ``method`` were pending."""

    def __init__(self, method: str | None = "GET") -> None:
        self.method = method
        self.started = 0
        self.parsed: list[HttpMessage] = []
        self.ended: list[HttpMessage] = []

    def message_started(self, stream: MessageStream) -> None:
        self.started += 1

    def head_parsed(self, message: HttpMessage) -> None:
        self.parsed.append(message)

    def message_ended(self, message: HttpMessage) -> None:
        self.ended.append(message)

    def answered_method(self) -> str | None:
        return self.method


class Fixture:
    """A stream under test, fed one syscall at a time on a fake clock."""

    def __init__(self, stream_class: type[MessageStream], method: str | None = "GET") -> None:
        self.sink = Sink(method)
        self.stats = Stats()
        self.stream = stream_class(self.sink, self.stats)
        self.now = 0

    def feed(self, data: bytes, size: int | None = None, tid: int = 1, tail: bool = False) -> None:
        """One syscall that started at now+1 and returned at now+2; with
        ``tail``, ``data`` is its last bytes, as the kernel sends past a
        message's captured ones."""
        size = len(data) if size is None else size
        self.stream.feed(data, size, self.now + 1, self.now + 2, tid, tail=tail)
        self.now += 10

    @property
    def ended(self) -> list[HttpMessage]:
        return self.sink.ended


def requests() -> Fixture:
    return Fixture(RequestStream)


def responses(method: str | None = "GET") -> Fixture:
    return Fixture(ResponseStream, method)


@pytest.mark.parametrize(
    ("data", "verdict"),
    [
        (b"GET / HTTP/1.1", True),
        (b"M-SEARCH * HTTP/1.1", True),
        (b"PURGE /x", True),
        (b"G", None),
        (b"POST", None),
        (b"get / HTTP/1.1", False),
        (b" GET /", False),
        (b"\x16\x03\x01\x02\x00", False),
        (b"HTTP/1.1 200 OK", False),
        (b"A" * 33, False),
    ],
)
def test_looks_like_request(data: bytes, verdict: bool | None) -> None:
    assert looks_like_request(data) is verdict


@pytest.mark.parametrize(
    ("data", "verdict"),
    [
        (b"HTTP/1.1 200 OK", True),
        (b"HTTP/1.0 ", True),
        (b"HTT", None),
        (b"HTTP/2 200", False),
        (b"GET / HTTP/1.1", False),
        (b"\x17\x03\x03", False),
    ],
)
def test_looks_like_response(data: bytes, verdict: bool | None) -> None:
    assert looks_like_response(data) is verdict


def test_curl_get_head_fields_and_timing() -> None:
    f = requests()
    f.feed(CURL_GET, tid=42)
    [request] = f.ended
    assert isinstance(request, HttpRequest)
    assert (request.method, request.target, request.version) == ("GET", "/api/items?page=2", "1.1")
    assert request.headers == [
        ("host", "example.test:8080"),
        ("user-agent", "curl/8.5.0"),
        ("accept", "*/*"),
    ]
    assert (request.start_ns, request.end_ns, request.tid) == (1, 2, 42)
    assert (request.body_size, request.head_truncated, request.body_framing_lost) == (
        0,
        False,
        False,
    )
    assert f.sink.started == 1
    assert f.sink.parsed == [request]


def test_head_spread_over_syscalls_starts_at_first_and_ends_at_last() -> None:
    f = requests()
    f.feed(CURL_GET[:5], tid=7)
    f.feed(CURL_GET[5:-1], tid=8)
    assert f.ended == []
    f.feed(CURL_GET[-1:], tid=9)
    [request] = f.ended
    assert (request.start_ns, request.end_ns, request.tid) == (1, 22, 7)


def test_post_body_by_content_length() -> None:
    f = requests()
    f.feed(b"POST /form HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello")
    assert f.ended == []
    f.feed(b" world")
    [request] = f.ended
    assert (request.method, request.body_size, request.end_ns) == ("POST", 11, 12)


def test_body_gap_is_counted_from_sizes() -> None:
    f = requests()
    data = b"PUT /blob HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1_000_000
    for pos in range(0, len(data), 65536):
        piece = data[pos : pos + 65536]
        f.feed(piece[:4096], size=len(piece))
    [request] = f.ended
    assert request.body_size == 1_000_000
    assert (request.head_truncated, request.body_framing_lost) == (False, False)


def test_chunked_body_counts_chunk_data_with_extensions_and_trailers() -> None:
    f = responses()
    f.feed(CHUNKED_RESPONSE)
    [response] = f.ended
    assert isinstance(response, HttpResponse)
    assert (response.status_code, response.reason) == (200, "OK")
    assert response.body_size == 7 + 17
    assert response.body_framing_lost is False


def test_chunk_data_gap_keeps_framing() -> None:
    f = responses()
    f.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    f.feed(b"2000\r\n" + b"a" * 10, size=6 + 0x2000 + 2)  # the chunk's CRLF is in the gap too
    f.feed(b"0\r\n\r\n")
    [response] = f.ended
    assert (response.body_size, response.body_framing_lost) == (0x2000, False)
    assert f.stats["parse_errors"] == 0


def test_gap_in_chunk_size_line_loses_framing_until_the_other_side_speaks() -> None:
    f = responses()
    f.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10", size=60)
    f.feed(b"more bytes")
    assert f.ended == []
    f.stream.end_open_message()
    [response] = f.ended
    assert response.body_framing_lost is True
    assert response.body_size == 11 + 10  # the bytes after the lost chunk-size line
    assert response.end_ns == 12
    assert f.stats["parse_errors"] == 0


def test_a_chunked_body_past_the_capture_ends_at_its_last_chunk() -> None:
    """Past the capture, each call comes as its last bytes: the chunk sizes in
    between are lost, and the body ends with the call whose last bytes are
    the last chunk, without waiting for the other side."""
    f = responses()
    f.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n", size=100)
    f.feed(b"aaaaaa\r\n", size=4102, tail=True)  # a chunk's rest, and the next's size
    f.feed(b"aaaaaa\r\n", size=4104, tail=True)
    assert f.ended == []
    f.feed(b"0\r\n\r\n", tail=True)  # the last chunk, written alone
    [response] = f.ended
    assert response.end_ns == 32
    assert response.body_framing_lost is True  # its size counts the framing too
    assert f.stats["parse_errors"] == 0
    f.feed(b"HTTP/1.1 204 No Content\r\n\r\n")  # the next response, captured again
    assert [r.status_code for r in f.ended] == [200, 204]


def test_a_call_ending_with_the_last_chunk_ends_the_body() -> None:
    f = responses()
    f.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10", size=4096)
    f.feed(b"a\r\n0\r\n\r\n", size=9000, tail=True)
    [response] = f.ended
    assert response.end_ns == 12


@pytest.mark.parametrize(
    "tail",
    [
        b"xx\r\n0\r\nX:",  # trailers follow
        b"\r\n10\r\n\r\n",  # a chunk of 16 that starts with CRLF
        b"aaaaaaaa",
    ],
)
def test_other_last_bytes_leave_a_chunked_body_open(tail: bytes) -> None:
    f = responses()
    f.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10", size=4096)
    f.feed(tail, size=9000, tail=True)
    assert f.ended == []
    f.stream.end_open_message()
    assert len(f.ended) == 1


def test_last_bytes_are_counted_and_never_parsed() -> None:
    """A body framed by its length is counted to its end; last bytes that look
    like the end of a chunked body, or like a message, are neither."""
    f = responses()
    f.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n", size=4096)
    f.feed(b"\r\n0\r\n\r\n", size=5000, tail=True)
    assert f.ended == []
    f.feed(b"HTTP/1.1", size=10000 - 4096 + 38 - 5000 + 38, tail=True)
    [response] = f.ended
    assert (response.body_size, response.body_framing_lost) == (10000, False)
    f.feed(b"HTTP/1.1", size=20, tail=True)  # the middle of something: not a start
    assert len(f.ended) == 1 and f.sink.started == 1


def test_malformed_chunk_size_is_a_parse_error_and_loses_framing() -> None:
    f = responses()
    f.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc")
    assert f.stats["parse_errors"] == 1
    f.stream.close()
    [response] = f.ended
    assert response.body_framing_lost is True


def test_head_response_has_no_body_despite_content_length() -> None:
    f = responses(method="HEAD")
    f.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5120\r\n\r\nHTTP/1.1 404 Not Found\r\n\r\n")
    assert [(m.status_code, m.body_size) for m in f.ended] == [(200, 0), (404, 0)]


@pytest.mark.parametrize("status", [100, 101, 103, 204, 304])
def test_statuses_without_body(status: int) -> None:
    f = responses()
    f.feed(f"HTTP/1.1 {status} X\r\nContent-Length: 10\r\n\r\n".encode())
    [response] = f.ended
    assert (response.status_code, response.body_size) == (status, 0)


def test_connect_success_has_no_body() -> None:
    f = responses(method="CONNECT")
    f.feed(b"HTTP/1.1 200 Connection established\r\n\r\n")
    [response] = f.ended
    assert response.reason == "Connection established"


def test_http10_response_without_length_runs_until_close() -> None:
    f = responses()
    f.feed(b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n<html>")
    f.feed(b"x" * 100, size=5000)
    assert f.ended == []
    f.stream.close()
    [response] = f.ended
    assert (response.version, response.body_size, response.end_ns) == ("1.0", 6 + 5000, 12)
    assert response.body_framing_lost is False


def test_read_until_close_ended_by_the_other_side_is_inferred() -> None:
    f = responses()
    f.feed(b"HTTP/1.1 200 OK\r\n\r\nabc")
    f.stream.end_open_message()
    [response] = f.ended
    assert (response.body_size, response.body_framing_lost) == (3, True)


def test_unknown_method_keeps_its_name() -> None:
    f = requests()
    f.feed(b"FOO /thing HTTP/1.1\r\nHost: a\r\n\r\nPURGE /cache HTTP/1.1\r\n\r\n")
    assert [(m.method, m.target) for m in f.ended] == [("FOO", "/thing"), ("PURGE", "/cache")]
    assert f.stats["parse_errors"] == 0


def test_pipelined_requests_in_one_write() -> None:
    f = requests()
    f.feed(b"".join(f"GET /{i} HTTP/1.1\r\nHost: a\r\n\r\n".encode() for i in range(5)))
    assert [m.target for m in f.ended] == ["/0", "/1", "/2", "/3", "/4"]
    assert {(m.start_ns, m.end_ns) for m in f.ended} == {(1, 2)}


def test_empty_lines_between_messages_are_ignored() -> None:
    f = requests()
    f.feed(b"POST / HTTP/1.1\r\nContent-Length: 1\r\n\r\nx\r\n")
    f.feed(b"\r\nGET /next HTTP/1.1\r\n\r\n")
    assert [m.target for m in f.ended] == ["/", "/next"]
    assert f.stats["parse_errors"] == 0


def test_cut_head_keeps_start_line_and_complete_header_lines() -> None:
    f = requests()
    head = CURL_GET[:-2] + b"Cookie: " + b"c" * 8000 + b"\r\n\r\n"
    f.feed(head[:4096], size=len(head))
    [request] = f.sink.parsed
    assert (request.method, request.target, request.head_truncated) == (
        "GET",
        "/api/items?page=2",
        True,
    )
    assert [name for name, _ in request.headers] == ["host", "user-agent", "accept"]
    assert f.ended == []
    f.stream.end_open_message()
    assert f.ended == [request]
    assert (request.body_framing_lost, request.body_size, request.end_ns) == (True, 0, 2)
    f.feed(CURL_GET)  # the next syscall starts the next request
    assert len(f.ended) == 2
    assert f.stats["parse_errors"] == 0


def test_head_cut_inside_start_line_is_a_parse_error() -> None:
    f = requests()
    f.feed(b"GET /" + b"a" * 100, size=9000)
    assert (f.sink.parsed, f.stats["parse_errors"]) == ([], 1)


def test_head_without_end_is_bounded() -> None:
    f = requests()
    f.feed(b"GET / HTTP/1.1\r\n")
    for _ in range(MAX_HEAD_SIZE // 4096 + 1):
        f.feed(b"X-Filler: " + b"f" * 4084 + b"\r\n")
    assert (f.sink.parsed, f.stats["parse_errors"]) == ([], 1)
    f.feed(CURL_GET)
    assert len(f.ended) == 1


def test_garbage_is_one_parse_error_then_a_request_resyncs() -> None:
    f = requests()
    f.feed(bytes(range(256)) * 4)
    f.feed(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03")
    f.feed(b"more garbage GET / HTTP/1.1\r\n\r\n")
    assert (f.ended, f.stats["parse_errors"], f.sink.started) == ([], 1, 0)
    f.feed(CURL_GET)
    assert [m.target for m in f.ended] == ["/api/items?page=2"]
    assert f.stats["parse_errors"] == 1


@pytest.mark.parametrize(
    "data",
    [
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: five\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\n\r\n",
    ],
)
def test_invalid_heads_are_parse_errors(data: bytes) -> None:
    f = requests()
    f.feed(data)
    assert (f.ended, f.stats["parse_errors"]) == ([], 1)


def test_message_lost_in_a_gap_is_skipped_silently() -> None:
    f = requests()
    f.feed(CURL_GET, size=len(CURL_GET) + 500)  # a whole request moved but not captured
    f.feed(CURL_GET)
    assert len(f.ended) == 2
    assert f.stats["parse_errors"] == 0


def test_close_ends_a_body_in_progress_as_framing_lost() -> None:
    f = requests()
    f.feed(b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc")
    f.stream.close()
    [request] = f.ended
    assert (request.body_size, request.body_framing_lost) == (3, True)
    f.feed(CURL_GET)
    assert len(f.ended) == 1


def test_stop_ignores_everything_after() -> None:
    f = responses()
    f.stream.stop()
    f.feed(b"HTTP/1.1 200 OK\r\n\r\n")
    f.feed(b"\x81\x05hello")
    assert (f.ended, f.stats["parse_errors"]) == ([], 0)


@pytest.mark.parametrize(
    "cut",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1",  # in a chunk-size line
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-Trailer: 1",  # in trailers
    ],
)
def test_bytes_before_a_gap_do_not_prefix_the_next_head(cut: bytes) -> None:
    f = responses()
    f.feed(cut)
    f.feed(b"", size=100)  # the rest of the line is lost: so is the framing
    f.stream.end_open_message()
    f.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert [(m.status_code, m.body_framing_lost) for m in f.ended] == [(200, True), (204, False)]
    assert f.stats["parse_errors"] == 0


# Messages as they follow one another on a keep-alive connection.
MESSAGES: dict[type[MessageStream], list[bytes]] = {
    RequestStream: [
        CURL_GET,
        b"POST /form HTTP/1.1\r\nContent-Length: 11\r\n\r\nhello world",
        b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"\r\nFOO /f HTTP/1.1\r\n\r\n",
        b"GET /odd HTTP/1.0\r\nX-Odd:  \xa0v \xe9\t\r\nX-Empty:\r\n\r\n",
    ],
    ResponseStream: [
        b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 25\r\n\r\n" + b"x" * 25,
        CHUNKED_RESPONSE,
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\nDate: today\r\n\r\n",
        b"HTTP/1.1 404  Not  Found \r\nContent-Length: 0\r\n\r\n",
    ],
}


def outcome(f: Fixture) -> tuple:
    """What a stream made of its bytes, but for the times, which depend on the syscalls."""
    untimed = [
        {k: v for k, v in dataclasses.asdict(m).items() if k not in ("start_ns", "end_ns")}
        for m in f.ended
    ]
    return untimed, f.sink.started, f.stats


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_messages_whole_in_a_syscall_or_split_anywhere_agree(data: st.DataObject) -> None:
    """Heads whole in a payload take a shortcut; bytes cut anywhere must read the same."""
    stream_class = data.draw(st.sampled_from(list(MESSAGES)))
    stream = b"".join(data.draw(st.lists(st.sampled_from(MESSAGES[stream_class]), min_size=1)))
    points = sorted(set(data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=20))))
    whole, split = Fixture(stream_class), Fixture(stream_class)
    whole.feed(stream)
    for start, end in zip([0, *points], [*points, len(stream)], strict=True):
        split.feed(stream[start:end])
    assert outcome(split) == outcome(whole)
    assert whole.stats["parse_errors"] == 0


class _Fields:
    """httptools callbacks: the header fields as llhttp itself splits them."""

    def __init__(self) -> None:
        self.fields: list[tuple[str, str]] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name.decode("latin-1").lower(), value.decode("latin-1").strip()))


_TOKEN = st.text("abcxyzABCXYZ019!#$%&'*+-.^_`|~", min_size=1, max_size=8)
# what llhttp takes in a value: HTAB, SP, visible ASCII, obs-text
_VALUE = st.binary(max_size=12).map(
    lambda raw: bytes(b for b in raw if b == 9 or 0x20 <= b <= 0x7E or b >= 0x80)
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_TOKEN, _VALUE), max_size=6))
def test_header_fields_are_what_llhttp_reads(fields: list[tuple[str, bytes]]) -> None:
    head = b"GET / HTTP/1.1\r\n"
    head += b"".join(name.encode() + b":" + value + b"\r\n" for name, value in fields) + b"\r\n"
    expected = _Fields()
    try:
        httptools.HttpRequestParser(expected).feed_data(head)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return  # e.g. a Content-Length that is not a number
    f = requests()
    f.feed(head)
    [request] = f.sink.parsed
    assert request.headers == expected.fields


def test_a_repeated_head_reads_the_same_into_a_message_of_its_own() -> None:
    f = requests()
    f.feed(CURL_GET, tid=1)
    f.feed(CURL_GET, tid=2)
    first, second = f.ended
    assert (first.tid, second.tid, first.start_ns < second.start_ns) == (1, 2, True)
    assert first.headers == second.headers
    first.headers.append(("x-mine", "1"))  # one message's fields are not another's
    assert ("x-mine", "1") not in second.headers


def test_a_head_too_long_to_remember_is_read_every_time() -> None:
    padding = b"X-Pad: " + b"p" * HEAD_CACHE_MAX + b"\r\n"
    f = responses()
    for _ in range(2):
        f.feed(b"HTTP/1.1 200 OK\r\n" + padding + b"Content-Length: 3\r\n\r\nabc")
    assert [(m.status_code, m.body_size, len(m.headers)) for m in f.ended] == [(200, 3, 2)] * 2


def test_a_stream_reads_a_head_it_just_read_without_parsing_it_again(monkeypatch) -> None:
    calls = []
    parse = http1._parse_request

    def counted(head: bytes):
        calls.append(head)
        return parse(head)

    monkeypatch.setattr(http1, "_parse_request", counted)
    other = CURL_GET.replace(b"page=2", b"page=3")
    long = CURL_GET[:-2] + b"X-Pad: " + b"p" * HEAD_CACHE_MAX + b"\r\n\r\n"
    f = requests()
    for head in (CURL_GET, CURL_GET, CURL_GET, other, other, CURL_GET, long, long, CURL_GET):
        f.feed(head)
    assert [len(head) for head in calls] == [
        len(h) for h in (CURL_GET, other, CURL_GET, long, long)
    ]
    assert [m.target for m in f.ended] == ["/api/items?page=2"] * 3 + ["/api/items?page=3"] * 2 + [
        "/api/items?page=2"
    ] * 4
    f.feed(b"NOT HTTP\r\n\r\n")  # after a remembered head, bytes that are no head still fail
    assert f.stats["parse_errors"] == 1
