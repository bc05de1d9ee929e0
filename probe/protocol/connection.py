"""One traced connection: its two message streams and the pairing between them.

`HttpConnection` routes each syscall's bytes to the stream of its direction,
infers the role of a connection picked up mid-stream, and pairs responses
with requests in order (HTTP/1.1 keep-alive and pipelining), attaching 1xx
responses to the request they precede. It emits an `HttpExchange` as soon as
a final response has ended, and flushes what is left when the connection
closes.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable
from typing import Final

from probe.kernel.events import DataEvent, Direction, Role
from probe.protocol.http1 import (
    MessageStream,
    RequestStream,
    ResponseStream,
    looks_like_request,
    looks_like_response,
)
from probe.protocol.model import (
    ConnectionInfo,
    HttpExchange,
    HttpMessage,
    HttpRequest,
    HttpResponse,
)
from probe.stats import Stats

MAX_PENDING: Final = 64  # requests awaiting a response, per connection
MAX_EARLY: Final = 8  # responses reported before their requests, per connection
# HttpRequest.sequence: the kernel's exchange number, shifted past the order of
# the requests within one exchange (pipelined requests share a number).
SEQUENCE_SHIFT: Final = 24


class _Pending:
    """A request, and what has answered it so far."""

    __slots__ = ("request", "informational")

    def __init__(self, request: HttpRequest) -> None:
        self.request = request
        self.informational: list[HttpResponse] = []


def _is_informational(response: HttpResponse) -> bool:
    # 101 is final: it ends the exchange, and HTTP/1 with it
    return response.status_code < 200 and response.status_code != 101


RequestStarted = Callable[[ConnectionInfo, HttpRequest], None]
"""Told of each request whose head is parsed, before its exchange can end."""


class HttpConnection:
    """Pairs the requests and responses of one connection."""

    __slots__ = (
        "info",
        "_emit",
        "_on_request",
        "_stats",
        "_max_pending",
        "_pending",
        "_reading",
        "_answering",
        "_requests",
        "_responses",
        "_request_direction",
        "_exchange",
        "_within",
        "_early_head",
        "_early",
    )

    def __init__(
        self,
        info: ConnectionInfo,
        emit: Callable[[HttpExchange], None],
        stats: Stats,
        max_pending: int = MAX_PENDING,
        on_request: RequestStarted | None = None,
    ) -> None:
        self.info = info
        self._emit = emit
        self._on_request = on_request
        self._stats = stats
        self._max_pending = max_pending
        self._pending: deque[_Pending] = deque()
        self._reading: _Pending | None = None  # its request's bytes are still arriving
        self._answering: _Pending | None = None  # its final response's bytes are arriving
        self._requests = RequestStream(self, stats)
        self._responses = ResponseStream(self, stats)
        self._request_direction: Direction | None = None
        # Numbering requests as both ends of the connection do (HttpRequest.sequence):
        self._exchange = 0  # the kernel's number of the latest request-way call
        self._within = 0  # requests numbered with it so far
        # Responses reported before their request: a program whose requests are
        # written by one thread and responses read by another (Go's writeLoop
        # and readLoop) can have the response's read return before the
        # request's write does, and events are reported in return order.
        self._early_head: HttpResponse | None = None
        self._early: deque[HttpResponse] = deque()
        if info.role != Role.UNKNOWN:
            self._set_role(info.role)

    def feed(self, event: DataEvent) -> None:
        """One syscall's bytes on this connection."""
        # (a call's last bytes tell nothing of where a message starts)
        if self._request_direction is None and (event.tail or not self._infer_role(event)):
            return
        # a blocked read's entry says nothing of when its bytes arrived
        ingress = event.direction == Direction.INGRESS
        first_ns = event.exit_ns if ingress else event.enter_ns
        stream = self._requests if event.direction == self._request_direction else self._responses
        if event.tls:
            self.info.tls = True
        if stream is self._requests and event.exchange != self._exchange:
            self._exchange, self._within = event.exchange, 0
        stream.feed(
            event.payload,
            event.size,
            first_ns,
            event.exit_ns,
            event.tid,
            event.goroutine,
            event.tail,
        )

    def close(self, reason: str) -> None:
        """The connection is gone: end what is in progress, emit what is waiting.

        ``reason`` becomes the error of requests that got no response.
        """
        self._requests.close()
        self._responses.close()
        if self._early:
            self._stats["parse_errors"] += len(self._early)  # responses to no request we saw
            self._early.clear()
        while self._pending:
            pending = self._pending.popleft()
            self._emit(
                HttpExchange(self.info, pending.request, None, pending.informational, error=reason)
            )
        self._requests.detach()
        self._responses.detach()

    # -- StreamSink: what the streams report

    def message_started(self, stream: MessageStream) -> None:
        # an unframed message in the other direction ends where this one starts
        other = self._responses if stream is self._requests else self._requests
        other.end_open_message()

    def head_parsed(self, message: HttpMessage) -> None:
        if isinstance(message, HttpRequest):
            message.sequence = self._exchange << SEQUENCE_SHIFT | self._within
            self._within += 1
            if len(self._pending) >= self._max_pending:
                self._stats["requests_dropped"] += 1
                self._reading = None
                return
            self._reading = _Pending(message)
            self._pending.append(self._reading)
            if self._on_request is not None:
                self._on_request(self.info, message)
            # A response read before this request was written answers an
            # older request we never saw (a connection picked up mid-stream).
            while self._early and self._early[0].start_ns < message.start_ns:
                self._early.popleft()
                self._stats["parse_errors"] += 1  # a response to no request we saw
            if self._early:  # its response was reported first
                self._stats["responses_before_requests"] += 1
                self._complete(self._pending.popleft(), self._early.popleft())
        elif isinstance(message, HttpResponse) and not _is_informational(message):
            if self._pending:
                self._answering = self._pending.popleft()
            else:
                self._early_head = message  # its request may still be reported

    def message_ended(self, message: HttpMessage) -> None:
        if isinstance(message, HttpRequest):
            if self._reading is not None and self._reading.request is message:
                self._reading = None
        elif isinstance(message, HttpResponse):
            self._response_ended(message)

    def _response_ended(self, response: HttpResponse) -> None:
        if _is_informational(response):
            if self._pending:
                self._pending[0].informational.append(response)
            else:
                self._stats["parse_errors"] += 1
            return
        pending, self._answering = self._answering, None
        if pending is not None:
            self._complete(pending, response)
        elif response is self._early_head:
            self._early_head = None
            if response.status_code == 101:  # HTTP ends here: no request can follow
                self._stats["parse_errors"] += 1  # a response to no request we saw
            else:
                self._keep_early(response)
        tunnel = pending is not None and pending.request.method == "CONNECT"
        if response.status_code == 101 or (tunnel and response.status_code < 300):
            self._requests.stop()  # what follows is another protocol
            self._responses.stop()

    def _keep_early(self, response: HttpResponse) -> None:
        """Hold a response until its request is reported, boundedly."""
        if len(self._early) >= MAX_EARLY:
            self._early.popleft()
            self._stats["parse_errors"] += 1  # a response to no request we saw
        self._early.append(response)

    def answered_method(self) -> str | None:
        return self._pending[0].request.method if self._pending else None

    # -- internals

    def _complete(self, pending: _Pending, response: HttpResponse) -> None:
        request = pending.request
        if pending is self._reading:
            # answered before fully sent: emit a copy, the stream still counts its body
            request = dataclasses.replace(request)
        self._emit(HttpExchange(self.info, request, response, pending.informational))

    def _infer_role(self, event: DataEvent) -> bool:
        """Learns the role of a connection that existed before the probe did."""
        if looks_like_response(event.payload):
            requests_read = event.direction == Direction.EGRESS
        elif looks_like_request(event.payload):
            requests_read = event.direction == Direction.INGRESS
        else:
            return False  # mid-message, or not HTTP: wait for a message start
        self.info.role = Role.SERVER if requests_read else Role.CLIENT
        self._set_role(self.info.role)
        return True

    def _set_role(self, role: Role) -> None:
        self._request_direction = Direction.INGRESS if role == Role.SERVER else Direction.EGRESS
