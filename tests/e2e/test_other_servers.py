"""Servers that are not Python: nginx (a master and its worker), Go's
net/http, and a Node.js cluster."""

from __future__ import annotations

import http.client
import time
from pathlib import Path

NGINX_STATIC_FILE = Path(__file__).parent / "programs/nginx/static/index.html"


def test_nginx_with_curl(nginx, probe_capture, curl, curl_user_agent):
    with probe_capture("-P", str(nginx.port)) as probe:
        hello = curl(nginx, "GET", "/hello")
        static = curl(nginx, "GET", "/static/index.html")
        missing = curl(nginx, "GET", "/missing")
    assert (hello.status, static.status, missing.status) == (200, 200, 404)
    assert hello.response_body_size == len("hello from nginx\n")
    assert static.response_body_size == NGINX_STATIC_FILE.stat().st_size
    for observed in (hello, static, missing):
        server_span = probe.one("SERVER", observed.path, nginx.pid)
        observed.check_server_span(server_span, nginx, user_agent=curl_user_agent)
        client_span = probe.one("CLIENT", observed.path, observed.pid)
        observed.check_client_span(client_span, nginx, user_agent=curl_user_agent)
    assert len(probe.spans) == 6


def test_go_server_with_python_client(goserver, probe_capture, http_client):
    with probe_capture("-P", str(goserver.port)) as probe, http_client(goserver) as client:
        hello = client.request("GET", "/hello")
        echo = client.request("POST", "/echo", b"e" * 5000)
        failing = client.request("PUT", "/status/500", b"x")
    assert (hello.status, echo.status, failing.status) == (200, 200, 500)
    for observed in (hello, echo, failing):
        observed.check_server_span(probe.one("SERVER", observed.path, goserver.pid), goserver)
        observed.check_client_span(probe.one("CLIENT", observed.path, observed.pid), goserver)
    assert probe.one("SERVER", "/status/500", goserver.pid)["status_code"] == "ERROR"
    assert len({s["attributes"]["client.port"] for s in probe.select("SERVER")}) == 1
    assert len(probe.spans) == 6


def test_go_server_with_curl(goserver, probe_capture, curl, curl_user_agent):
    with probe_capture("-P", str(goserver.port)) as probe:
        hello = curl(goserver, "GET", "/hello")
        echo = curl(goserver, "POST", "/echo", b"posted by curl")
    assert (hello.status, echo.status) == (200, 200)
    assert echo.response_body_size == len("POST /echo 14\n")
    for observed in (hello, echo):
        server_span = probe.one("SERVER", observed.path, goserver.pid)
        observed.check_server_span(server_span, goserver, user_agent=curl_user_agent)
        client_span = probe.one("CLIENT", observed.path, observed.pid)
        observed.check_client_span(client_span, goserver, user_agent=curl_user_agent)
    assert len(probe.spans) == 4


def test_every_short_connection_to_a_node_cluster_has_its_span(node_cluster, probe_capture):
    """The primary accepts without an address buffer and hands each connection
    to a worker, where the probe picks it up from its bytes. The primary's
    accepts have the probe attach the program that reads addresses at reads;
    a worker's first connection picked up after that has its thread's next
    ones' addresses read in the kernel. Those connections are closed by the
    server right after their response, before a lookup in /proc could find
    them: each has its span, with its client's port, from one of the workers."""
    port = node_cluster.port

    def one_each() -> list[http.client.HTTPConnection]:
        """A kept-alive connection to each worker (round-robin), left open."""
        connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(2)]
        for connection in connections:
            connection.request("GET", "/kept")
            connection.getresponse().read()
        return connections

    with probe_capture("-P", str(port)) as probe:
        attached = probe.attached()
        first = one_each()
        deadline = time.monotonic() + 10  # the counts are read once a second
        while probe.attached() == attached and time.monotonic() < deadline:
            time.sleep(0.05)
        assert probe.attached() == attached + 1  # tcp:tcp_rcv_space_adjust
        first += one_each()
        client_ports = {}
        for request in range(20):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("GET", f"/short/{request}", headers={"Connection": "close"})
            client_ports[f"/short/{request}"] = connection.sock.getsockname()[1]
            assert connection.getresponse().read().endswith(f"GET /short/{request}\n".encode())
            connection.close()
        for connection in first:
            connection.close()
    short = [s for s in probe.select("SERVER") if s["attributes"]["url.path"] in client_ports]
    assert sorted(s["attributes"]["url.path"] for s in short) == sorted(client_ports)
    for span in short:
        assert span["attributes"]["client.port"] == client_ports[span["attributes"]["url.path"]]
        assert span["attributes"]["client.address"] == "127.0.0.1"
        assert span["attributes"]["server.port"] == port
    workers = {span["resource"]["process.pid"] for span in short}
    assert len(workers) == 2 and node_cluster.pid not in workers
