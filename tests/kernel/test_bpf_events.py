"""The real BPF programs in the real kernel: what they send for real sockets.

Needs root and bcc; skipped with the reason printed otherwise.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from probe.kernel import loader
from probe.kernel.events import (
    ConnClose,
    ConnOpen,
    DataEvent,
    Direction,
    Endpoint,
    ProcessExec,
    ProcessExit,
    Role,
)
from probe.kernel.loader import EventSource, ProbeOptions
from probe.stats import Stats
from tests.helpers import free_port
from tests.kernel.peers import LARGE_HEAD, LARGE_PARTS

PEERS = Path(__file__).with_name("peers.py")
pytestmark = pytest.mark.usefixtures("tracing_ready")


def collect(source: EventSource, until, timeout: float = 10.0, poll_ms: int = 50) -> list:
    events: list = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events += source.poll(poll_ms)
        if until(events):
            break
    return events


@pytest.fixture(scope="module")
def body_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("body") / "body.txt"
    path.write_bytes(b"hello")
    return path


def start_server(port: int, body_file: Path) -> subprocess.Popen:
    """peers.py's server, listening: it serves one connection."""
    server = subprocess.Popen(
        [sys.executable, str(PEERS), "server", str(port), str(body_file)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout.readline().strip() == "listening"
    return server


def run_exchange(port: int, body_file: Path, size: int, client_comm: str = "") -> tuple[int, int]:
    server = start_server(port, body_file)
    client = subprocess.Popen(
        [sys.executable, str(PEERS), "client", str(port), str(size)],
        env={**os.environ, "PEER_COMM": client_comm},
    )
    assert client.wait(10) == 0
    assert server.wait(10) == 0
    return server.pid, client.pid


# Syscalls in flight are kept in task storage where the kernel has it, else
# in a hash: both ways see the same.
@pytest.mark.parametrize("task_storage", [True, False], ids=["task-storage", "hash"])
def test_one_exchange_seen_from_both_ends(body_file: Path, task_storage: bool) -> None:
    port = free_port()
    stats = Stats()
    options = ProbeOptions(ports=(port,), task_storage=task_storage)
    with EventSource(options, stats) as source:
        server_pid, client_pid = run_exchange(port, body_file, size=10_000)
        events = collect(source, lambda evs: sum(isinstance(e, ConnClose) for e in evs) >= 2)
        lost = source.lost_events()

    assert lost == 0
    opens = {e.key.pid: e for e in events if isinstance(e, ConnOpen)}
    assert set(opens) == {server_pid, client_pid}
    server_open, client_open = opens[server_pid], opens[client_pid]
    assert server_open.role == Role.SERVER and client_open.role == Role.CLIENT
    assert server_open.local.port == port and client_open.peer.port == port
    assert server_open.peer == client_open.local  # mirrored 4-tuple
    assert server_open.local == client_open.peer
    assert stats["addresses_looked_up"] == 0  # the kernel sent both ends' addresses

    data = [e for e in events if isinstance(e, DataEvent)]
    client_out = [e for e in data if e.key.pid == client_pid and e.direction == Direction.EGRESS]
    # sendmsg's three iovecs arrive as one event, in order.
    assert client_out[0].payload == b"POST /upload HTTP/1.1\r\nContent-Length: 10000\r\n\r\n"
    # a 10,000-byte write: all counted, what the head left of the message's
    # default 4 KiB captured.
    head = len(client_out[0].payload)
    assert (client_out[1].size, len(client_out[1].payload)) == (10_000, 4096 - head)
    assert not client_out[1].tail
    assert client_out[0].enter_ns <= client_out[0].exit_ns <= client_out[1].enter_ns

    server_out = [e for e in data if e.key.pid == server_pid and e.direction == Direction.EGRESS]
    assert server_out[0].payload == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    assert (server_out[1].size, server_out[1].payload) == (5, b"")  # sendfile: counted only
    server_in = [e for e in data if e.key.pid == server_pid and e.direction == Direction.INGRESS]
    assert sum(e.size for e in server_in) == len(client_out[0].payload) + 10_000
    assert server_in[0].payload.startswith(b"POST /upload HTTP/1.1\r\n")  # across both buffers
    assert {e.exchange for e in data} == {1}  # both ends number the exchange alike

    closes = {e.key.pid: e for e in events if isinstance(e, ConnClose)}
    assert closes[server_pid].key == server_open.key
    assert closes[client_pid].key == client_open.key
    assert stats["events_malformed"] == 0


def test_an_accept_without_address_wakes_the_reader_while_the_socket_is_open() -> None:
    # accept() without an address buffer (libuv's way) leaves the kernel without
    # the peer: user space reads both ends from /proc, which it can only do while
    # the socket is open. Its OPEN, sent with the request's record, wakes the
    # reader at once; without that it would wait for this poll's timeout, long
    # after the server closed.
    port = free_port()
    with EventSource(ProbeOptions(ports=(port,)), Stats()) as source:
        server = subprocess.Popen(
            [sys.executable, str(PEERS), "holder", str(port), "0.3"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout.readline().strip() == "listening"
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"GET / HTTP/1.1\r\n\r\n")
            # Other records (the holder's exec) may end a poll first.
            events = collect(
                source, lambda evs: any(isinstance(e, ConnOpen) for e in evs), 10, 3000
            )
            assert server.wait(10) == 0
            client_end = Endpoint("127.0.0.1", client.getsockname()[1])
    [opened] = [e for e in events if isinstance(e, ConnOpen)]
    assert opened.key.pid == server.pid and opened.role == Role.SERVER
    assert (opened.local, opened.peer) == (Endpoint("127.0.0.1", port), client_end)


@pytest.mark.parametrize("handed_over", [False, True], ids=["accepted", "picked-up"])
def test_connections_without_addresses_have_the_kernel_read_them(handed_over: bool) -> None:
    # Accepted without an address buffer (libuv), or picked up from its bytes
    # on a descriptor the probe did not see accepted (a Node cluster worker's):
    # the first such connections' addresses come from /proc, and from then on
    # the kernel reads them at the connection's first read
    # (tcp_rcv_space_adjust): no read of the TCP table, and no wakeup, each.
    port = free_port()
    stats = Stats()
    opens: list[ConnOpen] = []
    ends = []
    argv = [sys.executable, str(PEERS), "holder", str(port), "0.3", "3"]
    with EventSource(ProbeOptions(ports=(port,)), stats) as source:
        # Off until needed: it would run for every TCP read on the host.
        assert loader.ADDRESSES_AT_READS_TRACEPOINT not in source._bpf.tracepoint_fds
        server = subprocess.Popen(
            argv + (["handover"] if handed_over else []), stdout=subprocess.PIPE, text=True
        )
        assert server.stdout.readline().strip() == "listening"
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port)) as client:
                client.sendall(b"GET / HTTP/1.1\r\n\r\n")
                events = collect(source, lambda evs: any(isinstance(e, ConnOpen) for e in evs))
                opens += [e for e in events if isinstance(e, ConnOpen)]
                ends.append(Endpoint("127.0.0.1", client.getsockname()[1]))
                # As the pipeline does once a second: a handed-over connection's
                # accept shows only in this count.
                assert source.kernel_counters()["accepts_without_address"] >= 1
        assert server.wait(10) == 0
        assert loader.ADDRESSES_AT_READS_TRACEPOINT in source._bpf.tracepoint_fds
    role = Role.UNKNOWN if handed_over else Role.SERVER
    assert [(e.key.pid, e.role) for e in opens] == [(server.pid, role)] * 3
    assert [(e.local, e.peer) for e in opens] == [
        (Endpoint("127.0.0.1", port), end) for end in ends
    ]
    # The first connection's alone; picked up, the second one's too: only a
    # pick-up made once the program reads ends marks its thread for the next.
    assert stats["addresses_looked_up"] == (2 if handed_over else 1)


def test_a_connection_open_before_the_probe_attaches_nothing() -> None:
    # Picked up from its bytes, as a busy host's many such connections are at
    # the start, it is looked up once, and calls for no program on every read.
    port = free_port()
    stats = Stats()
    server = subprocess.Popen(
        [sys.executable, str(PEERS), "late_reader", str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout.readline().strip() == "listening"
    with socket.create_connection(("127.0.0.1", port)) as client:
        assert server.stdout.readline().strip() == "accepted"  # before the probe
        with EventSource(ProbeOptions(ports=(port,)), stats) as source:
            server.stdin.write("read\n")
            server.stdin.flush()
            client.sendall(b"GET / HTTP/1.1\r\n\r\n")
            events = collect(source, lambda evs: any(isinstance(e, ConnOpen) for e in evs))
            assert source.kernel_counters()["accepts_without_address"] == 0
            assert loader.ADDRESSES_AT_READS_TRACEPOINT not in source._bpf.tracepoint_fds
    assert server.wait(10) == 0
    [opened] = [e for e in events if isinstance(e, ConnOpen)]
    assert (opened.key.pid, opened.role) == (server.pid, Role.UNKNOWN)
    assert opened.local == Endpoint("127.0.0.1", port)  # from /proc
    assert stats["addresses_looked_up"] == 1


def test_a_connect_address_just_before_an_unreadable_page_is_read() -> None:
    # The kernel reads an IPv6 address's size at once; an IPv4 address that
    # ends near an unmapped page is read again on its own.
    port = free_port()
    with (
        socket.create_server(("127.0.0.1", port)) as listener,
        EventSource(ProbeOptions(ports=(port,)), Stats()) as source,
    ):
        listener.settimeout(10)
        client = subprocess.Popen([sys.executable, str(PEERS), "edge_connect", str(port)])
        served, _ = listener.accept()
        assert client.wait(10) == 0
        served.close()
        events = collect(source, lambda evs: any(isinstance(e, ConnClose) for e in evs))
    [opened] = [e for e in events if isinstance(e, ConnOpen)]
    assert (opened.key.pid, opened.role) == (client.pid, Role.CLIENT)
    assert opened.peer == Endpoint("127.0.0.1", port)


def test_a_connection_closed_by_an_exec_ends_there(tmp_path: Path) -> None:
    # The exec closes the socket without a close() for the kernel to see; the
    # new image then reads a file on the same descriptor number.
    port = free_port()
    text = tmp_path / "request.txt"
    text.write_bytes(b"GET /from-file HTTP/1.1\r\n\r\n")
    with (
        socket.create_server(("127.0.0.1", port)) as listener,
        EventSource(ProbeOptions(ports=(port,)), Stats()) as source,
    ):
        listener.settimeout(10)
        launcher = subprocess.Popen(
            [sys.executable, str(PEERS), "exec_reader", str(port), str(text)],
            stdout=subprocess.PIPE,
        )
        served, _ = listener.accept()
        output, _ = launcher.communicate(timeout=10)
        served.close()
        events = collect(
            source,
            lambda evs: any(isinstance(e, ProcessExit) and e.pid == launcher.pid for e in evs),
        )
    assert b"GET /from-file" in output  # the new image read its file on descriptor 9
    [opened] = [e for e in events if isinstance(e, ConnOpen) and e.key.pid == launcher.pid]
    payloads = [e.payload for e in events if isinstance(e, DataEvent) and e.key == opened.key]
    assert payloads == [b"GET /before "]
    closes = [e for e in events if isinstance(e, ConnClose) and e.key == opened.key]
    [exit_ns] = [
        e.timestamp_ns for e in events if isinstance(e, ProcessExit) and e.pid == launcher.pid
    ]
    assert len(closes) == 1 and closes[0].timestamp_ns < exit_ns  # at the exec, not the exit


def _has_exec(events: list, pid: int) -> bool:
    return any(isinstance(e, ProcessExec) and e.pid == pid for e in events)


def test_an_exec_of_an_examined_image_is_known_to_the_kernel() -> None:
    # Known, its EXEC does not wake the reader (see sched_process_exec). The
    # kernel names an image by its absolute path: a relative one, never.
    runs = [
        (["/bin/sleep", "0.3"], None),
        (["/bin/sleep", "0.3"], None),
        (["./sleep", "0.3"], "/bin"),
    ]
    stats = Stats()
    execs: list[ProcessExec] = []
    with EventSource(ProbeOptions(), stats) as source:
        for argv, cwd in runs:
            child = subprocess.Popen(argv, cwd=cwd)
            events = collect(source, lambda evs, pid=child.pid: _has_exec(evs, pid))
            child.wait()
            execs += [e for e in events if isinstance(e, ProcessExec) and e.pid == child.pid]
    first, second, relative = execs
    assert first.image_key and not first.image_known
    assert second.image_key == first.image_key and second.image_known
    assert relative.image_key == b"" and not relative.image_known
    assert stats["execs_of_known_images"] == 1


def test_an_accepted_connection_closed_by_an_exec_before_its_bytes_is_forgotten(
    tmp_path: Path,
) -> None:
    # An accepted connection is told to user space with its first bytes; this
    # one has none before the exec closes it (close-on-exec, no close() to
    # see), so user space never knew it and could not delete its entry. The
    # new image's file on the same descriptor number must not be taken for it.
    port = free_port()
    text = tmp_path / "request.txt"
    text.write_bytes(b"GET /from-file HTTP/1.1\r\n\r\n")
    with EventSource(ProbeOptions(ports=(port,)), Stats()) as source:
        acceptor = subprocess.Popen(
            [sys.executable, str(PEERS), "exec_acceptor", str(port), str(text)],
            stdout=subprocess.PIPE,
        )
        assert acceptor.stdout.readline().strip() == b"listening"
        with socket.create_connection(("127.0.0.1", port)):
            output, _ = acceptor.communicate(timeout=10)
        events = collect(
            source,
            lambda evs: any(isinstance(e, ProcessExit) and e.pid == acceptor.pid for e in evs),
        )
    assert b"GET /from-file" in output  # the new image read its file there
    mine = [e for e in events if getattr(e, "key", None) and e.key.pid == acceptor.pid]
    assert mine == []


def test_an_excluded_process_name_is_never_traced(body_file: Path) -> None:
    port = free_port()
    options = ProbeOptions(ports=(port,), excluded_comms=("peer-client", "wrk"))
    with EventSource(options, Stats()) as source:
        server_pid, client_pid = run_exchange(port, body_file, size=100, client_comm="peer-client")
        events = collect(source, lambda evs: any(isinstance(e, ConnClose) for e in evs))
        events += collect(source, lambda evs: False, timeout=0.3)  # anything late
    keyed = [e for e in events if isinstance(e, (ConnOpen, DataEvent, ConnClose))]
    assert {e.key.pid for e in keyed} == {server_pid}  # the server's end, whole
    assert any(isinstance(e, DataEvent) and e.direction == Direction.EGRESS for e in keyed)
    assert client_pid not in {e.key.pid for e in keyed}


def test_an_excluded_process_connect_leaves_no_entry(body_file: Path) -> None:
    # Its connect() is not followed: no connection entry, where one marked
    # ignored used to be kept for as long as the connection was open.
    port = free_port()
    options = ProbeOptions(ports=(port,), excluded_comms=("peer-client",))
    with EventSource(options, Stats()) as source:
        server = start_server(port, body_file)
        client = subprocess.Popen(
            [sys.executable, str(PEERS), "client", str(port), "100", "linger"],
            stdin=subprocess.PIPE,
            env={**os.environ, "PEER_COMM": "peer-client"},
        )
        try:
            # the server has answered; both ends are open until the client's stdin closes
            answered = collect(
                source,
                lambda evs: any(
                    isinstance(e, DataEvent) and e.direction == Direction.EGRESS for e in evs
                ),
            )
            entries = {key.pid for key in source.discovery.bpf[b"conns"]}
        finally:
            client.stdin.close()
            assert client.wait(10) == 0
            assert server.wait(10) == 0
    assert {e.key.pid for e in answered if isinstance(e, DataEvent)} == {server.pid}
    assert server.pid in entries
    assert client.pid not in entries


def test_a_thread_with_an_excluded_name_is_not_traced_until_it_changes_name() -> None:
    # Whoever opened the connection: the kernel judges the thread by its name
    # at its first data syscall, and again when it next connects or accepts.
    port = free_port()
    options = ProbeOptions(ports=(port,), excluded_comms=("peer-excluded",))
    with EventSource(options, Stats()) as source:
        relay = subprocess.Popen([sys.executable, str(PEERS), "relay", str(port), "peer-excluded"])
        assert relay.wait(10) == 0
        events = collect(source, lambda evs: sum(isinstance(e, ConnClose) for e in evs) >= 4)
    sent = [
        e.payload
        for e in events
        if isinstance(e, DataEvent) and e.key.pid == relay.pid and e.direction == Direction.EGRESS
    ]
    assert sent == [b"GET /a ", b"GET /c "]


def test_pid_filter_and_capture_size(body_file: Path) -> None:
    port = free_port()
    server = start_server(port, body_file)
    with EventSource(ProbeOptions(pids=(server.pid,), capture_bytes=64), Stats()) as source:
        # The server was blocked in accept() before the probe started: its
        # connection is picked up from its bytes and resolved in /proc, so
        # the client holds it open until the probe has read the exchange.
        client = subprocess.Popen(
            [sys.executable, str(PEERS), "client", str(port), "1000", "linger"],
            stdin=subprocess.PIPE,
        )
        events = collect(source, lambda evs: sum(isinstance(e, DataEvent) for e in evs) >= 4)
        client.stdin.close()
        assert client.wait(10) == 0
        events += collect(source, lambda evs: any(isinstance(e, ConnClose) for e in evs))
        assert server.wait(10) == 0
    keyed = [e for e in events if not isinstance(e, (ProcessExit, ProcessExec))]
    assert {e.key.pid for e in keyed} == {server.pid}
    assert all(len(e.payload) <= 64 for e in keyed if isinstance(e, DataEvent))
    assert max(e.size for e in keyed if isinstance(e, DataEvent)) > 64


def test_udp_connect_is_not_a_connection() -> None:
    port = free_port()
    with EventSource(ProbeOptions(ports=(port,)), Stats()) as source:
        sender = subprocess.Popen([sys.executable, str(PEERS), "udp", str(port)])
        assert sender.wait(10) == 0
        events = collect(
            source, lambda evs: any(isinstance(e, ProcessExit) and e.pid == sender.pid for e in evs)
        )
    assert any(isinstance(e, ProcessExit) and e.pid == sender.pid for e in events)
    assert [e for e in events if not isinstance(e, (ProcessExit, ProcessExec))] == []


def test_a_backlog_is_handed_on_in_bounded_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Records waiting in the ring buffer come out MAX_BATCH at a time, all of them."""
    monkeypatch.setattr(loader, "MAX_BATCH", 50)
    port, sends = free_port(), 200
    with EventSource(ProbeOptions(ports=(port,)), Stats()) as source:
        chatter = [sys.executable, str(PEERS), "chatter", str(port), str(sends)]
        subprocess.run(chatter, check=True, timeout=20)  # all of it waits in the ring
        batches = []
        while batch := source.poll(0):
            batches.append(batch)
        lost = source.lost_events()

    assert lost == 0
    assert max(len(batch) for batch in batches) == 50
    data = [e for batch in batches for e in batch if isinstance(e, DataEvent)]
    for direction in Direction:
        moved = [e for e in data if e.direction == direction]
        assert sum(e.size for e in moved) == 10 * sends, direction


def test_waiting_for_records_lets_other_threads_run() -> None:
    """poll() holds the interpreter lock to read records, not to wait for them:
    the export thread must run meanwhile."""
    ticks: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.001)

    with EventSource(ProbeOptions(ports=(free_port(),)), Stats()) as source:
        source.poll(0)  # what waits already
        ticker = threading.Thread(target=tick)
        ticker.start()
        try:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # until one poll waited out its time
                started = time.monotonic()
                source.poll(200)
                ended = time.monotonic()
                if ended - started >= 0.15:
                    break
            else:
                pytest.fail("every poll returned early: records kept coming for 5 s")
        finally:
            stop.set()
            ticker.join()
    inside = [t for t in ticks if started + 0.02 < t < ended - 0.02]
    assert len(inside) >= 10, f"{len(inside)} ticks in a wait of {ended - started:.3f} s"


def test_a_signal_ends_the_wait() -> None:
    """A stop (SIGTERM, SIGINT: their handlers set a flag) is seen at once, not
    after the poll's timeout: Python resumes a wait a signal interrupted."""
    handled: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, _frame: handled.append(signum))
    try:
        with EventSource(ProbeOptions(ports=(free_port(),)), Stats()) as source:
            source.poll(0)  # what waits already
            timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1))
            timer.start()
            started = time.monotonic()
            while not handled and time.monotonic() - started < 20:
                source.poll(10_000)
            waited = time.monotonic() - started
            timer.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert handled == [signal.SIGUSR1]
    assert waited < 5, f"the wait went on {waited:.1f} s after the signal"
    assert signal.set_wakeup_fd(-1) == -1  # closed: Python's wakeup fd given back


# A connection's first bytes -> whether they are HTTP's, as user space parses it.
FIRST_BYTES = {
    b"GET /chat ": True,
    b"M-SEARCH * HTTP/1.1\r\n\r\n": True,
    b"PROPFIND / HTTP/1.1\r\n\r\n": True,  # as long as the kernel looks
    b"A" * 32 + b" / HTTP/1.1\r\n\r\n": True,  # the longest method user space takes
    b"HTTP/1.1 200 OK\r\n\r\n": True,  # a response, its request unseen
    b"GET\t/ HTTP/1.1\r\n\r\n": False,
    b"*1\r\n$4\r\nPING\r\n": False,  # Redis
    b"\x00\x00\x00\x08\x04\xd2\x16\x2f": False,  # PostgreSQL's SSLRequest
    b"PING\r\n": False,  # a word, but no method: no space after it
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n": False,  # HTTP/2 (gRPC in clear), not parsed
}


def test_only_connections_that_start_with_http_send_their_bytes() -> None:
    """Another protocol's connection sends no data records. Its client end
    sends only its OPEN and CLOSE (so user space forgets it), its server end
    nothing at all; each syscall withheld is counted."""
    port, sends = free_port(), 3
    first_bytes_by_pid: dict[int, bytes] = {}
    with EventSource(ProbeOptions(ports=(port,)), Stats()) as source:
        for first_bytes in FIRST_BYTES:
            chatter = subprocess.Popen(
                [sys.executable, str(PEERS), "chatter", str(port), str(sends), first_bytes.hex()]
            )
            assert chatter.wait(20) == 0
            first_bytes_by_pid[chatter.pid] = first_bytes
        closes = len(FIRST_BYTES) + sum(FIRST_BYTES.values())  # client ends, HTTP's server ends
        events = collect(source, lambda evs: sum(isinstance(e, ConnClose) for e in evs) >= closes)
        withheld = source.kernel_counters()["not_http_withheld"]

    for pid, first_bytes in first_bytes_by_pid.items():
        mine = [e for e in events if getattr(e, "key", None) and e.key.pid == pid]
        opened = [e.role for e in mine if isinstance(e, ConnOpen)]
        closed = {e.key for e in mine if isinstance(e, ConnClose)}
        assert closed == {e.key for e in mine if isinstance(e, ConnOpen)}, first_bytes
        data = [e for e in mine if isinstance(e, DataEvent)]
        if FIRST_BYTES[first_bytes]:
            assert sorted(opened) == [Role.CLIENT, Role.SERVER], first_bytes
            assert [e.payload for e in data] == [first_bytes] * 2 * sends, first_bytes
        else:
            assert opened == [Role.CLIENT], first_bytes
            assert data == [], first_bytes
    others = sum(not http for http in FIRST_BYTES.values())
    assert withheld == others * 2 * sends  # a send and a receive each time


def test_a_request_read_a_byte_at_a_time_is_sent() -> None:
    """The verdict rests on one call's bytes: a server that reads a byte at a
    time shows it "G", then "E": method characters, taken as HTTP's."""
    port, sends, request = free_port(), 2, b"GET /chat "
    with EventSource(ProbeOptions(ports=(port,)), Stats()) as source:
        argv = [sys.executable, str(PEERS), "chatter", str(port), str(sends), request.hex()]
        chatter = subprocess.Popen([*argv, "bytewise"])
        assert chatter.wait(20) == 0
        events = collect(source, lambda evs: sum(isinstance(e, ConnClose) for e in evs) >= 2)
    [server] = [e.key for e in events if isinstance(e, ConnOpen) and e.role == Role.SERVER]
    received = [e.payload for e in events if isinstance(e, DataEvent) and e.key == server]
    assert received == [bytes([byte]) for byte in request] * sends


def _runs(events: list, key: object) -> list[tuple[Direction, bytes, set[int]]]:
    """A connection's data as runs of calls one way: (direction, their payloads
    joined, the kernel's exchange numbers they carried)."""
    runs: list[tuple[Direction, bytes, set[int]]] = []
    for event in events:
        if isinstance(event, DataEvent) and event.key == key:
            if runs and runs[-1][0] == event.direction:
                direction, payload, numbers = runs[-1]
                numbers.add(event.exchange)
                runs[-1] = (direction, payload + event.payload, numbers)
            else:
                runs.append((event.direction, event.payload, {event.exchange}))
    return runs


def _exchanges(events: list, key: object, asking: Direction) -> list[tuple[bytes, bytes, set]]:
    """A connection's data as (request, response, exchange numbers) triples:
    each run of calls one way paired with the run the other way after it."""
    runs = _runs(events, key)
    assert runs and runs[0][0] == asking and len(runs) % 2 == 0, runs
    return [
        (runs[i][1], runs[i + 1][1], runs[i][2] | runs[i + 1][2]) for i in range(0, len(runs), 2)
    ]


def _peer_events(source: EventSource, mode: str, port: int, count: int, wait_s: float) -> list:
    """Run peers.py MODE PORT COUNT to its end: its events up to its exit."""
    peer = subprocess.Popen([sys.executable, str(PEERS), mode, str(port), str(count)])
    assert peer.wait(wait_s) == 0
    return collect(
        source, lambda evs: any(isinstance(e, ProcessExit) and e.pid == peer.pid for e in evs)
    )


LARGE_RESPONSE = LARGE_HEAD + b"".join(LARGE_PARTS)  # what peers.py large answers


def test_a_message_past_the_capture_sends_each_calls_last_bytes() -> None:
    """Each way, a message's first 4 KiB (the default capture) come as the
    calls' first bytes; past them, each call sends its last 8 bytes, flagged.
    The next message, the other way and back, is captured from its start."""
    port = free_port()
    with EventSource(ProbeOptions(ports=(port,)), Stats()) as source:
        events = _peer_events(source, "large", port, 2, wait_s=20)
    opens = {e.role: e.key for e in events if isinstance(e, ConnOpen)}
    data = [e for e in events if isinstance(e, DataEvent)]
    for role, answer in ((Role.SERVER, Direction.EGRESS), (Role.CLIENT, Direction.INGRESS)):
        calls = [e for e in data if e.key == opens[role]]
        requests = [i for i, e in enumerate(calls) if e.direction != answer]
        assert len(requests) == 2 and calls[requests[1]].payload.startswith(b"GET /large/1 ")
        response = calls[requests[0] + 1 : requests[1]]
        assert sum(e.size for e in response) == len(LARGE_RESPONSE) == len(LARGE_HEAD) + 65536
        moved = 0
        for call in response:
            assert call.direction == answer
            end = moved + call.size
            if moved < 4096:
                assert not call.tail
                assert call.payload == LARGE_RESPONSE[moved : min(end, 4096)]
            else:
                assert call.tail and call.payload == LARGE_RESPONSE[max(moved, end - 8) : end]
            moved = end
        assert sum(call.tail for call in response) >= 12


def test_every_accepted_connection_gets_its_local_address_from_the_kernel() -> None:
    """300 connections in turn, each accepted by the same process: the
    kernel keeps each server end's local address from the socket's
    ESTABLISHED to accept()'s return, so every OPEN carries its four-tuple,
    the client end's mirrored, and user space looks none up in /proc."""
    count, port, stats = 300, free_port(), Stats()
    with EventSource(ProbeOptions(ports=(port,)), stats) as source:
        events = _peer_events(source, "conversations", port, count, wait_s=30)
    opens = [e for e in events if isinstance(e, ConnOpen)]
    servers = {(e.local, e.peer) for e in opens if e.role == Role.SERVER}
    clients = {(e.peer, e.local) for e in opens if e.role == Role.CLIENT}
    assert len(servers) == count
    assert servers == clients
    assert {local.port for local, _ in servers} == {port}
    assert stats["addresses_looked_up"] == 0


def _over_the_rate(mode: str, count: int, wait_s: float = 20) -> tuple[list, int, int]:
    """peers.py MODE PORT COUNT with both ends traced under a limit of 5
    exchanges a second: its events up to its exit, the exchanges shed, and
    the records lost."""
    port = free_port()
    with EventSource(ProbeOptions(ports=(port,), exchange_rate=5), Stats()) as source:
        events = _peer_events(source, mode, port, count, wait_s)
        return events, source.kernel_counters()["exchanges_shed"], source.lost_events()


def test_over_the_exchange_rate_whole_exchanges_are_shed_and_counted() -> None:
    """A rate of 5 a second, and 200 requests back to back on one connection
    traced at both ends: the kernel sends a few exchanges whole and sheds the
    rest whole, each request with its own response, and counts what it shed.
    Both ends share their verdicts: the same requests are traced at both.
    Every record carries its exchange's number on the connection, shed ones
    counted: the same at both ends for the same request."""
    count = 200
    events, shed, lost = _over_the_rate("conversation", count)
    opens = {e.role: e.key for e in events if isinstance(e, ConnOpen)}
    traced, kept = 0, {}
    for role, asking in ((Role.SERVER, Direction.INGRESS), (Role.CLIENT, Direction.EGRESS)):
        seen = []
        for request, response, numbers in _exchanges(events, opens[role], asking):
            k = int(request.split(b" ")[1][1:])
            assert request == b"GET /%d HTTP/1.1\r\nHost: peer\r\n\r\n" % k, role
            body = b"%d" % k
            assert response == b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (
                len(body),
                body,
            ), role
            seen.append((k, numbers))
        assert all(numbers == {k + 1} for k, numbers in seen), (role, seen)
        assert len(seen) < count, role  # some were shed, and numbered all the same
        traced += len(seen)
        kept[role] = [k for k, _ in seen]
    assert kept[Role.SERVER] == kept[Role.CLIENT]
    assert lost == 0
    assert traced > 0 and shed > 0, (traced, shed)
    assert traced + shed == 2 * count  # every exchange of either end, traced or shed


def test_an_accepted_connection_whose_every_exchange_is_shed_sends_nothing() -> None:
    """A connection per request, over the rate: an accepted connection's OPEN
    waits for its first record, so the server end of one whose only exchange
    was shed sends no OPEN and no CLOSE, while every client end is announced
    at connect(). Whatever is sent is whole: an OPEN, the exchange, a CLOSE.
    Both ends of a connection share the verdict: its exchange is traced at
    both ends or at neither."""
    count = 100
    events, shed, _ = _over_the_rate("conversations", count, wait_s=30)
    opened = {e.key: e.role for e in events if isinstance(e, ConnOpen)}
    servers = {key for key, role in opened.items() if role == Role.SERVER}
    clients = {key for key, role in opened.items() if role == Role.CLIENT}
    assert len(clients) == count
    assert 0 < len(servers) < count, len(servers)
    assert {e.key for e in events if isinstance(e, ConnClose)} == servers | clients
    moved = {e.key for e in events if isinstance(e, DataEvent)}
    assert servers <= moved  # an accepted connection is sent only with its records
    traced = 0
    for key in moved:
        server = key in servers
        exchanges = _exchanges(events, key, Direction.INGRESS if server else Direction.EGRESS)
        assert len(exchanges) == 1, exchanges
        for request, response, _ in exchanges:
            assert request == b"GET /0 HTTP/1.1\r\nHost: peer\r\n\r\n"
            assert response == b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n0"
        traced += len(exchanges)
    assert traced + shed == 2 * count  # every exchange of either end, traced or shed
    ends = {e.key: e for e in events if isinstance(e, ConnOpen)}
    served = {ends[key].peer for key in servers}
    asked = {ends[key].local for key in moved - servers}
    assert served == asked  # the client ends whose exchange was traced, and only those


def test_the_exchange_rate_moves_at_run_time() -> None:
    """The limit compiled in is the most; user space lowers it (and raises it
    back) at run time, as the CPU-pressure governor does: 200 exchanges back
    to back are traced whole under 100,000 a second, in part under 5, whole
    again back under 100,000. The limit in force is reported."""
    port = free_port()
    count = 200
    stats = Stats()
    with EventSource(ProbeOptions(ports=(port,), exchange_rate=100_000), stats) as source:
        assert stats["exchange_rate_limit"] == 100_000

        def conversation() -> tuple[int, int]:
            """Requests traced at the server end; exchanges shed at either end."""
            shed_before = source.kernel_counters()["exchanges_shed"]
            events = _peer_events(source, "conversation", port, count, wait_s=20)
            [server] = [e.key for e in events if isinstance(e, ConnOpen) and e.role == Role.SERVER]
            traced = len(_exchanges(events, server, Direction.INGRESS))
            return traced, source.kernel_counters()["exchanges_shed"] - shed_before

        assert conversation() == (count, 0)
        source.set_exchange_rate(5)
        assert stats["exchange_rate_limit"] == source.exchange_rate == 5
        traced, shed = conversation()
        assert 0 < traced < count and 2 * traced + shed == 2 * count
        source.set_exchange_rate(100_000)
        assert conversation() == (count, 0)
        with pytest.raises(ValueError):
            source.set_exchange_rate(0)


def test_without_a_limit_compiled_in_there_is_no_rate_to_move() -> None:
    with (
        EventSource(ProbeOptions(exchange_rate=0), Stats()) as source,
        pytest.raises(ValueError, match="no exchange rate limit"),
    ):
        source.set_exchange_rate(100)


def test_a_body_sent_after_100_continue_goes_with_its_head() -> None:
    """Over the rate, the body of a request sent after "100 Continue" starts
    bytes the asking way again, as a new request would: it keeps its head's
    verdict, so user space gets head, 100, body and response, or none. Both
    ends number the head's exchange and the body's alike."""
    events, shed, _ = _over_the_rate("continued", 200)
    opens = {e.role: e.key for e in events if isinstance(e, ConnOpen)}
    for role in (Role.SERVER, Role.CLIENT):
        runs = [(payload, numbers) for _, payload, numbers in _runs(events, opens[role])]
        assert runs and len(runs) % 4 == 0, (role, runs)
        for i in range(0, len(runs), 4):
            head, proceed, body, response = (payload for payload, _ in runs[i : i + 4])
            k = int(head.split(b" ")[1][1:])
            assert head.startswith(b"POST /%d HTTP/1.1\r\n" % k), (role, runs[i : i + 4])
            assert proceed == b"HTTP/1.1 100 Continue\r\n\r\n", (role, runs[i : i + 4])
            assert body == b"body-%d" % k, (role, runs[i : i + 4])
            assert response.endswith(b"\r\n\r\n%d" % k), (role, runs[i : i + 4])
            numbers = [numbers for _, numbers in runs[i : i + 4]]
            assert numbers == [{2 * k + 1}] * 2 + [{2 * k + 2}] * 2, (role, k, numbers)
    assert shed > 0
