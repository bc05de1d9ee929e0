"""What the protocol stage hands to the trace stage: parsed HTTP exchanges.

Times are on the kernel's monotonic clock (nanoseconds); the trace stage
converts them to Unix time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from probe.kernel.events import ConnKey, Endpoint, Role


@dataclass(slots=True, init=False)
class ConnectionInfo:
    key: ConnKey
    role: Role  # CLIENT or SERVER once known; UNKNOWN only if never inferred
    local: Endpoint | None
    peer: Endpoint | None
    tls: bool = False  # the HTTP was read at a TLS library: url.scheme is https
    # Which image of its process it belongs to (ConnOpen.image); None: the one
    # running now (a connection picked up mid-stream).
    image: int | None = None
    # The trace stage's, kept here to live as long as the connection: what
    # SpanBuilder made once for every span of it. Never read by this stage.
    span_template: object | None = field(default=None, init=False, compare=False, repr=False)

    def __init__(  # written out for mypyc (probe/compiled.py), like HttpMessage's
        self,
        key: ConnKey,
        role: Role,
        local: Endpoint | None,
        peer: Endpoint | None,
        tls: bool = False,
        image: int | None = None,
    ) -> None:
        self.key = key
        self.role = role
        self.local = local
        self.peer = peer
        self.tls = tls
        self.image = image
        self.span_template = None


@dataclass(slots=True, init=False)
class HttpMessage:
    version: str  # "1.0" or "1.1"
    headers: list[tuple[str, str]]  # names lower-cased, in order, as captured
    start_ns: int  # first byte: read's return (ingress) or write's entry (egress)
    end_ns: int  # last byte: return of the syscall that moved it
    tid: int  # thread that moved the first byte
    body_size: int = 0  # body bytes, counted from syscall return values
    head_truncated: bool = False  # the head was longer than what was captured
    body_framing_lost: bool = False  # the end was inferred, not framed by the parser
    goroutine: int = 0  # Go: the goroutine of the first byte; 0 elsewhere

    def __init__(  # written out for mypyc (probe/compiled.py), like its subclasses'
        self,
        version: str,
        headers: list[tuple[str, str]],
        start_ns: int,
        end_ns: int,
        tid: int,
        body_size: int = 0,
        head_truncated: bool = False,
        body_framing_lost: bool = False,
        goroutine: int = 0,
    ) -> None:
        self.version = version
        self.headers = headers
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.tid = tid
        self.body_size = body_size
        self.head_truncated = head_truncated
        self.body_framing_lost = body_framing_lost
        self.goroutine = goroutine

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (lower-case), if captured."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(slots=True, init=False)
class HttpRequest(HttpMessage):
    method: str = ""  # as sent, e.g. "GET"
    target: str = ""  # request-target as sent, e.g. "/a/b?x=1"
    # Its place on its connection, as the other end numbers it too: the kernel's
    # exchange number (DataEvent.exchange, counting shed exchanges) shifted left
    # by connection.SEQUENCE_SHIFT, plus its order among that exchange's requests
    # (pipelined). Without the kernel's numbers, 0, 1, 2... in order.
    sequence: int = 0

    def __init__(
        self,
        version: str,
        headers: list[tuple[str, str]],
        start_ns: int,
        end_ns: int,
        tid: int,
        body_size: int = 0,
        head_truncated: bool = False,
        body_framing_lost: bool = False,
        goroutine: int = 0,
        method: str = "",
        target: str = "",
        sequence: int = 0,
    ) -> None:
        # super() with its arguments: slots=True makes a new class, which the
        # argument-less form's cell does not know.
        super(HttpRequest, self).__init__(
            version, headers, start_ns, end_ns, tid,
            body_size, head_truncated, body_framing_lost, goroutine,
        )  # fmt: skip
        self.method = method
        self.target = target
        self.sequence = sequence


@dataclass(slots=True, init=False)
class HttpResponse(HttpMessage):
    status_code: int = 0
    reason: str = ""

    def __init__(
        self,
        version: str,
        headers: list[tuple[str, str]],
        start_ns: int,
        end_ns: int,
        tid: int,
        body_size: int = 0,
        head_truncated: bool = False,
        body_framing_lost: bool = False,
        goroutine: int = 0,
        status_code: int = 0,
        reason: str = "",
    ) -> None:
        # super() with its arguments: see HttpRequest.
        super(HttpResponse, self).__init__(
            version, headers, start_ns, end_ns, tid,
            body_size, head_truncated, body_framing_lost, goroutine,
        )  # fmt: skip
        self.status_code = status_code
        self.reason = reason


@dataclass(slots=True, init=False)
class HttpExchange:
    """One request and what answered it, on one connection."""

    connection: ConnectionInfo
    request: HttpRequest
    response: HttpResponse | None  # None: the connection ended first
    informational: list[HttpResponse] = field(default_factory=list)  # 1xx before it
    error: str | None = None  # why there is no response, when there is none

    def __init__(  # written out for mypyc (probe/compiled.py)
        self,
        connection: ConnectionInfo,
        request: HttpRequest,
        response: HttpResponse | None,
        informational: list[HttpResponse] | None = None,
        error: str | None = None,
    ) -> None:
        self.connection = connection
        self.request = request
        self.response = response
        self.informational = [] if informational is None else informational
        self.error = error
