"""Every method, status class and query to the Python server, from Python and from curl.

One probe capture serves the whole module: the traffic runs once, each request
on a path of its own, and each test then checks the spans of one request.
"""

from __future__ import annotations

import pytest

# method -> request body; FOO is no HTTP method at all
METHODS = {
    "GET": None,
    "POST": b"posted body\n",
    "PUT": b"put" * 100,
    "DELETE": None,
    "HEAD": None,
    "PATCH": b'{"patch": true}',
    "FOO": b"foo",
}
STATUSES = [200, 301, 404, 503]
QUERY = "a=1&b=two"


@pytest.fixture(scope="module")
def traffic(pyserver, probe_capture, http_client, curl):
    """The capture, and what each client saw, keyed by (client, case)."""
    seen = {}
    with probe_capture("-P", str(pyserver.port)) as probe:
        with http_client(pyserver) as client:
            for method, body in METHODS.items():
                seen["python", method] = client.request(method, f"/py/{method.lower()}", body)
            for status in STATUSES:
                seen["python", status] = client.request("GET", f"/status/{status}/py")
            seen["python", "query"] = client.request("GET", f"/py/query?{QUERY}")
        for method, body in METHODS.items():
            seen["curl", method] = curl(pyserver, method, f"/curl/{method.lower()}", body)
        seen["curl", 503] = curl(pyserver, "GET", "/status/503/curl")
    return probe, seen


@pytest.mark.parametrize("method", METHODS)
def test_python_client_method(traffic, pyserver, method):
    probe, seen = traffic
    observed = seen["python", method]
    assert observed.status == 200
    observed.check_server_span(probe.one("SERVER", observed.path, pyserver.pid), pyserver)
    observed.check_client_span(probe.one("CLIENT", observed.path, observed.pid), pyserver)


@pytest.mark.parametrize("method", METHODS)
def test_curl_method(traffic, pyserver, curl_user_agent, method):
    probe, seen = traffic
    observed = seen["curl", method]
    assert observed.status == 200
    server_span = probe.one("SERVER", observed.path, pyserver.pid)
    observed.check_server_span(server_span, pyserver, user_agent=curl_user_agent)
    client_span = probe.one("CLIENT", observed.path, observed.pid)
    observed.check_client_span(client_span, pyserver, user_agent=curl_user_agent)


@pytest.mark.parametrize("status", STATUSES)
def test_status_codes(traffic, pyserver, status):
    """5xx is an error on both sides, 4xx only on the client's."""
    probe, seen = traffic
    observed = seen["python", status]
    assert observed.status == status
    server_span = probe.one("SERVER", observed.path, pyserver.pid)
    observed.check_server_span(server_span, pyserver)
    client_span = probe.one("CLIENT", observed.path, observed.pid)
    observed.check_client_span(client_span, pyserver)
    assert server_span["status_code"] == ("ERROR" if status >= 500 else "UNSET")
    assert client_span["status_code"] == ("ERROR" if status >= 400 else "UNSET")


def test_curl_server_error(traffic, pyserver, curl_user_agent):
    probe, seen = traffic
    observed = seen["curl", 503]
    server_span = probe.one("SERVER", "/status/503/curl", pyserver.pid)
    observed.check_server_span(server_span, pyserver, user_agent=curl_user_agent)
    client_span = probe.one("CLIENT", "/status/503/curl", observed.pid)
    observed.check_client_span(client_span, pyserver, user_agent=curl_user_agent)
    assert server_span["status_code"] == client_span["status_code"] == "ERROR"


def test_query_values_are_redacted(traffic, pyserver):
    probe, seen = traffic
    observed = seen["python", "query"]
    server_span = probe.one("SERVER", "/py/query", pyserver.pid)
    client_span = probe.one("CLIENT", "/py/query", observed.pid)
    observed.check_server_span(server_span, pyserver)
    observed.check_client_span(client_span, pyserver)
    expected = "a=REDACTED&b=REDACTED"
    assert server_span["attributes"]["url.query"] == expected
    assert client_span["attributes"]["url.full"] == pyserver.url(f"/py/query?{expected}")


def test_nothing_else_was_traced(traffic, pyserver):
    """One server and one client span per request, and nothing more."""
    probe, seen = traffic
    assert len(probe.select("SERVER", pyserver.pid)) == len(seen)
    assert len(probe.select("CLIENT")) == len(seen)
    assert len(probe.spans) == 2 * len(seen)
