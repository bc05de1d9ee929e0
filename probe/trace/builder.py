"""Turns one `HttpExchange` into one `Span`, after OpenTelemetry's HTTP conventions.

The attributes follow the stable HTTP semantic conventions. What could carry
secrets is kept out by default: query values are redacted, no header is
captured unless allowlisted, and credential headers only with explicit consent.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection
from typing import Final
from urllib.parse import urlsplit

from probe.kernel.events import Endpoint, Role
from probe.protocol.model import ConnectionInfo, HttpExchange
from probe.trace.clock import MonotonicClock
from probe.trace.resource import ResourceDetector
from probe.trace.span import (
    UNSET_SPAN_ID,
    UNSET_TRACE_ID,
    Attributes,
    Span,
    SpanEvent,
    SpanKind,
    StatusCode,
)

KNOWN_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY"}
)
CREDENTIAL_HEADERS: Final = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie"}
)
REDACTED: Final = "REDACTED"
OTHER: Final = "_OTHER"  # the conventions' value for anything outside a known set
INFORMATIONAL_EVENT: Final = "http.informational_response"

_KINDS: Final = {Role.SERVER: SpanKind.SERVER, Role.CLIENT: SpanKind.CLIENT}
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
# error.type must stay low-cardinality: a short token is kept, free text is not.
_ERROR_TOKEN: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
# (address, port) attribute names, spelled out once rather than per span
_SERVER: Final = ("server.address", "server.port")
_CLIENT: Final = ("client.address", "client.port")
_NETWORK_PEER: Final = ("network.peer.address", "network.peer.port")
_NETWORK_LOCAL: Final = ("network.local.address", "network.local.port")
# Shared attributes of connections' first spans, by what they are made from
# (SpanBuilder._first_span_attributes); started over when full.
MAX_FIRST_SPAN_TEMPLATES = 4096


class SpanBuilder:
    """Builds spans for exchanges; one serves all connections."""

    __slots__ = (
        "_resources",
        "_clock",
        "_redact_query",
        "_capture_headers",
        "_first_spans",
    )

    def __init__(
        self,
        resources: ResourceDetector,
        clock: MonotonicClock,
        *,
        capture_credentials: bool = False,
        redact_query: bool = True,
        capture_headers: Collection[str] = (),
    ) -> None:
        self._resources = resources
        self._clock = clock
        self._redact_query = redact_query
        # (header name, its attribute name on the request, on the response)
        self._capture_headers = tuple(
            (name, f"http.request.header.{name}", f"http.response.header.{name}")
            for name in dict.fromkeys(h.lower() for h in capture_headers)
            if capture_credentials or name not in CREDENTIAL_HEADERS
        )
        self._first_spans: dict[tuple[object, ...], Attributes] = {}

    def build(self, exchange: HttpExchange) -> Span:
        """The exchange's span, without its ids: SpanLinker gives them."""
        request, response = exchange.request, exchange.response
        kind = _KINDS.get(exchange.connection.role, SpanKind.INTERNAL)
        method = request.method if request.method in KNOWN_METHODS else OTHER
        if response is not None:
            end_ns = response.end_ns
        else:  # the last thing seen of the exchange
            end_ns = max([request.end_ns, *[info.end_ns for info in exchange.informational]])

        conn = exchange.connection
        path, query, authority = _split_target(request.target)
        # What a connection's requests usually repeat: the server they name,
        # their HTTP version and user agent.
        repeated = (
            authority or request.header("host"),
            request.version,
            request.header("user-agent"),
        )
        template = _template(conn, kind, repeated)
        if template is None:  # the connection's first span
            attributes, shared = self._first_span_attributes(conn, kind, repeated)
        else:
            attributes, shared = {}, template.attributes
            if template.repeated is None:
                _add_repeated_attributes(attributes, conn, kind, repeated)
        self._add_attributes(attributes, exchange, kind, method, path, query, repeated[0])
        span = Span(  # positional where it can: keywords cost on every span
            method if method != OTHER else "HTTP",
            kind,
            self._clock.to_unix_ns(request.start_ns),
            self._clock.to_unix_ns(end_ns),
            self._resources.detect(exchange.connection.key.pid, "", exchange.connection.image),
            UNSET_TRACE_ID,  # the linker's to give: drawing ids here would be wasted
            UNSET_SPAN_ID,
            attributes=attributes,
            events=[
                SpanEvent(
                    INFORMATIONAL_EVENT,
                    self._clock.to_unix_ns(info.start_ns),
                    {"http.response.status_code": info.status_code},
                )
                for info in exchange.informational
            ]
            if exchange.informational
            else [],
            shared_attributes=shared,
        )
        if (error_type := _error_type(exchange, kind)) is not None:
            span.status_code = StatusCode.ERROR
            span.status_message = exchange.error or ""
            span.attributes["error.type"] = error_type
        return span

    def _first_span_attributes(
        self, conn: ConnectionInfo, kind: SpanKind, repeated: _Repeated
    ) -> tuple[Attributes, Attributes | None]:
        """A connection's first span's (own, shared) attributes of its connection
        and `_Repeated` values. Its own are its client's end (a server's peer, a
        client's ephemeral port); the rest it shares with the first spans of the
        other connections to its server end, which a new connection per request
        makes by the thousand: built and encoded once, not per span."""
        peer, local = conn.peer, conn.local
        key: tuple[object, ...]
        if kind is SpanKind.SERVER:
            key = (kind, conn.tls, local, repeated)
        elif kind is SpanKind.CLIENT:
            key = (kind, conn.tls, local.address if local is not None else None, peer, repeated)
        else:  # a connection whose role is not known: rare, all its own
            attributes = _connection_attributes(conn, kind)
            _add_repeated_attributes(attributes, conn, kind, repeated)
            return attributes, None
        own: Attributes = {}
        if kind is SpanKind.SERVER:
            _set_address(own, _CLIENT, None, None, peer)
            _set_address(own, _NETWORK_PEER, None, None, peer)
        elif local is not None and local.port:
            own[_NETWORK_LOCAL[1]] = local.port
        shared = self._first_spans.get(key)
        if shared is None:
            shared = _connection_attributes(conn, kind)
            _add_repeated_attributes(shared, conn, kind, repeated)
            for name in own:
                del shared[name]
            if len(self._first_spans) >= MAX_FIRST_SPAN_TEMPLATES:
                self._first_spans.clear()
            self._first_spans[key] = shared
        return own, shared

    def _add_attributes(
        self,
        attrs: Attributes,
        exchange: HttpExchange,
        kind: SpanKind,
        method: str,
        path: str | None,
        query: str,
        authority: str | None,
    ) -> None:
        """This exchange's own attributes, beside its connection's and those
        its requests repeat (`_add_repeated_attributes`). ``authority`` is the
        server the request names: its target's authority, else its Host."""
        conn, request, response = exchange.connection, exchange.request, exchange.response
        attrs["http.request.method"] = method
        if method == OTHER:
            attrs["http.request.method_original"] = request.method

        if query and self._redact_query:
            query = _redact(query)
        if path is not None:
            attrs["url.path"] = path
        if query:
            attrs["url.query"] = query
        if kind is SpanKind.CLIENT and path is not None:
            host, port = _split_authority(authority)
            if not host and conn.peer is not None:
                host, port = conn.peer.address, conn.peer.port
            if host:
                scheme = _scheme(conn)
                attrs["url.full"] = f"{scheme}://{_origin(scheme, host, port)}{path}" + (
                    f"?{query}" if query else ""
                )

        if response is not None:
            attrs["http.response.status_code"] = response.status_code
        if request.body_size:
            attrs["http.request.body.size"] = request.body_size
        for name, request_attribute, _ in self._capture_headers:
            if values := [value for key, value in request.headers if key == name]:
                attrs[request_attribute] = values
        if response is not None:
            if response.body_size:
                attrs["http.response.body.size"] = response.body_size
            for name, _, response_attribute in self._capture_headers:
                if values := [value for key, value in response.headers if key == name]:
                    attrs[response_attribute] = values
        if request.head_truncated or (response is not None and response.head_truncated):
            attrs["probe.http.head_truncated"] = True
        if request.body_framing_lost or (response is not None and response.body_framing_lost):
            attrs["probe.http.body_framing_lost"] = True
        attrs["thread.id"] = request.tid


# (authority, HTTP version, user agent) of a request: its attributes that a
# connection's requests usually repeat (_add_repeated_attributes).
_Repeated = tuple[str | None, str, str | None]


class _SpanTemplate:
    """What the spans of one connection share (`Span.shared_attributes`), and
    what it was made from: a connection's role and TLS are learnt before its
    first exchange ends, and are checked in case they were not; ``repeated``
    is the request values its attributes include, None once they were seen
    to vary on the connection (its attributes are then the connection's alone)."""

    __slots__ = ("role", "tls", "repeated", "attributes")

    def __init__(
        self, role: Role, tls: bool, repeated: _Repeated | None, attributes: Attributes
    ) -> None:
        self.role = role
        self.tls = tls
        self.repeated = repeated
        self.attributes = attributes


# ConnectionInfo.span_template once the connection's first span is built.
_FIRST_SPAN_BUILT: Final = "first span built"


def _template(conn: ConnectionInfo, kind: SpanKind, repeated: _Repeated) -> _SpanTemplate | None:
    """The template of the connection's spans, from its second span on; None
    for its first, which shares with the first spans of like connections
    instead (`SpanBuilder._first_span_attributes`). A connection that carries
    a single exchange (a new connection per request) would pay for a template
    it never reuses, and one whose requests vary in what they usually repeat,
    for a template per request: it shares its connection's attributes alone
    from then on."""
    template = conn.span_template
    shared: _Repeated | None = repeated
    if isinstance(template, _SpanTemplate):
        if template.role == conn.role and template.tls == conn.tls:
            if template.repeated is None or template.repeated == repeated:
                return template
            shared = None  # they vary: the connection's attributes alone from now on
        elif template.repeated is None:  # role or TLS learnt late: made again, as it was
            shared = None
    elif template is None:
        conn.span_template = _FIRST_SPAN_BUILT
        return None
    attributes = _connection_attributes(conn, kind)
    if shared is not None:
        _add_repeated_attributes(attributes, conn, kind, shared)
    template = _SpanTemplate(conn.role, conn.tls, shared, attributes)
    conn.span_template = template
    return template


def _add_repeated_attributes(
    attrs: Attributes, conn: ConnectionInfo, kind: SpanKind, repeated: _Repeated
) -> None:
    """The attributes of a request's `_Repeated` values."""
    authority, version, user_agent = repeated
    # The server is named as the client asked for it (Host, or the
    # proxy-style absolute target); the socket's own end fills the gaps.
    if kind is not SpanKind.INTERNAL:
        host, port = _split_authority(authority)
        _set_address(
            attrs, _SERVER, host, port, conn.peer if kind is SpanKind.CLIENT else conn.local
        )
    attrs["network.protocol.version"] = version
    if user_agent:
        attrs["user_agent.original"] = user_agent


def _connection_attributes(conn: ConnectionInfo, kind: SpanKind) -> Attributes:
    """The attributes that depend on the connection alone."""
    attrs: Attributes = {"url.scheme": _scheme(conn)}
    if kind is SpanKind.SERVER:
        _set_address(attrs, _CLIENT, None, None, conn.peer)
    attrs["network.protocol.name"] = "http"
    _set_address(attrs, _NETWORK_PEER, None, None, conn.peer)
    _set_address(attrs, _NETWORK_LOCAL, None, None, conn.local)
    return attrs


def _scheme(conn: ConnectionInfo) -> str:
    return "https" if conn.tls else "http"  # plaintext read at a TLS library


def _error_type(exchange: HttpExchange, kind: SpanKind) -> str | None:
    """The span's ``error.type``, or None when the exchange did not fail.

    A server failed on 5xx only (4xx is the client's fault); a client on 4xx too.
    """
    response = exchange.response
    if response is None:
        error = exchange.error or ""
        return error if _ERROR_TOKEN.fullmatch(error) else OTHER
    if response.status_code >= 500 or (response.status_code >= 400 and kind is SpanKind.CLIENT):
        return str(response.status_code)
    return None


def _split_target(target: str) -> tuple[str | None, str, str | None]:
    """(path, query, authority) of a request-target.

    Origin form ("/a?b") has a path; absolute form ("http://h/a?b", sent to
    proxies) also names the authority; authority form (CONNECT's "h:443")
    and asterisk form ("*") have no path.
    """
    if target.startswith("/"):
        path, _, query = target.partition("?")
        return path, query, None
    if "://" in target:
        url = urlsplit(target)
        return url.path or "/", url.query, url.netloc.rpartition("@")[2] or None
    return None, "", None


@functools.lru_cache(maxsize=256)  # a connection names the same host in every request
def _split_authority(authority: str | None) -> tuple[str | None, int | None]:
    """Host and explicit port of a Host header value; userinfo is dropped."""
    if not authority:
        return None, None
    authority = authority.rpartition("@")[2]
    if authority.startswith("["):  # IPv6 literal: "[::1]:8080"
        host, _, rest = authority[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = authority.partition(":")
    # isdigit alone would let "²" through to int().
    return host or None, int(port) if port.isascii() and port.isdigit() else None


def _redact(query: str) -> str:
    """Keeps the keys, hides every value: "a=1&b" becomes "a=REDACTED&b"."""
    return "&".join(
        f"{key}={REDACTED}" if sep else key
        for key, sep, _ in (pair.partition("=") for pair in query.split("&"))
    )


def _origin(scheme: str, host: str, port: int | None) -> str:
    """``host[:port]`` as a URL writes it: IPv6 in brackets, the default port implied."""
    if ":" in host:
        host = f"[{host}]"
    return host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"


def _set_address(
    attrs: Attributes,
    names: tuple[str, str],
    address: str | None,
    port: int | None,
    endpoint: Endpoint | None,
) -> None:
    """Sets the ``names`` (address, port) attributes, falling back to ``endpoint``'s."""
    if endpoint is not None:
        address = address or endpoint.address
        port = port or endpoint.port
    if address:
        attrs[names[0]] = address
    if port:
        attrs[names[1]] = port
