"""End-to-end harness: the real probe against real servers and real clients.

Owns the decision to skip this suite (only when not root or when bcc cannot be
imported), ``probe capture`` runs whose spans a test reads back after stopping
them, the servers under test (Python, nginx, Go, a raw TCP echo server), each a
process of its own on loopback with an ephemeral port, started with the helpers of
tests/helpers.py, and the clients, which
record what they themselves saw and when, so a test can hold every span to it.

Tests never import this module: everything reaches them through fixtures.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Server, go_build, run_client, serving, spawn, start_nginx

HERE = Path(__file__).parent
PROGRAMS = HERE / "programs"
READY_TIMEOUT_S = 60  # each start compiles the BPF programs
EXIT_TIMEOUT_S = 60
USER_AGENT = "probe-e2e/1"
KNOWN_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}

Span = dict[str, Any]


# --- whether the suite can run at all ---------------------------------------


@functools.cache
def unavailable_reason() -> str | None:
    """Why this machine cannot run the probe, or None when it can."""
    if os.geteuid() != 0:
        return "e2e: needs root (the probe loads BPF programs)"
    result = subprocess.run(
        [sys.executable, "-c", "import bcc"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["?"])[-1]
        return f"e2e: bcc cannot be imported by {sys.executable}: {last}"
    return None


def pytest_report_header(config: pytest.Config) -> str:
    return unavailable_reason() or "e2e: running as root with bcc"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(skip)


# --- the probe --------------------------------------------------------------


def probe_command() -> list[str]:
    """The probe installed next to this interpreter, else the module."""
    script = Path(sys.executable).with_name("probe")
    return [str(script)] if script.exists() else [sys.executable, "-m", "probe"]


SPAN_FORMAT = {
    "trace_id": re.compile(r"[0-9a-f]{32}"),
    "span_id": re.compile(r"[0-9a-f]{16}"),
    "parent_span_id": re.compile(r"([0-9a-f]{16})?"),
    "kind": re.compile(r"SERVER|CLIENT"),
    "status_code": re.compile(r"UNSET|OK|ERROR"),
}


def parse_span(line: str) -> Span:
    """One JSON line of ``-o jsonl``, checked against the output contract."""
    try:
        span = json.loads(line)
    except json.JSONDecodeError as error:
        pytest.fail(f"probe wrote a line that is not JSON ({error}): {line!r}")
    for name, pattern in SPAN_FORMAT.items():
        assert isinstance(span.get(name), str) and pattern.fullmatch(span[name]), (
            f"span field {name!r} is malformed: {line}"
        )
    assert 0 < span["start_time_unix_nano"] <= span["end_time_unix_nano"], line
    assert isinstance(span["attributes"], dict), line
    assert isinstance(span["resource"], dict), line
    assert {"service.name", "process.pid"} <= span["resource"].keys(), line
    return span


@pytest.fixture(scope="session")
def probe() -> list[str]:
    """The command that runs the probe, for commands other than capture."""
    return probe_command()


class ProbeCapture:
    """One ``probe capture -o jsonl --output FILE`` run.

    ``start()`` returns once the probe printed ``ready``; ``stop()`` interrupts
    it like Ctrl-C would, requires exit status 0 and reads the spans back.
    """

    def __init__(self, args: Sequence[str], workdir: Path) -> None:
        self.output = workdir / "spans.jsonl"
        self.command = [
            *probe_command(),
            *("capture", "-o", "jsonl", "--output", str(self.output)),
            *args,
        ]
        self.spans: list[Span] = []
        self._stdout = workdir / "stdout.txt"
        self._stderr: list[str] = []
        self._ready = threading.Event()  # set on "ready", or when stderr ends
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def attached(self) -> int:
        """Tracepoints and uprobes the probe has attached now: its perf event
        descriptors (bcc attaches each through one)."""
        assert self._process is not None
        fds = Path(f"/proc/{self._process.pid}/fd")
        links = []
        for fd in fds.iterdir():
            with contextlib.suppress(OSError):  # closed meanwhile
                links.append(os.readlink(fd))
        return links.count("anon_inode:[perf_event]")

    def start(self) -> None:
        with self._stdout.open("w") as stdout:
            self._process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.PIPE,
                text=True,
            )
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        self._ready.wait(READY_TIMEOUT_S)
        if any(line.strip() == "ready" for line in self._stderr):
            return
        if self._process.poll() is not None:
            self._reader.join()
            self._fail("exited before printing 'ready'")
        self.kill()
        self._fail(f"did not print 'ready' within {READY_TIMEOUT_S} s")

    def stop(self) -> list[Span]:
        assert self._process is not None and self._reader is not None
        self._process.send_signal(signal.SIGINT)
        try:
            self._process.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            self._fail(f"did not exit within {EXIT_TIMEOUT_S} s of SIGINT")
        self._reader.join()
        if self._process.returncode != 0:
            self._fail("exited with a failure after SIGINT")
        text = self.output.read_text() if self.output.exists() else ""
        self.spans = [parse_span(line) for line in text.splitlines() if line.strip()]
        return self.spans

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def select(
        self, kind: str | None = None, pid: int | None = None, path: str | None = None
    ) -> list[Span]:
        """Spans in output order, by kind, by the pid of their resource, by url.path."""
        return [
            span
            for span in self.spans
            if (kind is None or span["kind"] == kind)
            and (pid is None or span["resource"]["process.pid"] == pid)
            and (path is None or span["attributes"].get("url.path") == path)
        ]

    def one(self, kind: str, path: str, pid: int | None = None) -> Span:
        """The only span that matches, failing with every span shown otherwise."""
        found = self.select(kind, pid, path)
        assert len(found) == 1, (
            f"expected exactly one {kind} span for {path} (pid {pid}), got {len(found)}; "
            f"all spans:\n{self.describe()}"
        )
        return found[0]

    def describe(self) -> str:
        return "\n".join(
            f"  {s['kind']} pid={s['resource']['process.pid']} {s['attributes']}"
            for s in self.spans
        )

    def summary(self) -> dict[str, int]:
        """The counters of the summary the probe printed on stderr at exit."""
        counts = {}
        names = ("events_seen", "events_lost", "parse_errors", "spans", "exchanges_shed")
        for name in (*names, "not_http_withheld"):
            words = name.replace("_", r"[ _-]")
            match = re.search(rf"\b{words}\b\W{{0,3}}(\d+)", self.stderr, re.IGNORECASE) or (
                re.search(rf"(\d+)\s+{words}\b", self.stderr, re.IGNORECASE)
            )
            if match:
                counts[name] = int(match.group(1))
        return counts

    def _read_stderr(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        with self._process.stderr as stream:
            for line in stream:
                self._stderr.append(line)
                if line.strip() == "ready":
                    self._ready.set()
        self._ready.set()

    def _fail(self, what: str) -> None:
        assert self._process is not None
        stdout = self._stdout.read_text() if self._stdout.exists() else ""
        pytest.fail(
            f"probe {what} (exit status {self._process.returncode})\n"
            f"$ {' '.join(self.command)}\n--- stderr ---\n{self.stderr}"
            f"--- stdout ---\n{stdout}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def probe_capture(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., Any]:
    """``with probe_capture("-P", port) as probe:`` traffic; then ``probe.spans``."""

    @contextmanager
    def run(*args: str) -> Iterator[ProbeCapture]:
        capture = ProbeCapture(args, tmp_path_factory.mktemp("probe"))
        capture.start()
        try:
            yield capture
        except BaseException:
            capture.kill()
            raise
        capture.stop()

    return run


# --- servers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pyserver() -> Iterator[Server]:
    """programs/pyserver.py on 127.0.0.1."""
    with serving(spawn([sys.executable, str(PROGRAMS / "pyserver.py")])) as server:
        yield server


@pytest.fixture(scope="module")
def pyserver6() -> Iterator[Server]:
    """programs/pyserver.py on ::1."""
    command = [sys.executable, str(PROGRAMS / "pyserver.py"), "--host", "::1"]
    with serving(spawn(command, host="::1")) as server:
        yield server


@pytest.fixture(scope="module")
def echoserver() -> Iterator[Server]:
    """programs/echoserver.py: raw TCP, echoes bytes back."""
    with serving(spawn([sys.executable, str(PROGRAMS / "echoserver.py")])) as server:
        yield server


@pytest.fixture(scope="session")
def goserver_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """programs/goserver built with the system's Go."""
    return go_build(PROGRAMS / "goserver", tmp_path_factory.mktemp("go") / "goserver")


@pytest.fixture(scope="module")
def goserver(goserver_binary: Path) -> Iterator[Server]:
    """The Go net/http server on 127.0.0.1."""
    with serving(spawn([str(goserver_binary)])) as server:
        yield server


@pytest.fixture
def node_cluster() -> Iterator[Server]:
    """programs/node_cluster.js: a Node.js primary handing each connection it
    accepts to one of two workers; ``pid`` is the primary's."""
    with serving(spawn(["node", str(PROGRAMS / "node_cluster.js")])) as server:
        yield server


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A private nginx, a master and one worker; ``pid`` is the worker's.

    It serves ``/hello`` from its config and ``/static/`` from programs/nginx.
    """
    with serving(start_nginx(tmp_path_factory.mktemp("nginx"))) as server:
        yield server


# --- clients ----------------------------------------------------------------


@dataclass
class Observed:
    """What one client saw of one request, timed on the Unix clock around it."""

    method: str
    target: str  # path and query, as sent
    pid: int
    thread_id: int
    local_port: int
    before_ns: int  # just before the request's first byte was handed to the kernel
    after_ns: int  # just after the response's last byte came back
    request_body_size: int = 0
    status: int | None = None  # None: no response
    response_body_size: int | None = None  # None: not known to the client (chunked)
    server_thread_id: int | None = None  # pyserver's X-Thread-Id
    error: str | None = None

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def redacted_query(self) -> str | None:
        query = self.target.partition("?")[2]
        if not query:
            return None
        return "&".join(
            f"{key}=REDACTED" if sep else key
            for key, sep, _ in (pair.partition("=") for pair in query.split("&"))
        )

    def check_times(self, span: Span) -> None:
        """The client's own span lies within what it measured. The server's
        starts after the client began and is no longer than what it measured;
        its end may pass the client's by a hair, because the client can have
        the last byte before the server's write() has returned."""
        start, end = span["start_time_unix_nano"], span["end_time_unix_nano"]
        window = f"what the client measured [{self.before_ns}, {self.after_ns}]"
        described = f"{span['kind']} span for {self.target} [{start}, {end}]"
        assert self.before_ns <= start <= end, f"{described} starts before {window}"
        if span["kind"] == "CLIENT":
            assert end <= self.after_ns, f"{described} is not within {window}"
        else:
            assert end - start <= self.after_ns - self.before_ns, (
                f"{described} lasts longer than {window}"
            )

    def check_server_span(
        self, span: Span, server: Server, user_agent: str = USER_AGENT, lost: str = ""
    ) -> None:
        """Everything the server span must say about this exchange."""
        assert span["kind"] == "SERVER"
        assert span["resource"]["process.pid"] == server.pid
        assert span["status_code"] == (
            "ERROR" if self.status is None or self.status >= 500 else "UNSET"
        )
        attributes = span["attributes"]
        self._check_common(attributes, server, user_agent, lost)
        assert attributes.get("client.address") == server.host
        assert attributes.get("client.port") == self.local_port
        assert attributes.get("network.peer.address") == server.host
        assert attributes.get("network.peer.port") == self.local_port
        assert "url.full" not in attributes
        if self.server_thread_id is not None:
            assert attributes.get("thread.id") == self.server_thread_id
        self.check_times(span)

    def check_client_span(
        self, span: Span, server: Server, user_agent: str = USER_AGENT, lost: str = ""
    ) -> None:
        """Everything the client span must say about this exchange."""
        assert span["kind"] == "CLIENT"
        assert span["resource"]["process.pid"] == self.pid
        assert span["status_code"] == (
            "ERROR" if self.status is None or self.status >= 400 else "UNSET"
        )
        attributes = span["attributes"]
        self._check_common(attributes, server, user_agent, lost)
        assert attributes.get("network.peer.address") == server.host
        assert attributes.get("network.peer.port") == server.port
        query = self.redacted_query
        assert attributes.get("url.full") == server.url(self.path + (f"?{query}" if query else ""))
        assert attributes.get("thread.id") == self.thread_id
        self.check_times(span)

    def _check_common(
        self, attributes: dict[str, Any], server: Server, user_agent: str, lost: str
    ) -> None:
        """``lost``: what the probe could not follow, "head" (longer than the
        capture) or "framing" (a body's chunks); "" for nothing."""
        if self.method in KNOWN_METHODS:
            assert attributes.get("http.request.method") == self.method
            assert "http.request.method_original" not in attributes
        else:
            assert attributes.get("http.request.method") == "_OTHER"
            assert attributes.get("http.request.method_original") == self.method
        assert attributes.get("url.path") == self.path
        assert attributes.get("url.query") == self.redacted_query
        assert attributes.get("url.scheme") == "http"
        assert attributes.get("http.response.status_code") == self.status
        assert attributes.get("server.address") == server.host
        assert attributes.get("server.port") == server.port
        assert attributes.get("network.protocol.version") == "1.1"
        assert attributes.get("user_agent.original") == user_agent
        assert attributes.get("http.request.body.size", 0) == self.request_body_size
        if self.response_body_size is not None:
            assert attributes.get("http.response.body.size", 0) == self.response_body_size
        assert attributes.get("probe.http.head_truncated", False) is (lost == "head")
        if lost != "head":  # a cut head may hide the body's framing
            framing_lost = attributes.get("probe.http.body_framing_lost", False)
            assert framing_lost is (lost == "framing")


class HttpClient:
    """One keep-alive ``http.client`` connection, in the test's own process."""

    def __init__(self, server: Server) -> None:
        self.connection = http.client.HTTPConnection(server.host, server.port, timeout=30)

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def connect(self) -> int:
        """Connect now (if not yet); the connection's local port."""
        if self.connection.sock is None:
            self.connection.connect()
        return self.connection.sock.getsockname()[1]

    def close(self) -> None:
        self.connection.close()

    def request(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Observed:
        local_port = self.connect()
        observed = Observed(
            method,
            target,
            pid=os.getpid(),
            thread_id=threading.get_native_id(),
            local_port=local_port,
            before_ns=time.time_ns(),
            after_ns=0,
            request_body_size=len(body or b""),
        )
        try:
            self.connection.request(
                method, target, body=body, headers={"User-Agent": USER_AGENT, **(headers or {})}
            )
            response = self.connection.getresponse()
            data = response.read()
        except (http.client.HTTPException, ConnectionError) as error:
            observed.after_ns = time.time_ns()
            observed.error = repr(error)
            self.close()
            return observed
        observed.after_ns = time.time_ns()
        observed.status = response.status
        observed.response_body_size = None if response.chunked else len(data)
        thread_id = response.getheader("X-Thread-Id")
        observed.server_thread_id = int(thread_id) if thread_id else None
        return observed


@pytest.fixture(scope="session")
def http_client() -> Callable[[Server], HttpClient]:
    """``with http_client(server) as client: client.request("GET", "/x")``."""
    return HttpClient


def run_curl(server: Server, method: str, target: str, data: bytes | None = None) -> Observed:
    """One request by curl, its own process, from before exec to after exit."""
    command = ["curl", "-sS", "--http1.1", "--max-time", "30", "-o", "/dev/null"]
    command += ["-w", "%{http_code} %{local_port} %{size_download}"]
    if method == "HEAD":
        command.append("--head")  # -X HEAD would wait for a body
    else:
        command += ["-X", method]
    if data is not None:
        command += ["--data-binary", "@-"]
    before_ns = time.time_ns()
    pid, stdout = run_client([*command, server.url(target)], input=data)
    after_ns = time.time_ns()
    status, local_port, size = stdout.split()
    return Observed(
        method,
        target,
        pid=pid,
        thread_id=pid,
        local_port=int(local_port),
        before_ns=before_ns,
        after_ns=after_ns,
        request_body_size=len(data or b""),
        status=int(status),
        response_body_size=int(size),
    )


@pytest.fixture(scope="session")
def curl() -> Callable[..., Observed]:
    """``curl(server, "GET", "/x", data=None)``: one request by the curl program."""
    return run_curl


@pytest.fixture(scope="session")
def curl_user_agent() -> str:
    version = subprocess.run(
        ["curl", "--version"], capture_output=True, text=True, check=True
    ).stdout.split()[1]
    return f"curl/{version}"
