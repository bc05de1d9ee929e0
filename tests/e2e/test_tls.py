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
import socket
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

PROGRAMS = Path(__file__).parent / "programs"
USER_AGENT = "probe-e2e/1"
START_TIMEOUT_S = 20

NGINX_TLS_CONF = """\
daemon off;
master_process on;
user root;  # pytest's temporary directories are private to root
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    default_type text/plain;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location = /hello {{ return 200 "hello over tls\\n"; }}
    }}
}}
"""


@dataclass
class TlsServer:
    process: subprocess.Popen[str]
    port: int
    pid: int  # the process that serves (nginx: the worker)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


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


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    workdir = tmp_path_factory.mktemp("tls")
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


def spawn(command: list[str]) -> TlsServer:
    """Start a program that prints its listening port as its first line."""
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stderr is not None
    line = process.stdout.readline()
    if not line.strip().isdigit():
        process.kill()
        pytest.fail(f"{command} did not print its port: {line!r} {process.stderr.read()}")
    return TlsServer(process, int(line), process.pid)


def python_server(certificate: tuple[Path, Path]) -> TlsServer:
    cert, key = certificate
    return spawn([sys.executable, str(PROGRAMS / "tls_pyserver.py"), str(cert), str(key)])


@pytest.fixture(scope="module")
def pyserver_tls(certificate: tuple[Path, Path]) -> Iterator[TlsServer]:
    server = python_server(certificate)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def node_server(certificate: tuple[Path, Path]) -> Iterator[TlsServer]:
    cert, key = certificate
    server = spawn(["node", str(PROGRAMS / "tls_node.js"), "server", str(cert), str(key)])
    yield server
    server.stop()


def _worker_of(pid: int) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if found := children.read_text().split():
            return int(found[0])
        time.sleep(0.05)
    pytest.fail(f"nginx {pid} started no worker")


@pytest.fixture(scope="module")
def nginx_tls(
    tmp_path_factory: pytest.TempPathFactory, certificate: tuple[Path, Path]
) -> Iterator[TlsServer]:
    """A private nginx serving HTTPS; ``pid`` is its one worker's."""
    workdir = tmp_path_factory.mktemp("nginx_tls")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cert, key = certificate
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_TLS_CONF.format(dir=workdir, port=port, cert=cert, key=key))
    process = subprocess.Popen(
        ["/usr/sbin/nginx", "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    server = TlsServer(process, port, _worker_of(process.pid))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    yield server
    server.stop()


# --- clients ----------------------------------------------------------------


def curl(server: TlsServer, method: str, path: str) -> Seen:
    command = ["curl", "-sSk", "--http1.1", "--max-time", "30", "-o", "/dev/null", "-X", method]
    command += ["-A", USER_AGENT, "-w", "%{http_code} %{local_port}"]
    before_ns = time.time_ns()
    process = subprocess.Popen(
        [*command, f"https://127.0.0.1:{server.port}{path}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, stderr = process.communicate(timeout=60)
    after_ns = time.time_ns()
    assert process.returncode == 0, f"curl failed: {stderr}"
    status, local_port = stdout.split()
    return Seen(method, path, process.pid, int(local_port), int(status), before_ns, after_ns)


class PythonClient:
    """One keep-alive ``http.client`` HTTPS connection, in the test's own process."""

    def __init__(self, server: TlsServer) -> None:
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

    def __init__(self, server: TlsServer) -> None:
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


def check_span(span: dict[str, Any], kind: str, seen: Seen, server: TlsServer) -> None:
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
    assert seen.before_ns <= span["start_time_unix_nano"] <= span["end_time_unix_nano"]
    assert span["end_time_unix_nano"] <= seen.after_ns


def check_exchanges(probe: Any, server: TlsServer, seen: list[Seen], kinds: tuple[str, ...]):
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
