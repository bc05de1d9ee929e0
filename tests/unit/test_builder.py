"""SpanBuilder and MonotonicClock: exact spans for representative HTTP exchanges."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probe.export.jsonl import span_to_dict
from probe.kernel.events import ConnKey, Endpoint, Role
from probe.protocol.model import ConnectionInfo, HttpExchange, HttpRequest, HttpResponse
from probe.trace import builder as builder_module
from probe.trace import clock
from probe.trace.builder import SpanBuilder
from probe.trace.clock import MonotonicClock
from probe.trace.resource import ResourceDetector
from probe.trace.span import UNSET_SPAN_ID, UNSET_TRACE_ID, SpanEvent, SpanKind, StatusCode

OFFSET = 1_700_000_000_000_000_000
PID, TID = 4242, 4243
SERVER_LOCAL = Endpoint("10.0.0.1", 8080)
SERVER_PEER = Endpoint("10.0.0.2", 51000)
CLIENT_LOCAL = Endpoint("10.0.0.2", 51000)
CLIENT_PEER = Endpoint("93.184.216.34", 80)


def exchange(
    role: Role = Role.SERVER,
    method: str = "GET",
    target: str = "/",
    headers: list[tuple[str, str]] | None = None,
    status: int | None = 200,
    response_headers: list[tuple[str, str]] | None = None,
    *,
    local: Endpoint | None = None,
    peer: Endpoint | None = None,
    request_body: int = 0,
    response_body: int = 0,
    informational: list[HttpResponse] | None = None,
    error: str | None = None,
) -> HttpExchange:
    """An exchange whose request runs 1000-1100 ns and response 5000-6000 ns."""
    if local is None:
        local = SERVER_LOCAL if role is Role.SERVER else CLIENT_LOCAL
    if peer is None:
        peer = SERVER_PEER if role is Role.SERVER else CLIENT_PEER
    request = HttpRequest(
        version="1.1",
        headers=[("host", "shop.example")] if headers is None else headers,
        start_ns=1000,
        end_ns=1100,
        tid=TID,
        body_size=request_body,
        method=method,
        target=target,
    )
    response = None
    if status is not None:
        response = HttpResponse(
            version="1.1",
            headers=response_headers or [],
            start_ns=5000,
            end_ns=6000,
            tid=TID,
            body_size=response_body,
            status_code=status,
            reason="",
        )
    return HttpExchange(
        connection=ConnectionInfo(ConnKey(PID, 7, 1), role, local, peer),
        request=request,
        response=response,
        informational=informational or [],
        error=error,
    )


@pytest.fixture
def resources(tmp_path) -> ResourceDetector:
    # An empty /proc: every pid reads as an exited process.
    return ResourceDetector(tmp_path, hostname="testhost")


@pytest.fixture
def builder(resources) -> SpanBuilder:
    return SpanBuilder(resources, MonotonicClock(offset_ns=OFFSET))


def test_server_get_with_query(builder):
    span = builder.build(
        exchange(
            target="/items/42?color=red&size=&flag",
            headers=[("host", "shop.example:8443"), ("user-agent", "curl/8.5.0")],
            response_body=512,
        )
    )

    assert span.name == "GET"
    assert span.kind is SpanKind.SERVER
    assert span.start_time_unix_nano == OFFSET + 1000
    assert span.end_time_unix_nano == OFFSET + 6000
    assert span.status_code is StatusCode.UNSET
    assert span.status_message == ""
    assert span.parent_span_id is None
    assert (span.trace_id, span.span_id) == (UNSET_TRACE_ID, UNSET_SPAN_ID)  # the linker's
    assert span.events == [] and span.links == []
    assert span.resource.attributes == {
        "service.name": "unknown_service",
        "host.name": "testhost",
        "process.pid": PID,
    }
    assert span.all_attributes() == {
        "http.request.method": "GET",
        "url.path": "/items/42",
        "url.query": "color=REDACTED&size=REDACTED&flag",
        "url.scheme": "http",
        "server.address": "shop.example",
        "server.port": 8443,
        "client.address": "10.0.0.2",
        "client.port": 51000,
        "http.response.status_code": 200,
        "network.protocol.name": "http",
        "network.protocol.version": "1.1",
        "network.peer.address": "10.0.0.2",
        "network.peer.port": 51000,
        "network.local.address": "10.0.0.1",
        "network.local.port": 8080,
        "user_agent.original": "curl/8.5.0",
        "http.response.body.size": 512,
        "thread.id": TID,
    }


def test_server_without_host_header_uses_local_endpoint(builder):
    span = builder.build(exchange(target="/", headers=[]))

    assert span.all_attributes()["server.address"] == "10.0.0.1"
    assert span.all_attributes()["server.port"] == 8080


def test_server_host_without_port_takes_local_port(builder):
    span = builder.build(exchange(headers=[("host", "shop.example")]))

    assert span.all_attributes()["server.address"] == "shop.example"
    assert span.all_attributes()["server.port"] == 8080


@pytest.mark.parametrize("host", ["shop.example:", "shop.example:8o", "shop.example:\u00b2"])
def test_server_host_with_bad_port_takes_local_port(builder, host):
    span = builder.build(exchange(headers=[("host", host)]))

    assert span.all_attributes()["server.address"] == "shop.example"
    assert span.all_attributes()["server.port"] == 8080


def test_server_ipv6_host_header(builder):
    span = builder.build(exchange(headers=[("host", "[2001:db8::5]:9000")]))

    assert span.all_attributes()["server.address"] == "2001:db8::5"
    assert span.all_attributes()["server.port"] == 9000


def test_query_kept_raw_when_not_redacted(resources):
    builder = SpanBuilder(resources, MonotonicClock(offset_ns=0), redact_query=False)

    span = builder.build(exchange(target="/search?q=kittens&page=2"))

    assert span.all_attributes()["url.query"] == "q=kittens&page=2"


def test_empty_query_is_absent(builder):
    span = builder.build(exchange(target="/search?"))

    assert span.all_attributes()["url.path"] == "/search"
    assert "url.query" not in span.all_attributes()


def test_client_post(builder):
    span = builder.build(
        exchange(
            Role.CLIENT,
            "POST",
            "/v1/orders?token=s3cret",
            headers=[
                ("host", "api.example"),
                ("user-agent", "python-requests/2.31"),
                ("content-type", "application/json"),
            ],
            status=201,
            request_body=27,
            response_body=64,
        )
    )

    assert span.name == "POST"
    assert span.kind is SpanKind.CLIENT
    assert span.status_code is StatusCode.UNSET
    assert span.all_attributes() == {
        "http.request.method": "POST",
        "url.path": "/v1/orders",
        "url.query": "token=REDACTED",
        "url.scheme": "http",
        "server.address": "api.example",
        "server.port": 80,
        "url.full": "http://api.example/v1/orders?token=REDACTED",
        "http.response.status_code": 201,
        "network.protocol.name": "http",
        "network.protocol.version": "1.1",
        "network.peer.address": "93.184.216.34",
        "network.peer.port": 80,
        "network.local.address": "10.0.0.2",
        "network.local.port": 51000,
        "user_agent.original": "python-requests/2.31",
        "http.request.body.size": 27,
        "http.response.body.size": 64,
        "thread.id": TID,
    }


def test_client_url_full_from_host_with_port(builder):
    span = builder.build(exchange(Role.CLIENT, target="/x", headers=[("host", "api.example:8080")]))

    assert span.all_attributes()["url.full"] == "http://api.example:8080/x"
    assert span.all_attributes()["server.address"] == "api.example"
    assert span.all_attributes()["server.port"] == 8080


def test_client_url_full_from_ipv6_peer_without_host(builder):
    span = builder.build(
        exchange(Role.CLIENT, target="/x", headers=[], peer=Endpoint("2001:db8::1", 8080))
    )

    assert span.all_attributes()["url.full"] == "http://[2001:db8::1]:8080/x"
    assert span.all_attributes()["server.address"] == "2001:db8::1"
    assert span.all_attributes()["server.port"] == 8080


def test_client_url_full_never_has_userinfo(builder):
    span = builder.build(
        exchange(
            Role.CLIENT,
            target="http://user:pw@proxied.example:8000/p?k=v",
            headers=[("host", "user:pw@proxied.example:8000")],
            peer=Endpoint("10.9.9.9", 3128),
        )
    )

    assert span.all_attributes()["url.full"] == "http://proxied.example:8000/p?k=REDACTED"
    assert span.all_attributes()["url.path"] == "/p"
    assert span.all_attributes()["server.address"] == "proxied.example"
    assert span.all_attributes()["server.port"] == 8000
    assert "pw" not in json.dumps(span_to_dict(span))


@pytest.mark.parametrize("method", ["PROPFIND", "get", "BREW"])
def test_unknown_method(builder, method):
    span = builder.build(exchange(method=method, target="/pot"))

    assert span.name == "HTTP"
    assert span.all_attributes()["http.request.method"] == "_OTHER"
    assert span.all_attributes()["http.request.method_original"] == method


def test_known_method_has_no_original(builder):
    span = builder.build(exchange(method="QUERY"))

    assert span.name == "QUERY"
    assert "http.request.method_original" not in span.all_attributes()


def test_head_has_no_body_sizes(builder):
    span = builder.build(exchange(method="HEAD", target="/big"))

    assert span.name == "HEAD"
    assert "http.request.body.size" not in span.all_attributes()
    assert "http.response.body.size" not in span.all_attributes()
    assert span.all_attributes()["http.response.status_code"] == 200


def test_connect_has_no_path(builder):
    span = builder.build(
        exchange(Role.CLIENT, "CONNECT", "db.example:443", headers=[("host", "db.example:443")])
    )

    assert "url.path" not in span.all_attributes()
    assert "url.full" not in span.all_attributes()
    assert span.all_attributes()["server.address"] == "db.example"
    assert span.all_attributes()["server.port"] == 443


@pytest.mark.parametrize("role", [Role.SERVER, Role.CLIENT])
def test_no_response(builder, role):
    span = builder.build(exchange(role, status=None, error="connection_closed"))

    assert span.status_code is StatusCode.ERROR
    assert span.status_message == "connection_closed"
    assert span.all_attributes()["error.type"] == "connection_closed"
    assert "http.response.status_code" not in span.all_attributes()
    assert span.end_time_unix_nano == OFFSET + 1100


def test_no_response_free_text_error_is_other(builder):
    span = builder.build(exchange(status=None, error="peer reset after 512 bytes"))

    assert span.status_message == "peer reset after 512 bytes"
    assert span.all_attributes()["error.type"] == "_OTHER"


@pytest.mark.parametrize(("informational_end", "end"), [(3500, 3500), (1050, 1100)])
def test_no_response_ends_at_last_thing_seen(builder, informational_end, end):
    # 100-continue may come before the request body has all been sent.
    informational = HttpResponse("1.1", [], 1040, informational_end, TID, status_code=100)

    span = builder.build(exchange(status=None, informational=[informational]))

    assert span.end_time_unix_nano == OFFSET + end
    assert span.all_attributes()["error.type"] == "_OTHER"


@pytest.mark.parametrize(
    ("role", "status", "expected"),
    [
        (Role.SERVER, 404, None),
        (Role.CLIENT, 404, "404"),
        (Role.SERVER, 503, "503"),
        (Role.CLIENT, 503, "503"),
        (Role.CLIENT, 302, None),
    ],
)
def test_error_status(builder, role, status, expected):
    span = builder.build(exchange(role, status=status))

    assert span.all_attributes().get("error.type") == expected
    assert span.status_code is (StatusCode.UNSET if expected is None else StatusCode.ERROR)
    assert span.status_message == ""


def test_informational_responses_become_events(builder):
    informational = [
        HttpResponse("1.1", [], 2000, 2100, TID, status_code=100),
        HttpResponse("1.1", [], 3000, 3100, TID, status_code=103),
    ]

    span = builder.build(exchange(method="PUT", informational=informational))

    assert span.events == [
        SpanEvent("http.informational_response", OFFSET + 2000, {"http.response.status_code": 100}),
        SpanEvent("http.informational_response", OFFSET + 3000, {"http.response.status_code": 103}),
    ]
    assert span.all_attributes()["http.response.status_code"] == 200


CREDENTIALS = [
    ("authorization", "Bearer tok-AAAA"),
    ("proxy-authorization", "Basic cHJveHk6cHc="),
    ("cookie", "session=ck-BBBB"),
]


def test_credentials_never_captured_by_default(resources):
    builder = SpanBuilder(
        resources,
        MonotonicClock(offset_ns=0),
        capture_headers=["Authorization", "cookie", "set-cookie", "proxy-authorization"],
    )

    span = builder.build(
        exchange(
            headers=[("host", "shop.example"), *CREDENTIALS],
            response_headers=[("set-cookie", "session=sc-CCCC")],
        )
    )

    dumped = json.dumps(span_to_dict(span))
    for secret in ("tok-AAAA", "cHJveHk6cHc=", "ck-BBBB", "sc-CCCC"):
        assert secret not in dumped
    assert not [key for key in span.all_attributes() if ".header." in key]


def test_credentials_captured_when_allowed(resources):
    builder = SpanBuilder(
        resources,
        MonotonicClock(offset_ns=0),
        capture_credentials=True,
        capture_headers=["authorization", "set-cookie"],
    )

    span = builder.build(
        exchange(
            headers=[("host", "shop.example"), *CREDENTIALS],
            response_headers=[("set-cookie", "a=1"), ("set-cookie", "b=2")],
        )
    )

    assert span.all_attributes()["http.request.header.authorization"] == ["Bearer tok-AAAA"]
    assert span.all_attributes()["http.response.header.set-cookie"] == ["a=1", "b=2"]
    assert "http.request.header.cookie" not in span.all_attributes()


def test_header_allowlist(resources):
    builder = SpanBuilder(
        resources, MonotonicClock(offset_ns=0), capture_headers=["Content-Type", "x-request-id"]
    )

    span = builder.build(
        exchange(
            method="POST",
            headers=[
                ("host", "shop.example"),
                ("content-type", "text/plain"),
                ("x-request-id", "r1"),
                ("x-request-id", "r2"),
                ("accept", "*/*"),
            ],
            response_headers=[("content-type", "application/json"), ("server", "nginx")],
        )
    )

    headers = {key: value for key, value in span.all_attributes().items() if ".header." in key}
    assert headers == {
        "http.request.header.content-type": ["text/plain"],
        "http.request.header.x-request-id": ["r1", "r2"],
        "http.response.header.content-type": ["application/json"],
    }


def test_truncation_flags(builder):
    ex = exchange()
    ex.request.head_truncated = True
    assert ex.response is not None
    ex.response.body_framing_lost = True

    span = builder.build(ex)

    assert span.all_attributes()["probe.http.head_truncated"] is True
    assert span.all_attributes()["probe.http.body_framing_lost"] is True


def test_no_truncation_flags_by_default(builder):
    span = builder.build(exchange())

    assert "probe.http.head_truncated" not in span.all_attributes()
    assert "probe.http.body_framing_lost" not in span.all_attributes()


def test_unknown_role_is_internal_without_server_or_client(builder):
    span = builder.build(exchange(Role.UNKNOWN, status=500))

    assert span.kind is SpanKind.INTERNAL
    assert span.status_code is StatusCode.ERROR
    named = ("server.", "client.", "url.f")
    assert not [key for key in span.all_attributes() if key.startswith(named)]


def test_clock_applies_offset():
    assert MonotonicClock(offset_ns=250).to_unix_ns(1_000) == 1_250


def test_clock_offset_uses_tightest_sample(monkeypatch):
    # Wall-clock pairs around each monotonic reading: widths 40, 10, 30.
    wall = iter([1_000, 1_040, 2_000, 2_010, 3_000, 3_030])
    mono = iter([100, 200, 300])
    monkeypatch.setattr(clock.time, "time_ns", lambda: next(wall))
    monkeypatch.setattr(clock.time, "monotonic_ns", lambda: next(mono))

    assert clock.measure_offset_ns(samples=3) == 2_005 - 200


@settings(max_examples=200, deadline=None)
@given(
    role=st.sampled_from(Role),
    method=st.text(max_size=10),
    target=st.text(max_size=40),
    host=st.text(max_size=30),
)
def test_any_request_line_builds_and_hides_query_values(role, method, target, host):
    builder = SpanBuilder(ResourceDetector("/nonexistent", hostname="h"), MonotonicClock(0))

    span = builder.build(exchange(role, method, target, headers=[("host", host)]))

    query = str(span.all_attributes().get("url.query", ""))
    for pair in filter(None, query.split("&")):
        key, sep, value = pair.partition("=")
        assert value == ("REDACTED" if sep else "")
    assert span.all_attributes().get("url.full", "http://").startswith("http://")


@pytest.mark.parametrize("role", [Role.SERVER, Role.CLIENT])
def test_spans_of_one_connection_share_its_attributes_from_the_second_on(builder, role):
    first = exchange(role, target="/a")
    connection = first.connection
    later = [exchange(role, target=f"/{n}") for n in range(2)]
    for each in later:
        each.connection = connection
    spans = [builder.build(each) for each in (first, *later)]

    # The first span shares with like connections' first spans (below), not
    # with its own connection: one that carries one exchange makes no template.
    shared = spans[1].shared_attributes
    assert shared and spans[2].shared_attributes is shared  # one dict, for exporters to reuse
    assert spans[0].shared_attributes is not shared
    assert "url.scheme" in shared and "network.peer.port" in shared
    assert not shared.keys() & spans[1].attributes.keys()  # disjoint, as Span says
    for n, span in enumerate(spans):
        assert span.all_attributes().keys() == spans[0].all_attributes().keys()
        assert span.all_attributes()["url.path"] == ["/a", "/0", "/1"][n]


# Each role's client end, and the attributes of it that a span keeps its own.
SERVER_OWN = {"client.address", "client.port", "network.peer.address", "network.peer.port"}
CLIENT_ENDS = {Role.SERVER: ("peer", SERVER_OWN), Role.CLIENT: ("local", {"network.local.port"})}


@pytest.mark.parametrize("role", [Role.SERVER, Role.CLIENT])
def test_first_spans_to_one_server_share_all_but_their_client_end(builder, role):
    client_end, own = CLIENT_ENDS[role]
    here = (SERVER_PEER if role is Role.SERVER else CLIENT_LOCAL).address
    # A server's clients come from any host; a client's connections from its own.
    ends = [(here, 40001), (here, 40002), ("10.0.0.3" if role is Role.SERVER else here, 40003)]

    def from_end(address: str, port: int, **changes: object) -> HttpExchange:
        return exchange(role, **{client_end: Endpoint(address, port)}, **changes)  # type: ignore[arg-type]

    exchanges = [from_end(*end) for end in ends]
    spans = [builder.build(each) for each in exchanges]

    shared = spans[0].shared_attributes
    assert shared is not None and all(span.shared_attributes is shared for span in spans)
    for span, (address, port) in zip(spans, ends, strict=True):
        expected = {name: port if name.endswith(".port") else address for name in own}
        assert {name: span.attributes[name] for name in own} == expected
        assert not shared.keys() & span.attributes.keys()
    # The same attributes as the connection's own template gives its second span.
    second = builder.build(exchanges[0])
    assert second.shared_attributes is not shared
    assert second.all_attributes() == spans[0].all_attributes()
    # Another server end, Host or TLS: another dict.
    server_end = "local" if role is Role.SERVER else "peer"
    others = [
        builder.build(from_end(here, 40004, headers=[("host", "other.example")])),
        builder.build(from_end(here, 40005, **{server_end: Endpoint("10.9.9.9", 9999)})),
    ]
    over_tls = from_end(here, 40006)
    over_tls.connection.tls = True
    others.append(builder.build(over_tls))
    assert all(span.shared_attributes is not shared for span in others)
    assert others[0].all_attributes()["server.address"] == "other.example"
    assert others[1].all_attributes()[f"network.{server_end}.port"] == 9999
    assert others[2].all_attributes()["url.scheme"] == "https"


def test_first_span_templates_are_bounded(builder, monkeypatch):
    monkeypatch.setattr(builder_module, "MAX_FIRST_SPAN_TEMPLATES", 4)
    for n in range(10):
        span = builder.build(exchange(headers=[("host", f"h{n}.example")]))
        assert span.all_attributes()["server.address"] == f"h{n}.example"
    assert 0 < len(builder._first_spans) <= 4


def on_one_connection(exchanges: list[HttpExchange]) -> list[HttpExchange]:
    for each in exchanges[1:]:
        each.connection = exchanges[0].connection
    return exchanges


@pytest.mark.parametrize("role", [Role.SERVER, Role.CLIENT])
def test_what_a_connections_requests_repeat_is_shared_with_it(builder, role):
    user_agent = [("host", "shop.example:8443"), ("user-agent", "curl/8.5")]
    spans = [
        builder.build(each)
        for each in on_one_connection([exchange(role, headers=user_agent) for _ in range(3)])
    ]

    shared = spans[1].shared_attributes
    assert shared is not None and spans[2].shared_attributes is shared
    assert shared["server.address"] == "shop.example" and shared["server.port"] == 8443
    assert shared["network.protocol.version"] == "1.1"
    assert shared["user_agent.original"] == "curl/8.5"
    assert spans[1].attributes.keys() == {
        "http.request.method", "url.path", "http.response.status_code", "thread.id"
    } | ({"url.full"} if role is Role.CLIENT else set())  # fmt: skip
    assert spans[1].all_attributes() == spans[0].all_attributes()


def test_a_connection_whose_requests_vary_shares_its_own_attributes_alone(builder):
    hosts = ["a.example", "a.example", "a.example", "b.example", "a.example", "a.example"]
    exchanges = on_one_connection([exchange(headers=[("host", host)]) for host in hosts])
    spans = [builder.build(each) for each in exchanges]

    assert [span.all_attributes()["server.address"] for span in spans] == hosts
    assert "server.address" in spans[2].shared_attributes
    # From the first change on: one template, the connection's attributes alone.
    varying = spans[3].shared_attributes
    assert "server.address" not in varying and "network.peer.port" in varying
    assert all(span.shared_attributes is varying for span in spans[4:])
    assert spans[5].attributes["server.address"] == "a.example"
    # As varying once its TLS is learnt late.
    exchanges[0].connection.tls = True
    after = builder.build(exchanges[0]).shared_attributes
    assert after["url.scheme"] == "https" and "server.address" not in after


@settings(max_examples=100, deadline=None)
@given(
    role=st.sampled_from([Role.SERVER, Role.CLIENT]),
    requests=st.lists(
        st.tuples(st.sampled_from(["a.example", "b.example:81", ""]), st.sampled_from(["x", ""])),
        min_size=1,
        max_size=8,
    ),
)
def test_a_span_on_a_busy_connection_has_the_attributes_of_one_on_its_own(role, requests):
    builder = SpanBuilder(ResourceDetector("/nonexistent", hostname="h"), MonotonicClock(0))

    def made(host: str, user_agent: str) -> HttpExchange:
        return exchange(role, headers=[("host", host), ("user-agent", user_agent)])

    exchanges = on_one_connection([made(*each) for each in requests])
    for each, (host, user_agent) in zip(exchanges, requests, strict=True):
        alone = builder.build(made(host, user_agent)).all_attributes()
        assert builder.build(each).all_attributes() == alone


def test_a_connection_found_to_be_tls_gets_a_new_template(builder):
    first = exchange(Role.SERVER)
    builder.build(first)
    before = builder.build(first).shared_attributes
    assert before is not None and before["url.scheme"] == "http"
    first.connection.tls = True  # learnt late: a template made from http is not reused
    after = builder.build(first).shared_attributes
    assert after is not None and after["url.scheme"] == "https"
    assert before["url.scheme"] == "http"  # a shared dict never changes
    assert builder.build(first).shared_attributes is after
