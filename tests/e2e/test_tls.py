"""HTTPS: the plaintext read at OpenSSL, as spans exactly like plaintext HTTP's.

Real programs on loopback, each its own process: nginx and curl (libssl),
Python's ssl module on both ends (libssl), Node.js on both ends (OpenSSL
linked into the node binary). Each span must carry ``url.scheme=https`` and
the addresses of the kernel connection, and the ciphertext on those sockets
must yield nothing: no span of its own, no parse error.
"""

from __future__ import annotations

import http.client
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Server, run_client, serving, spawn, start_nginx

PROGRAMS = Path(__file__).parent / "programs"
USER_AGENT = "probe-e2e/1"


@dataclass
class Seen:
    """One request as its client saw it, timed on the Unix clock around it."""

    method: str
    path: str
    pid: int
    local_port: int
    status: int
    before_ns: int
    after_ns: int


# --- servers ----------------------------------------------------------------


def python_server(certificate: tuple[Path, Path]) -> Server:
    cert, key = certificate
    return spawn([sys.executable, str(PROGRAMS / "tls_pyserver.py"), str(cert), str(key)])


@pytest.fixture(scope="module")
def pyserver_tls(certificate: tuple[Path, Path]) -> Iterator[Server]:
    with serving(python_server(certificate)) as server:
        yield server


@pytest.fixture(scope="module")
def node_server(certificate: tuple[Path, Path]) -> Iterator[Server]:
    cert, key = certificate
    command = ["node", str(PROGRAMS / "tls_node.js"), "server", str(cert), str(key)]
    with serving(spawn(command)) as server:
        yield server


@pytest.fixture(scope="module")
def nginx_tls(
    tmp_path_factory: pytest.TempPathFactory, certificate: tuple[Path, Path]
) -> Iterator[Server]:
    """A private nginx serving HTTPS; ``pid`` is its one worker's."""
    with serving(start_nginx(tmp_path_factory.mktemp("nginx_tls"), certificate)) as server:
        yield server


# --- clients ----------------------------------------------------------------


def curl(server: Server, method: str, path: str) -> Seen:
    command = ["curl", "-sSk", "--http1.1", "--max-time", "30", "-o", "/dev/null", "-X", method]
    command += ["-A", USER_AGENT, "-w", "%{http_code} %{local_port}"]
    before_ns = time.time_ns()
    pid, stdout = run_client([*command, f"https://127.0.0.1:{server.port}{path}"])
    after_ns = time.time_ns()
    status, local_port = stdout.split()
    return Seen(method, path, pid, int(local_port), int(status), before_ns, after_ns)


class PythonClient:
    """One keep-alive ``http.client`` HTTPS connection, in the test's own process."""

    def __init__(self, server: Server) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.connection = http.client.HTTPSConnection(
            "127.0.0.1", server.port, timeout=30, context=context
        )

    def request(self, method: str, path: str, body: bytes | None = None) -> Seen:
        if self.connection.sock is None:
            self.connection.connect()
        local_port = self.connection.sock.getsockname()[1]
        before_ns = time.time_ns()
        self.connection.request(method, path, body=body, headers={"User-Agent": USER_AGENT})
        response = self.connection.getresponse()
        response.read()
        after_ns = time.time_ns()
        return Seen(method, path, os.getpid(), local_port, response.status, before_ns, after_ns)

    def close(self) -> None:
        self.connection.close()


class NodeClient:
    """A node process that GETs paths in order on one keep-alive connection,
    and keeps it open until `close()`.

    Node accepts without asking for the peer's address, so the probe reads
    the server side's addresses from /proc when it learns of the connection:
    the connection must still be open by then.
    """

    def __init__(self, server: Server) -> None:
        self.server = server
        self.process: subprocess.Popen[str] | None = None

    def get(self, paths: list[str]) -> list[Seen]:
        before_ns = time.time_ns()
        self.process = subprocess.Popen(
            ["node", str(PROGRAMS / "tls_node.js"), "client", str(self.server.port), *paths],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        results = [self.process.stdout.readline().split() for _ in paths]
        after_ns = time.time_ns()
        return [
            Seen("GET", path, self.process.pid, int(port), int(status), before_ns, after_ns)
            for path, (status, port) in zip(paths, results, strict=True)
        ]

    def close(self) -> None:
        if self.process is not None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            assert self.process.wait(60) == 0


# --- checks -----------------------------------------------------------------


def check_span(span: dict[str, Any], kind: str, seen: Seen, server: Server) -> None:
    """Everything a span of this HTTPS exchange must say, seen from ``kind``'s end."""
    attributes = span["attributes"]
    assert span["kind"] == kind
    assert attributes["url.scheme"] == "https"
    assert attributes["http.request.method"] == seen.method
    assert attributes["url.path"] == seen.path
    assert attributes["http.response.status_code"] == seen.status
    assert attributes["server.address"] == "127.0.0.1"
    assert attributes["server.port"] == server.port
    assert attributes["user_agent.original"] == USER_AGENT
    if kind == "CLIENT":
        assert attributes["network.peer.port"] == server.port
        assert attributes["network.local.port"] == seen.local_port
        assert attributes["url.full"] == f"https://127.0.0.1:{server.port}{seen.path}"
        assert span["resource"]["process.pid"] == seen.pid
    else:
        assert span["resource"]["process.pid"] == server.pid
        assert attributes["client.address"] == "127.0.0.1"
        assert attributes["client.port"] == seen.local_port
        assert attributes["network.peer.port"] == seen.local_port
        assert attributes["network.local.port"] == server.port
    assert attributes["network.peer.address"] == "127.0.0.1"
    start, end = span["start_time_unix_nano"], span["end_time_unix_nano"]
    assert seen.before_ns <= start <= end
    if kind == "CLIENT":
        assert end <= seen.after_ns
    else:  # curl can have the last byte before the server's SSL_write has returned
        assert end - start <= seen.after_ns - seen.before_ns


def check_exchanges(probe: Any, server: Server, seen: list[Seen], kinds: tuple[str, ...]):
    """Exactly one span of each kind per request, and nothing else: no span
    and no parse error from the ciphertext."""
    for request in seen:
        for kind in kinds:
            matching = [
                span
                for span in probe.select(kind, path=request.path)
                if kind == "CLIENT" or span["attributes"]["client.port"] == request.local_port
            ]
            assert len(matching) == 1, f"{kind} {request.path}:\n{probe.describe()}"
            check_span(matching[0], kind, request, server)
    assert len(probe.spans) == len(seen) * len(kinds), probe.describe()
    assert probe.summary()["parse_errors"] == 0


# --- tests ------------------------------------------------------------------


def test_curl_to_nginx(nginx_tls, probe_capture):
    with probe_capture("-P", str(nginx_tls.port)) as probe:
        seen = [curl(nginx_tls, "GET", "/hello"), curl(nginx_tls, "GET", "/missing")]
    assert [s.status for s in seen] == [200, 404]
    check_exchanges(probe, nginx_tls, seen, ("SERVER", "CLIENT"))


def test_python_keep_alive(pyserver_tls, probe_capture):
    with probe_capture("-P", str(pyserver_tls.port)) as probe:
        client = PythonClient(pyserver_tls)
        seen = [
            client.request("GET", "/first"),
            client.request("POST", "/second", b"x" * 10_000),
            client.request("DELETE", "/status/503"),
        ]
        client.close()
    assert [s.status for s in seen] == [200, 200, 503]
    assert len({s.local_port for s in seen}) == 1  # one connection
    check_exchanges(probe, pyserver_tls, seen, ("SERVER", "CLIENT"))
    server_span = probe.one("SERVER", "/second", pyserver_tls.pid)
    assert server_span["attributes"]["http.request.body.size"] == 10_000
    assert probe.one("SERVER", "/status/503", pyserver_tls.pid)["status_code"] == "ERROR"


def test_concurrent_python_connections(pyserver_tls, probe_capture):
    seen: list[Seen] = []

    def connection(number: int) -> None:
        client = PythonClient(pyserver_tls)
        for request in range(3):
            seen.append(client.request("GET", f"/c{number}/r{request}"))
        client.close()

    with probe_capture("-P", str(pyserver_tls.port)) as probe:
        threads = [threading.Thread(target=connection, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(seen) == 24 and {s.status for s in seen} == {200}
    check_exchanges(probe, pyserver_tls, seen, ("SERVER", "CLIENT"))


def test_server_and_clients_started_after_the_probe(certificate, probe_capture):
    """Nothing that speaks TLS here runs before the probe is ready."""
    with probe_capture() as probe:  # unfiltered: the port is not known before
        server = python_server(certificate)
        try:
            seen = [curl(server, "GET", "/late"), curl(server, "PUT", "/later")]
        finally:
            server.stop()
    ours = [s for s in probe.spans if s["attributes"].get("server.port") == server.port]
    for request in seen:
        for kind in ("SERVER", "CLIENT"):
            matching = [
                s for s in ours if s["kind"] == kind and s["attributes"]["url.path"] == request.path
            ]
            assert len(matching) == 1, probe.describe()
            check_span(matching[0], kind, request, server)
    assert len(ours) == 4


def test_node_server_and_client(node_server, probe_capture):
    """Node.js links OpenSSL statically and does its own socket I/O."""
    client = NodeClient(node_server)
    try:
        with probe_capture("-P", str(node_server.port)) as probe:
            seen = client.get(["/n1", "/n2", "/n3"])
    finally:
        client.close()
    assert [s.status for s in seen] == [200, 200, 200]
    assert len({s.local_port for s in seen}) == 1  # keep-alive
    check_exchanges(probe, node_server, seen, ("SERVER", "CLIENT"))
