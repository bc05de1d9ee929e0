"""Go programs in the real kernel: the goroutine each socket I/O works for,
and crypto/tls plaintext (bpf/go.bpf.c, probe/kernel/golang.py).

A Go net/http server (programs/go_relay) whose handlers call an upstream
HTTP server, from their own goroutine or from one they start: the request
a handler reads and the request it sends must carry the same goroutine,
for 20 requests in flight at once. Needs root, bcc and Go.
"""

from __future__ import annotations

import http.server
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from probe.kernel.events import ConnOpen, DataEvent, Direction, Role
from probe.kernel.loader import EventSource, ProbeOptions
from probe.stats import Stats
from tests.helpers import serving, spawn

pytestmark = pytest.mark.usefixtures("tracing_ready")

CONCURRENT = 20


class Upstream(http.server.ThreadingHTTPServer):
    """Answers a request only once CONCURRENT of them are in flight, so that
    every handler of the relay is running at the same time."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), UpstreamHandler)
        self.barrier = threading.Barrier(CONCURRENT, timeout=20)


class UpstreamHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the relay's client reuses connections
    server: Upstream

    def do_GET(self) -> None:
        self.server.barrier.wait()
        body = f"upstream {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


# The goroutine of a syscall is found through a bit in the thread's saved
# syscall, kept in task storage where the kernel has it, else in a hash: the
# module runs once each way, each with servers of its own, since the tests
# count the connections a probe saw open.
@pytest.fixture(scope="module", params=[True, False], ids=["task-storage", "hash"])
def task_storage(request: pytest.FixtureRequest) -> bool:
    return request.param


@pytest.fixture(scope="module")
def upstream(task_storage: bool) -> Iterator[Upstream]:
    server = Upstream()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def relay(go_relay: Path, upstream: Upstream) -> Iterator[tuple[int, int]]:
    """(pid, port) of a relay to ``upstream``."""
    command = [str(go_relay), "-upstream", f"http://127.0.0.1:{upstream.server_port}"]
    with serving(spawn(command)) as server:
        yield server.pid, server.port


@pytest.fixture(scope="module")
def tls_server(go_relay: Path, task_storage: bool) -> Iterator[tuple[int, int]]:
    """(pid, port) of a relay serving HTTPS."""
    with serving(spawn([str(go_relay), "-tls"])) as server:
        yield server.pid, server.port


@pytest.fixture(scope="module")
def source(
    task_storage: bool,
    relay: tuple[int, int],
    tls_server: tuple[int, int],
    upstream: Upstream,
    go_relay: Path,
) -> Iterator[EventSource]:
    """One probe at a time for the module (its uprobes take seconds to remove),
    started after the servers: it finds their binary running and probes it."""
    ports = (relay[1], tls_server[1], upstream.server_port)
    options = ProbeOptions(ports=ports, task_storage=task_storage)
    with EventSource(options, Stats()) as source:
        assert source.discovery is not None
        assert str(go_relay) in source.discovery.found()["go"]
        yield source


def collect(source: EventSource, pids: set[int], until, timeout: float = 20.0) -> list:
    """The events of ``pids`` until ``until(events)`` holds."""
    events: list = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events += [e for e in source.poll(50) if getattr(e, "key", None) and e.key.pid in pids]
        if until(events):
            break
    return events


def request_goroutines(events: list, role: Role, direction: Direction) -> dict[str, int]:
    """Request path -> goroutine of the data event that starts the request."""
    found: dict[str, int] = {}
    for event in events:
        if (
            isinstance(event, DataEvent)
            and event.role == role
            and event.direction == direction
            and event.payload.startswith(b"GET /")
        ):
            path = event.payload.split(b" ")[1].decode()
            assert path not in found, f"{path} seen twice"
            found[path] = event.goroutine
    return found


def test_outgoing_requests_carry_the_goroutine_of_the_request_served(
    source: EventSource, relay: tuple[int, int], upstream: Upstream
) -> None:
    """20 requests whose handlers call upstream themselves, then 20 whose
    handlers start a goroutine that does; the second round also reuses the
    connections that net/http kept idle after the first (2 per host)."""
    for kind, reused in (("direct", 0), ("spawned", 2)):
        events = relay_round(source, relay, upstream, kind)
        served = request_goroutines(events, Role.SERVER, Direction.INGRESS)
        sent = request_goroutines(events, Role.CLIENT, Direction.EGRESS)
        assert sorted(served) == sorted(sent) == sorted(f"/{kind}/{i}" for i in range(CONCURRENT))
        assert sent == served
        # All in flight at once: 20 goroutines, none shared, none zero.
        assert len(set(served.values())) == CONCURRENT and 0 not in served.values()
        opened = {e.key for e in events if isinstance(e, ConnOpen)}
        sending = {e.key for e in events if isinstance(e, DataEvent) and e.role == Role.CLIENT}
        assert len(sending - opened) == reused, kind


def relay_round(source: EventSource, relay: tuple[int, int], upstream: Upstream, kind: str) -> list:
    """GET /KIND/0 ... /KIND/19 from the relay at once; the relay's events."""
    pid, port = relay
    upstream.barrier.reset()
    paths = [f"/{kind}/{i}" for i in range(CONCURRENT)]

    def get(path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
            return response.read()

    with ThreadPoolExecutor(CONCURRENT) as pool:
        bodies = list(pool.map(get, paths))
    assert bodies == [f"upstream {path}\n".encode() for path in paths]

    def done(events: list) -> bool:
        served = request_goroutines(events, Role.SERVER, Direction.INGRESS)
        sent = request_goroutines(events, Role.CLIENT, Direction.EGRESS)
        return len(served) == len(sent) == CONCURRENT

    events = collect(source, {pid}, done)
    assert source.lost_events() == 0
    return events


def test_tls_plaintext_on_the_connection_and_no_ciphertext(
    source: EventSource, tls_server: tuple[int, int], go_relay: Path
) -> None:
    server_pid, port = tls_server
    paths = ["/a", "/status/404", "/c"]
    # The client is the same file as the server: its uprobes are in place.
    client = subprocess.Popen(
        [str(go_relay), "-get", *(f"https://127.0.0.1:{port}{p}" for p in paths)],
        stdout=subprocess.PIPE,
        text=True,
    )
    output, _ = client.communicate(timeout=30)
    assert output == "200 /a\n404 /status/404\n200 /c\n"

    def done(events: list) -> bool:
        return len(responses(events, Role.SERVER)) == len(responses(events, Role.CLIENT)) == 3

    events = collect(source, {server_pid, client.pid}, done)

    data = [e for e in events if isinstance(e, DataEvent)]
    assert all(e.tls for e in data), "ciphertext was sent"
    assert requests(data, Role.CLIENT) == requests(data, Role.SERVER) == paths
    assert responses(data, Role.SERVER) == responses(data, Role.CLIENT) == [200, 404, 200]
    assert {e.key.pid for e in data if e.role == Role.CLIENT} == {client.pid}
    assert {e.key.pid for e in data if e.role == Role.SERVER} == {server_pid}
    assert len({e.key for e in data if e.role == Role.CLIENT}) == 1  # one keep-alive connection
    # The client's main goroutine made every request, though net/http wrote
    # and read them on goroutines of its own; the server's connection
    # goroutine served them all, though another one may read ahead the
    # first byte of the next request.
    assert len({e.goroutine for e in data if e.role == Role.CLIENT}) == 1
    assert len({e.goroutine for e in data if e.role == Role.SERVER}) == 1
    assert 0 not in {e.goroutine for e in data}


def stream(events: list, role: Role, direction: Direction) -> bytes:
    """The bytes ``role`` moved in ``direction``, in order."""
    return b"".join(
        e.payload
        for e in events
        if isinstance(e, DataEvent) and e.role == role and e.direction == direction
    )


def requests(events: list, role: Role) -> list[str]:
    """Paths of the GET requests that ``role`` sent or received, in order."""
    direction = Direction.EGRESS if role == Role.CLIENT else Direction.INGRESS
    found = re.findall(rb"GET (\S+) HTTP/1\.1\r\n", stream(events, role, direction))
    return [path.decode() for path in found]


def responses(events: list, role: Role) -> list[int]:
    """Status codes of the responses that ``role`` sent or received, in order."""
    direction = Direction.EGRESS if role == Role.SERVER else Direction.INGRESS
    found = re.findall(rb"HTTP/1\.1 (\d{3}) ", stream(events, role, direction))
    return [int(code) for code in found]
