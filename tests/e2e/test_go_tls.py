"""Go programs under the whole probe: crypto/tls plaintext as https spans,
and a stripped Go binary declined with one log line.

The programs are programs/go_relay, built here with the system's Go: an
HTTPS server, and a client that makes its requests on one keep-alive
connection. HTTP/2 is off on both sides.
"""

from __future__ import annotations

import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import serving, spawn

PATHS = ("/a", "/status/404", "/c")
STATUSES = (200, 404, 200)


@pytest.fixture
def serve() -> Iterator[Callable[..., tuple[int, int]]]:
    """``serve(binary, *args)`` starts a go_relay server: (pid, port)."""
    with ExitStack() as servers:

        def start(binary: Path, *args: str) -> tuple[int, int]:
            server = servers.enter_context(serving(spawn([str(binary), *args])))
            return server.pid, server.port

        yield start


def test_go_tls_server_and_client_give_https_spans(
    probe_capture: Callable[..., Any], serve: Callable[..., tuple[int, int]], go_relay: Path
) -> None:
    server_pid, port = serve(go_relay, "-tls")  # running when the probe starts: found by it
    urls = [f"https://127.0.0.1:{port}{path}" for path in PATHS]
    with probe_capture("-P", str(port)) as probe:
        # The client is the same file as the server: probed already. Its
        # second run's exec is of a known image, which does not wake the
        # probe (bpf/socket_conn.bpf.c): its uprobes are on the file already.
        for run in ("first", "second"):
            client = subprocess.Popen(
                [str(go_relay), "-get", *urls], stdout=subprocess.PIPE, text=True
            )
            output, _ = client.communicate(timeout=30)
            assert output == "".join(
                f"{status} {path}\n" for status, path in zip(STATUSES, PATHS, strict=True)
            ), run
            if run == "first":
                first_client = client.pid
    again = probe.select("CLIENT", pid=client.pid)
    assert [s["attributes"]["url.path"] for s in again] == list(PATHS), probe.describe()

    clients = probe.select("CLIENT", pid=first_client)
    # The first run's server spans, by its connection: spans of two connections
    # come out in the order their links settle, not in the order of the runs.
    first_ports = {span["attributes"]["network.local.port"] for span in clients}
    servers = [
        span
        for span in probe.select("SERVER", pid=server_pid)
        if span["attributes"]["client.port"] in first_ports
    ]
    assert len(probe.spans) == 2 * (len(servers) + len(clients)), probe.describe()
    assert [s["attributes"]["url.path"] for s in servers] == list(PATHS), probe.describe()
    assert [s["attributes"]["url.path"] for s in clients] == list(PATHS), probe.describe()
    client_ports = set()
    for server, client_span, status, url in zip(servers, clients, STATUSES, urls, strict=True):
        for span in (server, client_span):
            attributes = span["attributes"]
            assert attributes["http.request.method"] == "GET"
            assert attributes["url.scheme"] == "https"
            assert attributes.get("http.response.status_code") == status, probe.describe()
            assert attributes["server.port"] == port
            assert attributes["network.protocol.version"] == "1.1"
            assert attributes["user_agent.original"] == "Go-http-client/1.1"
        assert server["status_code"] == "UNSET"
        assert client_span["status_code"] == ("ERROR" if status >= 400 else "UNSET")
        assert client_span["attributes"]["network.peer.port"] == port
        assert client_span["attributes"]["url.full"] == url
        client_ports.add(server["attributes"]["client.port"])
    assert len(client_ports) == 1 and port not in client_ports  # one keep-alive connection
    assert probe.summary().get("parse_errors") == 0


def test_stripped_go_binary_is_skipped_with_one_log_line(
    probe_capture: Callable[..., Any],
    serve: Callable[..., tuple[int, int]],
    go_relay_stripped: Path,
) -> None:
    server_pid, port = serve(go_relay_stripped)
    url = f"http://127.0.0.1:{port}/hello"
    with (
        probe_capture("-P", str(port)) as probe,
        urllib.request.urlopen(url, timeout=10) as response,
    ):
        assert response.read() == b"/hello\n"
    lines = [
        line for line in probe.stderr.splitlines() if f"not probing {go_relay_stripped}" in line
    ]
    assert len(lines) == 1, probe.stderr
    assert lines[0].endswith(f"{go_relay_stripped}: no symbol table (stripped with -ldflags=-s?)")
    # Its plain HTTP is still traced at the socket.
    span = probe.one("SERVER", "/hello", pid=server_pid)
    assert span["attributes"]["url.scheme"] == "http"
    assert span["attributes"]["http.response.status_code"] == 200
