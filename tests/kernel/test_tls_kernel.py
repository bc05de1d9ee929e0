"""OpenSSL uprobes in the real kernel: a program started after the probe is
found on exec and traced; a process that dies inside SSL_read leaves nothing
behind. Needs root and bcc; skipped with the reason printed otherwise."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from probe.kernel.events import (
    ConnClose,
    DataEvent,
    Direction,
    KernelEvent,
    ProcessExec,
    ProcessExit,
)
from probe.kernel.loader import EventSource, ProbeOptions
from probe.stats import Stats
from tests.helpers import PROGRAMS, free_port, serving, spawn

PEERS = Path(__file__).with_name("peers.py")
pytestmark = pytest.mark.usefixtures("tracing_ready")


def poll_until(
    source: EventSource, done: Callable[[list[KernelEvent]], bool], timeout: float = 20.0
) -> list[KernelEvent]:
    events: list[KernelEvent] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events += source.poll(50)
        if done(events):
            return events
    pytest.fail(f"gave up after {timeout} s; {len(events)} events")


def test_node_started_after_the_probe_is_found_on_exec_and_traced(certificate) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    stats = Stats()
    with EventSource(ProbeOptions(), stats) as source:
        server = spawn(["node", str(PROGRAMS / "tls_node.js"), "server", *map(str, certificate)])
        with serving(server):
            # The exec event leads discovery to node's static OpenSSL.
            poll_until(source, lambda _: node in source.discovery.found().get("openssl", []))
            subprocess.run(
                [
                    "curl",
                    "-sSk",
                    "--http1.1",
                    "-o",
                    "/dev/null",
                    f"https://127.0.0.1:{server.port}/late",
                ],
                check=True,
                timeout=30,
            )
            events = poll_until(
                source,
                lambda evs: any(
                    isinstance(e, DataEvent)
                    and e.key.pid == server.pid
                    and e.direction == Direction.EGRESS
                    for e in evs
                ),
            )
            ciphertext_dropped = source.kernel_counters()["tls_ciphertext_dropped"]
    served = [e for e in events if isinstance(e, DataEvent) and e.key.pid == server.pid]
    # Plaintext only, one record per SSL call, on the accepted connection.
    assert [(e.direction, e.tls) for e in served] == [
        (Direction.INGRESS, True),
        (Direction.EGRESS, True),
    ]
    assert served[0].payload.startswith(b"GET /late HTTP/1.1\r\n")
    assert served[1].payload.startswith(b"HTTP/1.1 200 OK\r\n")
    assert served[0].key == served[1].key
    assert stats["uprobe_attach_errors"] == 0
    assert ciphertext_dropped > 0


def _threads(pid: int) -> set[int]:
    return {int(tid.name) for tid in Path(f"/proc/{pid}/task").iterdir()}


def test_a_process_killed_inside_ssl_read_leaves_nothing_behind(certificate) -> None:
    stats = Stats()
    server = spawn([sys.executable, str(PROGRAMS / "tls_pyserver.py"), *map(str, certificate)])
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with serving(server), EventSource(ProbeOptions(), stats) as source:
        tls_calls = source.discovery.bpf[b"tls_calls"]
        # The handshake done, the server's thread waits in SSL_read_ex
        # for a request that never comes.
        with context.wrap_socket(socket.create_connection(("127.0.0.1", server.port))) as client:
            client.do_handshake()
            deadline = time.monotonic() + 20
            while not {key.value for key in tls_calls} & _threads(server.pid):
                assert time.monotonic() < deadline, "the server never entered SSL_read"
                source.poll(50)
            threads = _threads(server.pid)
            server.process.send_signal(signal.SIGKILL)
            server.process.wait()
            poll_until(
                source,
                lambda evs: any(isinstance(e, ProcessExit) and e.pid == server.pid for e in evs),
            )
        remaining = {key.value for key in tls_calls} & threads
        last_reads = {key.value for key in source.discovery.bpf[b"tls_last_read"]}
        conns = [key.pid for key in source.discovery.bpf[b"conns"]]
    assert remaining == set()
    assert last_reads & threads == set()
    assert server.pid not in conns
    assert stats["uprobe_attach_errors"] == 0


@pytest.mark.parametrize("task_storage", [True, False], ids=["task-storage", "hash"])
def test_openssl_plaintext_comes_with_its_socket(certificate, task_storage: bool) -> None:
    # Python's ssl module reads and writes its socket inside SSL_read_ex and
    # SSL_write_ex: the syscall made there names the SSL's socket. Its exit
    # knows it is inside such a call by a bit in the thread's saved syscall,
    # kept in task storage where the kernel has it, else in a hash.
    server = spawn([sys.executable, str(PROGRAMS / "tls_pyserver.py"), *map(str, certificate)])
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    options = ProbeOptions(pids=(server.pid,), task_storage=task_storage)
    with serving(server), EventSource(options, Stats()) as source:
        with context.wrap_socket(socket.create_connection(("127.0.0.1", server.port))) as client:
            client.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            while client.recv(65536):
                pass
        events = poll_until(
            source,
            lambda evs: any(
                isinstance(e, DataEvent) and e.payload.startswith(b"HTTP/1.") for e in evs
            ),
        )
    data = [e for e in events if isinstance(e, DataEvent)]
    assert all(e.tls and e.key.pid == server.pid for e in data)  # no ciphertext
    requests = [e for e in data if e.direction == Direction.INGRESS]
    assert requests[0].payload.startswith(b"GET /hello HTTP/1.1\r\n")
    assert len({e.key for e in data}) == 1  # the accepted socket, found inside the calls


def test_plaintext_of_another_protocol_over_tls_is_withheld(certificate) -> None:
    """Plaintext is sent only if it starts with HTTP: another protocol over
    TLS (a database's, say) costs no records, and its ciphertext none either."""
    port, sends = free_port(), 3
    http, other = b"GET /tls ", b"*1\r\n$4\r\nPING\r\n"  # the second is Redis
    pids = {}
    with EventSource(ProbeOptions(ports=(port,)), Stats()) as source:
        for first_bytes in (http, other):
            chatter = subprocess.Popen(
                [sys.executable, str(PEERS), "tls_chatter", str(port), str(sends)]
                + [first_bytes.hex(), *map(str, certificate)]
            )
            assert chatter.wait(20) == 0
            pids[first_bytes] = chatter.pid
        # Each chatter's client end and server end.
        events = poll_until(source, lambda evs: sum(isinstance(e, ConnClose) for e in evs) >= 4)
        counters = source.kernel_counters()
    data = [e for e in events if isinstance(e, DataEvent)]
    # Each message: the client's SSL_write, the server's SSL_read and
    # SSL_write (its echo), the client's SSL_read.
    sent = [(e.payload, e.tls) for e in data if e.key.pid == pids[http]]
    assert sent == [(http, True)] * 4 * sends
    assert [e for e in data if e.key.pid == pids[other]] == []
    assert counters["not_http_withheld"] == 4 * sends
    assert counters["tls_ciphertext_dropped"] > 0


def test_an_excluded_thread_costs_no_record_and_no_count_at_the_tls_library(certificate) -> None:
    """Its socket syscalls are not looked at, so neither is its plaintext:
    not counted as plaintext whose socket was not found."""
    port = free_port()
    with EventSource(
        ProbeOptions(ports=(port,), excluded_comms=("peer-excluded",)), Stats()
    ) as source:
        chatter = subprocess.Popen(
            [sys.executable, str(PEERS), "tls_chatter", str(port), "3"]
            + [b"GET /tls ".hex(), *map(str, certificate)],
            env={**os.environ, "PEER_COMM": "peer-excluded"},
        )
        assert chatter.wait(20) == 0
        events = poll_until(
            source,
            lambda evs: any(isinstance(e, ProcessExit) and e.pid == chatter.pid for e in evs),
        )
        counters = source.kernel_counters()
    assert [e for e in events if not isinstance(e, (ProcessExit, ProcessExec))] == []
    assert counters["tls_plaintext_without_socket"] == 0
    assert counters["tls_ciphertext_dropped"] == 0
