"""Helpers that test files of several folders share: free ports, Go builds,
self-signed certificates, and the server and client processes that the
kernel, daemon and end-to-end tests start on loopback.

Test files and conftest.py files import them from here (``tests.helpers``);
the fixtures built on them live in tests/conftest.py and tests/e2e/conftest.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

PROGRAMS = Path(__file__).parent / "e2e" / "programs"
START_TIMEOUT_S = 20


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def go_build(package: Path, output: Path, *ldflags: str) -> Path:
    """``go build`` the program in directory ``package`` into ``output``.

    The system's Go, standard library only, offline; its caches go next to
    ``output``, because HOME may be unset.
    """
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOCACHE": str(output.parent / "go-cache"),
        "GOPATH": str(output.parent / "gopath"),
        "GOFLAGS": "",
    }
    command = ["go", "build", "-o", str(output)]
    if ldflags:
        command.append(f"-ldflags={' '.join(ldflags)}")
    result = subprocess.run(
        command, cwd=package, env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"go build failed in {package}:\n{result.stdout}{result.stderr}")
    return output


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """(cert.pem, key.pem) in ``directory``: a certificate for 127.0.0.1 and
    localhost that is its own CA, made with the openssl command."""
    cert, key = Path(directory) / "cert.pem", Path(directory) / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=probe"]
        + ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True,
        capture_output=True,
    )
    return cert, key


# --- servers ----------------------------------------------------------------


@dataclass
class Server:
    """A server process on loopback; ``pid`` is the process that serves."""

    process: subprocess.Popen[str]
    host: str
    port: int
    pid: int

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def url(self, target: str) -> str:
        return f"http://{self.authority}{target}"

    def stop(self) -> None:
        with self.process:  # closes its pipes and waits
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def spawn(command: Sequence[str], host: str = "127.0.0.1") -> Server:
    """Start a program that prints its listening port as its first line."""
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stderr is not None
    line = process.stdout.readline()
    if not line.strip().isdigit():
        process.kill()
        pytest.fail(f"{command} did not print its port: {line!r} {process.stderr.read()}")
    return Server(process, host, int(line), process.pid)


@contextmanager
def serving(server: Server) -> Iterator[Server]:
    try:
        yield server
    finally:
        server.stop()


def wait_listening(server: Server, log: Path) -> None:
    """Return once ``server`` accepts connections; fail with ``log`` if it never does."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and server.process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    server.stop()
    pytest.fail(f"server on port {server.port} did not start: {log.read_text()}")


def child_pid(pid: int) -> int:
    """The one child of ``pid`` (nginx's worker), once it exists."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        found = children.read_text().split()
        if found:
            return int(found[0])
        time.sleep(0.05)
    pytest.fail(f"process {pid} started no child")


NGINX_CONF = """\
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
        listen 127.0.0.1:{port}{tls};
        root {root};
        location = /hello {{ return 200 "hello from nginx\\n"; }}
    }}
}}
"""
# Appended to the listen line: "listen 127.0.0.1:PORT ssl; ssl_certificate ...;".
NGINX_TLS = " ssl;\n        ssl_certificate {cert};\n        ssl_certificate_key {key}"


def nginx_conf(directory: Path, port: int, certificate: tuple[Path, Path] | None = None) -> str:
    """The nginx.conf of a private nginx whose files are in ``directory``.

    It serves ``/hello`` from the config and ``/static/`` from programs/nginx,
    over HTTPS when given a (cert, key).
    """
    tls = "" if certificate is None else NGINX_TLS.format(cert=certificate[0], key=certificate[1])
    return NGINX_CONF.format(dir=directory, port=port, tls=tls, root=PROGRAMS / "nginx")


def start_nginx(directory: Path, certificate: tuple[Path, Path] | None = None) -> Server:
    """A private nginx on a free port, a master and one worker; ``pid`` is the worker's."""
    port = free_port()
    conf = directory / "nginx.conf"
    conf.write_text(nginx_conf(directory, port, certificate))
    log = directory / "error.log"
    process = subprocess.Popen(
        ["/usr/sbin/nginx", "-p", str(directory), "-c", str(conf), "-e", str(log)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    server = Server(process, "127.0.0.1", port, process.pid)
    wait_listening(server, log)
    server.pid = child_pid(process.pid)
    return server


# --- clients ----------------------------------------------------------------


def run_client(
    command: Sequence[str], input: bytes | None = None, timeout: float = 60
) -> tuple[int, str]:
    """Run a client program to its end, which must be a success: its pid and its stdout.

    The pid is why this is not ``subprocess.run``: spans name their process.
    """
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    stdout, stderr = process.communicate(input, timeout=timeout)
    assert process.returncode == 0, f"{command[0]} failed: {stderr.decode()}"
    return process.pid, stdout.decode()
