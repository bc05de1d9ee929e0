"""HTTP/1.x message framing for one direction of one connection.

A `MessageStream` turns the bytes that one direction of a connection moved
into `HttpRequest` or `HttpResponse` messages. The bytes come from syscalls
whose payload holds only the first bytes of what each syscall moved, so the
stream has gaps; framing is therefore done here, counting bytes by syscall
sizes, and httptools only parses complete (or cut-short) message heads, each
distinct head once (keep-alive traffic repeats them byte for byte; a stream
knows the head it read last again by comparing bytes).

Framing rules, as RFC 9112 section 6 gives them:

- a head ends at the first blank line (at most `MAX_HEAD_SIZE` bytes);
- ``Transfer-Encoding: chunked`` bodies are framed chunk by chunk, and
  ``body_size`` counts chunk data only, not the chunk framing;
- ``Content-Length`` bodies are counted down, captured or not;
- responses to HEAD and CONNECT (2xx), and 1xx, 204 and 304 responses have no
  body; other responses without a length run until the connection closes.

A gap inside body data only counts bytes. A gap in a head or a chunk-size line
loses the framing: the message keeps what was captured, is marked, and ends
when the connection says so (`end_open_message`) or closes. Bytes that do not
start a message are a parse error; the stream then ignores bytes until a
syscall's payload starts a message again.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Final, NamedTuple, Protocol, TypeVar

import httptools

from probe.protocol.model import HttpMessage, HttpRequest, HttpResponse
from probe.stats import Stats

MAX_HEAD_SIZE: Final = 64 * 1024  # a longer head is not HTTP worth buffering for
MAX_CHUNK_LINE: Final = 1024  # chunk size plus extensions
# Keep-alive traffic repeats its heads byte for byte (a client its request, a
# server its response within the second of its Date): a head is parsed once,
# then remembered, if it is at most HEAD_CACHE_MAX bytes long, among the
# HEAD_CACHE_SIZE most recent of requests and as many of responses.
HEAD_CACHE_SIZE: Final = 256
HEAD_CACHE_MAX: Final = 2048

_REQUEST_START: Final = re.compile(rb"[A-Z][A-Z0-9_-]{0,31} ")
_REQUEST_PREFIX: Final = re.compile(rb"[A-Z][A-Z0-9_-]{0,31}\Z")
_RESPONSE_START: Final = b"HTTP/1."
_CHUNK_SIZE: Final = re.compile(rb"[0-9A-Fa-f]{1,16}")
_CR: Final = ord("\r")
_LF: Final = ord("\n")
_VERSIONS: Final = ("1.0", "1.1")

_Parser = TypeVar("_Parser", httptools.HttpRequestParser, httptools.HttpResponseParser)


def looks_like_request(data: bytes | bytearray) -> bool | None:
    """Whether ``data`` can start a request line; None while too short to tell."""
    if _REQUEST_START.match(data):
        return True
    if len(data) <= 32 and _REQUEST_PREFIX.match(data):
        return None
    return False


def looks_like_response(data: bytes | bytearray) -> bool | None:
    """Whether ``data`` can start a status line; None while too short to tell."""
    if data.startswith(_RESPONSE_START):
        return True
    return None if _RESPONSE_START.startswith(bytes(data[: len(_RESPONSE_START)])) else False


class StreamSink(Protocol):
    """What a stream tells its connection, and asks it."""

    def message_started(self, stream: MessageStream) -> None:
        """The first bytes of a message arrived on ``stream``."""

    def head_parsed(self, message: HttpMessage) -> None:
        """A message's head is parsed; its body may still be on the way."""

    def message_ended(self, message: HttpMessage) -> None:
        """The message's last byte is known; the stream will not touch it again."""

    def answered_method(self) -> str | None:
        """The method of the request the next response answers, if known."""


class _DetachedSink:
    """The sink of a stream whose connection is gone: hears nothing, knows nothing."""

    def message_started(self, stream: MessageStream) -> None:
        pass

    def head_parsed(self, message: HttpMessage) -> None:
        pass

    def message_ended(self, message: HttpMessage) -> None:
        pass

    def answered_method(self) -> str | None:
        return None


_DETACHED: Final = _DetachedSink()


# States and body framings are plain ints, not Enums: they are read at every
# step of every syscall, and each read of an Enum member is a metaclass lookup.
# Final: compiled (probe.compiled), they become constants in the C code.
class _State:
    IDLE: Final = 0  # between messages: the next byte starts one
    HEAD: Final = 1  # reading the start line and header fields
    BODY: Final = 2  # counting down a Content-Length body
    CHUNK_LINE: Final = 3  # reading a chunk-size line
    CHUNK_DATA: Final = 4  # counting down a chunk's data
    CHUNK_END: Final = 5  # the CRLF after a chunk's data
    TRAILERS: Final = 6  # trailer fields after the last chunk
    OPEN: Final = 7  # body without framing: ends by close or by the other direction
    RESYNC: Final = 8  # framing unknown: wait for a payload that starts a message
    STOPPED: Final = 9  # closed, or no longer HTTP/1 (upgraded, tunnelled)


class _Body:
    NONE: Final = 0
    LENGTH: Final = 1
    CHUNKED: Final = 2
    UNTIL_CLOSE: Final = 3


class _Head:
    """httptools callbacks: collects the parts of one head that llhttp splits out."""

    __slots__ = ("url", "reason", "complete", "version")

    def __init__(self) -> None:
        self.url = b""
        self.reason = b""
        self.complete = False
        self.version = ""  # set by _parse, once llhttp has read the start line

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_headers_complete(self) -> None:
        self.complete = True


def _parse(parser_class: type[_Parser], head: bytes) -> tuple[_Head, _Parser]:
    """Parses a complete head; returns its parts and the parser that read them."""
    parts = _Head()
    parser = parser_class(parts)
    # Transfer-Encoding wins over Content-Length (RFC 9112 6.3); we observe, not enforce
    parser.set_dangerous_leniencies(lenient_chunked_length=True)
    try:
        parser.feed_data(head)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        # llhttp stops after the head of an upgrade or CONNECT; the head is all we gave it
        if not parts.complete:
            raise
    parts.version = parser.get_http_version()
    if parts.version not in _VERSIONS:
        raise ValueError(f"not HTTP/1.x: {parts.version}")
    return parts, parser


def _fields(head: bytes) -> tuple[tuple[str, str], ...]:
    """The header fields of a head llhttp accepted, as (lower-case name, value).

    Splitting the lines here costs a fraction of a callback per field, and
    llhttp has vouched for them: CRLF line ends, no folding, a token and a
    colon starting each line. Values are stripped of what llhttp leaves
    (trailing whitespace) and of what latin-1 makes whitespace (NBSP, NEL).
    """
    # latin-1 maps every byte, so odd header bytes never fail decoding
    fields = []
    for line in head.decode("latin-1").split("\r\n")[1:-2]:
        name, _, value = line.partition(":")
        fields.append((name.lower(), value.strip()))
    return tuple(fields)


class _ParsedHead(NamedTuple):
    """What a head says; it depends on the head's bytes alone."""

    head: bytes  # the bytes it was parsed from (the parse cache's key, not a copy)
    version: str
    headers: tuple[tuple[str, str], ...]
    body: int  # _Body: how the fields frame it (a response's request may overrule them)
    length: int  # of a LENGTH body
    method: str = ""  # requests
    target: str = ""
    status_code: int = 0  # responses
    reason: str = ""


def _first_value(headers: tuple[tuple[str, str], ...], name: str) -> str | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _remembered(parse: Callable[[bytes], _ParsedHead]) -> Callable[[bytes], _ParsedHead]:
    """``parse``, remembering what it made of each head short enough to keep."""
    cached = functools.lru_cache(maxsize=HEAD_CACHE_SIZE)(parse)

    def parse_head(head: bytes) -> _ParsedHead:
        return cached(head) if len(head) <= HEAD_CACHE_MAX else parse(head)

    return parse_head


@_remembered
def _parse_request(head: bytes) -> _ParsedHead:
    method = head[: head.index(b" ")]
    try:
        parts, _ = _parse(httptools.HttpRequestParser, head)
    except httptools.HttpParserInvalidMethodError:
        # llhttp knows a fixed list of methods; any token is a valid one (RFC 9110 9.1)
        parts, _ = _parse(httptools.HttpRequestParser, b"GET" + head[len(method) :])
    headers = _fields(head)
    # llhttp already refused a request whose Transfer-Encoding is not chunked
    if _first_value(headers, "transfer-encoding") is not None:
        body, length = _Body.CHUNKED, 0
    elif (content_length := _first_value(headers, "content-length")) is not None:
        body, length = _Body.LENGTH, int(content_length)
    else:
        body, length = _Body.NONE, 0
    return _ParsedHead(
        head,
        parts.version,
        headers,
        body,
        length,
        method=method.decode("ascii"),
        target=parts.url.decode("latin-1"),
    )


@_remembered
def _parse_response(head: bytes) -> _ParsedHead:
    parts, parser = _parse(httptools.HttpResponseParser, head)
    headers = _fields(head)
    if (transfer_encoding := _first_value(headers, "transfer-encoding")) is not None:
        body = _Body.CHUNKED if _is_chunked(transfer_encoding) else _Body.UNTIL_CLOSE
        length = 0
    elif (content_length := _first_value(headers, "content-length")) is not None:
        body, length = _Body.LENGTH, int(content_length)
    else:
        body, length = _Body.UNTIL_CLOSE, 0
    return _ParsedHead(
        head,
        parts.version,
        headers,
        body,
        length,
        status_code=parser.get_status_code(),
        reason=parts.reason.decode("latin-1"),
    )


def _is_chunked(transfer_encoding: str) -> bool:
    return transfer_encoding.rsplit(",", 1)[-1].strip().lower() == "chunked"


def _chunk_size(line: bytes | bytearray) -> int | None:
    digits = line.split(b";", 1)[0].strip(b" \t\r\n")
    return int(digits, 16) if _CHUNK_SIZE.fullmatch(digits) else None


class MessageStream:
    """Frames the messages of one direction; subclasses know requests or responses."""

    __slots__ = (
        "_sink",
        "_stats",
        "_state",
        "_buf",
        "_confirmed",
        "_message",
        "_remaining",
        "_until_close",
        "_count_body",
        "_syscall_ns",
        "_syscall_tid",
        "_syscall_goroutine",
        "_last_ns",
        "_start_ns",
        "_tid",
        "_goroutine",
        "_last_parsed",
        "_chunked",
    )

    def __init__(self, sink: StreamSink, stats: Stats) -> None:
        self._sink = sink
        self._stats = stats
        self._state = _State.IDLE
        self._buf = bytearray()  # the head, chunk-size line or trailers being read
        self._confirmed = False  # the head's first bytes look like a start line
        self._message: HttpMessage | None = None  # head parsed, body in progress
        self._remaining = 0  # bytes left in a Content-Length body, chunk or chunk CRLF
        self._until_close = False  # OPEN because the message says so, not lost framing
        self._count_body = True  # OPEN bytes are body (not when the head was cut)
        # the current syscall, and the one that moved the message's first byte
        self._syscall_ns = 0
        self._syscall_tid = 0
        self._syscall_goroutine = 0
        self._last_ns = 0
        self._start_ns = 0
        self._tid = 0
        self._goroutine = 0
        # The head this stream parsed last: kept-alive traffic repeats it byte
        # for byte, found again here with a comparison, where the parse cache
        # hashes the head and the start line is matched against a pattern.
        self._last_parsed: _ParsedHead | None = None
        self._chunked = False  # the message in progress has a chunked body

    def feed(
        self,
        payload: bytes,
        size: int,
        first_ns: int,
        last_ns: int,
        tid: int,
        goroutine: int = 0,
        tail: bool = False,
    ) -> None:
        """One syscall moved ``size`` bytes, of which ``payload`` are the first,
        or with ``tail`` the last (past its message's captured bytes).

        ``first_ns`` is when its first byte counts as moved (a read's return, a
        write's entry), ``last_ns`` when its last one does (the return).
        """
        if self._state == _State.STOPPED:
            return
        self._syscall_ns, self._syscall_tid, self._last_ns = first_ns, tid, last_ns
        self._syscall_goroutine = goroutine
        if self._message is not None:
            self._message.end_ns = last_ns
        if tail:
            self._run(None, size)  # counted, as bytes not captured are
            self._chunked_end(payload)
            return
        self._run(payload, len(payload))
        if size > len(payload):
            self._run(None, size - len(payload))

    def _chunked_end(self, tail: bytes) -> None:
        """A chunked body whose chunk sizes went uncaptured ends where a call's
        last bytes are the last chunk's: its data's CRLF, ``0``, CRLF and the
        CRLF of no trailers (or the call is that last chunk alone). Trailers
        leave it open until the other way starts a message, or the close."""
        if (
            self._state == _State.OPEN
            and self._chunked
            and (tail.endswith(b"\n0\r\n\r\n") or tail == b"0\r\n\r\n")
        ):
            self._end_message(_State.IDLE)

    def end_open_message(self) -> None:
        """The other direction started a message: an unframed message here ends."""
        message = self._message
        if self._state == _State.OPEN and message is not None:
            message.body_framing_lost = True
            self._end_message(_State.RESYNC)

    def close(self) -> None:
        """The connection closed: end the message in progress, then stop."""
        if self._state == _State.HEAD:
            self._cut_head()
        if self._message is not None:
            if not (self._state == _State.OPEN and self._until_close):
                self._message.body_framing_lost = True
            self._end_message(_State.STOPPED)
        self.stop()

    def stop(self) -> None:
        """Ignore every later byte: the connection no longer speaks HTTP/1."""
        self._state = _State.STOPPED
        self._message = None
        self._buf.clear()

    def detach(self) -> None:
        """Let go of the sink, for good: a connection and its streams hold each
        other, and once closed they are then freed at once, by reference
        counting, not left for the cyclic garbage collector to find."""
        self.stop()
        self._sink = _DETACHED

    # -- what requests and responses do differently

    def _looks_like_start(self, data: bytes | bytearray) -> bool | None:
        raise NotImplementedError

    def _read_head(self, head: bytes) -> tuple[HttpMessage, int, int]:
        """The message a head starts, how its body is framed (_Body), its length if fixed.

        Raises httptools.HttpParserError or ValueError.
        """
        raise NotImplementedError

    def _parse_head(self, head: bytes) -> _ParsedHead:
        """What ``head`` says, through the parse cache (`_parse_request` or `_parse_response`)."""
        raise NotImplementedError

    def _parsed(self, head: bytes) -> _ParsedHead:
        last = self._last_parsed
        if last is not None and head == last.head:
            return last
        parsed = self._parse_head(head)
        if len(head) <= HEAD_CACHE_MAX:  # one the parse cache keeps too; a longer one is not held
            self._last_parsed = parsed
        return parsed

    # -- the state machine: data is None for bytes moved but not captured

    def _run(self, data: bytes | None, end: int) -> None:
        pos = 0
        while pos < end:
            # a chain, not a table of methods: the compiled module calls each
            # step directly (and interpreted, the chain is as fast as a lookup)
            state = self._state
            if state == _State.IDLE:
                pos = self._idle(data, pos, end)
            elif state == _State.HEAD:
                pos = self._head(data, pos, end)
            elif state == _State.BODY or state == _State.CHUNK_DATA:
                pos = self._counted(data, pos, end)
            elif state == _State.CHUNK_LINE:
                pos = self._chunk_line(data, pos, end)
            elif state == _State.CHUNK_END:
                pos = self._chunk_end(data, pos, end)
            elif state == _State.TRAILERS:
                pos = self._trailers(data, pos, end)
            elif state == _State.OPEN:
                pos = self._open(data, pos, end)
            elif state == _State.RESYNC:
                pos = self._resync(data, pos, end)
            else:  # STOPPED
                pos = end

    def _idle(self, data: bytes | None, pos: int, end: int) -> int:
        if data is None:
            self._state = _State.RESYNC  # a message started in bytes we did not see
            return pos
        # RFC 9112 2.2: empty lines before a start line are ignored
        while pos < end and (data[pos] == _CR or data[pos] == _LF):  # `in b"\r\n"`: a call
            pos += 1
        if pos < end:
            self._start_ns, self._tid = self._syscall_ns, self._syscall_tid
            self._goroutine = self._syscall_goroutine
            self._confirmed = False
            self._state = _State.HEAD
            # The usual case: a head whole in this payload needs no buffering.
            # Anything else (a cut head, not a start line) goes the buffered way.
            cut = data.find(b"\r\n\r\n", pos, end)
            if cut >= 0:
                head = data[pos : cut + 4]
                last = self._last_parsed
                if (last is not None and head == last.head) or self._looks_like_start(head):
                    self._confirmed = True
                    self._sink.message_started(self)
                    self._start_message(head, truncated=False)
                    return cut + 4
        return pos

    def _head(self, data: bytes | None, pos: int, end: int) -> int:
        if data is None:
            self._cut_head()
            return pos
        scan_from = self._append(data, pos, end)
        if not self._confirmed:
            verdict = self._looks_like_start(self._buf)
            if verdict is None:
                return end
            if not verdict:
                self._fail()
                return end
            self._confirmed = True
            self._sink.message_started(self)
        cut = self._blank_line(scan_from)
        if cut < 0:
            if len(self._buf) > MAX_HEAD_SIZE:
                self._fail()
            return end
        next_pos = end - (len(self._buf) - cut)
        head = bytes(self._buf[:cut])
        self._buf.clear()
        self._start_message(head, truncated=False)
        return next_pos

    def _counted(self, data: bytes | None, pos: int, end: int) -> int:
        taken = min(self._remaining, end - pos)
        self._remaining -= taken
        if self._message is not None:
            self._message.body_size += taken
        if self._remaining == 0:
            if self._state == _State.BODY:
                self._end_message(_State.IDLE)
            else:
                self._state, self._remaining = _State.CHUNK_END, 2
        return pos + taken

    def _chunk_line(self, data: bytes | None, pos: int, end: int) -> int:
        if data is None:
            self._lose_framing(count_body=True)
            return pos
        newline = data.find(b"\n", pos, end)
        if newline < 0:
            self._buf += data[pos:end]
            if len(self._buf) > MAX_CHUNK_LINE:
                self._malformed()
            return end
        self._buf += data[pos : newline + 1]
        size = _chunk_size(self._buf)
        self._buf.clear()
        if size is None:
            self._malformed()
        elif size == 0:
            self._state = _State.TRAILERS
        else:
            self._state, self._remaining = _State.CHUNK_DATA, size
        return newline + 1

    def _chunk_end(self, data: bytes | None, pos: int, end: int) -> int:
        taken = min(self._remaining, end - pos)
        expected = b"\r\n"[2 - self._remaining :][:taken]
        if data is not None and data[pos : pos + taken] != expected:
            self._malformed()
            return pos
        self._remaining -= taken
        if self._remaining == 0:
            self._state = _State.CHUNK_LINE
        return pos + taken

    def _trailers(self, data: bytes | None, pos: int, end: int) -> int:
        if data is None:
            self._lose_framing(count_body=True)
            return pos
        cut = self._blank_line(self._append(data, pos, end))
        if cut < 0:
            if len(self._buf) > MAX_HEAD_SIZE:
                self._malformed()
            return end
        next_pos = end - (len(self._buf) - cut)
        self._buf.clear()
        self._end_message(_State.IDLE)
        return next_pos

    def _open(self, data: bytes | None, pos: int, end: int) -> int:
        if self._count_body and self._message is not None:
            self._message.body_size += end - pos
        return end

    def _resync(self, data: bytes | None, pos: int, end: int) -> int:
        # only a syscall's first bytes can be told apart from the middle of something
        if data is not None and pos == 0 and self._looks_like_start(data):
            self._state = _State.IDLE
            return pos
        return end

    # -- helpers

    def _append(self, data: bytes, pos: int, end: int) -> int:
        """Buffers data[pos:end]; returns where a blank line search resumes."""
        scan_from = max(0, len(self._buf) - 3)
        self._buf += data[pos:end]
        return scan_from

    def _blank_line(self, scan_from: int) -> int:
        """The buffer index just past the blank line ending a field section, or -1."""
        if self._buf.startswith(b"\r\n"):  # an empty section (no trailers)
            return 2
        found = self._buf.find(b"\r\n\r\n", scan_from)
        return found + 4 if found >= 0 else -1

    def _cut_head(self) -> None:
        """The head's end was not captured: parse its complete lines."""
        last_line_end = self._buf.rfind(b"\r\n")
        if not self._confirmed or last_line_end < 0:
            self._fail()
            return
        head = bytes(self._buf[: last_line_end + 2]) + b"\r\n"
        self._buf.clear()
        self._start_message(head, truncated=True)

    def _start_message(self, head: bytes, truncated: bool) -> None:
        try:
            message, body, length = self._read_head(head)
        except (httptools.HttpParserError, ValueError):
            self._fail()
            return
        message.head_truncated = truncated
        self._message, self._chunked = message, body == _Body.CHUNKED
        self._sink.head_parsed(message)
        if truncated:
            self._lose_framing(count_body=False)  # where the head ends is unknown
        elif body == _Body.LENGTH and length > 0:
            self._state, self._remaining = _State.BODY, length
        elif body == _Body.CHUNKED:
            self._state = _State.CHUNK_LINE
        elif body == _Body.UNTIL_CLOSE:
            self._state, self._until_close, self._count_body = _State.OPEN, True, True
        else:
            self._end_message(_State.IDLE)

    def _end_message(self, next_state: int) -> None:
        message = self._message
        self._message, self._chunked = None, False
        self._state = next_state  # before the sink runs: it may stop this stream
        if message is not None:
            self._sink.message_ended(message)

    def _lose_framing(self, count_body: bool) -> None:
        self._buf.clear()  # a cut chunk-size line or trailers must not prefix the next head
        if self._message is not None:
            self._message.body_framing_lost = True
        self._state, self._until_close, self._count_body = _State.OPEN, False, count_body

    def _malformed(self) -> None:
        """A body's framing is broken: keep the message, count the error."""
        self._stats["parse_errors"] += 1
        self._lose_framing(count_body=True)

    def _fail(self) -> None:
        """These bytes are not an HTTP message: count it, then wait to resync."""
        self._stats["parse_errors"] += 1
        self._buf.clear()
        self._message = None
        self._state = _State.RESYNC


class RequestStream(MessageStream):
    """The direction that carries requests."""

    __slots__ = ()

    def _looks_like_start(self, data: bytes | bytearray) -> bool | None:
        return looks_like_request(data)

    def _parse_head(self, head: bytes) -> _ParsedHead:
        return _parse_request(head)

    def _read_head(self, head: bytes) -> tuple[HttpRequest, int, int]:
        parsed = self._parsed(head)
        request = HttpRequest(
            version=parsed.version,
            headers=list(parsed.headers),
            start_ns=self._start_ns,
            end_ns=self._last_ns,
            tid=self._tid,
            goroutine=self._goroutine,
            method=parsed.method,
            target=parsed.target,
        )
        return request, parsed.body, parsed.length


class ResponseStream(MessageStream):
    """The direction that carries responses."""

    __slots__ = ()

    def _looks_like_start(self, data: bytes | bytearray) -> bool | None:
        return looks_like_response(data)

    def _parse_head(self, head: bytes) -> _ParsedHead:
        return _parse_response(head)

    def _read_head(self, head: bytes) -> tuple[HttpResponse, int, int]:
        parsed = self._parsed(head)
        response = HttpResponse(
            version=parsed.version,
            headers=list(parsed.headers),
            start_ns=self._start_ns,
            end_ns=self._last_ns,
            tid=self._tid,
            goroutine=self._goroutine,
            status_code=parsed.status_code,
            reason=parsed.reason,
        )
        method = self._sink.answered_method()
        status = parsed.status_code
        if method == "HEAD" or status < 200 or status in (204, 304):
            return response, _Body.NONE, 0
        if method == "CONNECT" and status < 300:
            return response, _Body.NONE, 0  # a tunnel follows, not a body
        return response, parsed.body, parsed.length
