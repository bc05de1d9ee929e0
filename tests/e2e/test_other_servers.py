"""Servers that are not Python: nginx (a master and its worker) and Go's net/http."""

from __future__ import annotations

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
