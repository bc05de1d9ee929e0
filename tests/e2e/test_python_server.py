"""The Python server under harder traffic: big bodies and heads, chunking,
keep-alive, pipelining, dropped answers, old connections, IPv6, concurrency,
a client that exec()s another program.

Each test runs its own capture, filtered by its server's port.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

MIB = 1024 * 1024


def test_large_request_body(pyserver, probe_capture, http_client):
    with probe_capture("-P", str(pyserver.port)) as probe, http_client(pyserver) as client:
        observed = client.request("POST", "/big", b"b" * MIB)
    assert observed.status == 200
    server_span = probe.one("SERVER", "/big", pyserver.pid)
    client_span = probe.one("CLIENT", "/big", observed.pid)
    observed.check_server_span(server_span, pyserver)
    observed.check_client_span(client_span, pyserver)
    assert server_span["attributes"]["http.request.body.size"] == MIB
    assert client_span["attributes"]["http.request.body.size"] == MIB
    assert len(probe.spans) == 2


def test_chunked_response(pyserver, probe_capture, http_client):
    """``http.response.body.size`` counts chunk data, not chunk framing.

    http.client reads 8 KiB at a time: the capture size holds all of each
    read, so every chunk-size line is seen and the count can be exact.
    """
    count, size = 8, 1000
    capture = ("--capture-bytes", "16384", "-P", str(pyserver.port))
    with probe_capture(*capture) as probe, http_client(pyserver) as client:
        observed = client.request("GET", f"/chunked?n={count}&size={size}")
        after = client.request("GET", "/after-chunked")  # the chunked body ended where it should
    assert observed.status == 200
    server_span = probe.one("SERVER", "/chunked", pyserver.pid)
    client_span = probe.one("CLIENT", "/chunked", observed.pid)
    observed.check_server_span(server_span, pyserver)
    observed.check_client_span(client_span, pyserver)
    assert server_span["attributes"]["http.response.body.size"] == count * size
    assert client_span["attributes"]["http.response.body.size"] == count * size
    after.check_server_span(probe.one("SERVER", "/after-chunked", pyserver.pid), pyserver)
    after.check_client_span(probe.one("CLIENT", "/after-chunked", after.pid), pyserver)
    assert len(probe.spans) == 4


def test_chunked_body_past_the_capture_ends_at_its_last_chunk(pyserver, probe_capture, http_client):
    """64 KB of chunks against the default 4 KiB capture: past a message's
    first 4 KiB the kernel sends each call's last bytes, and both ends' spans
    end with the last chunk, out while the connection is still open."""
    count, size = 32, 2000
    with probe_capture("-P", str(pyserver.port)) as probe, http_client(pyserver) as client:
        observed = client.request("GET", f"/chunked?n={count}&size={size}")
        deadline = time.monotonic() + 15
        while probe.output.read_text().count('"/chunked"') < 2:  # url.path, both spans
            assert time.monotonic() < deadline, "the chunked exchange never ended"
            time.sleep(0.1)
        after = client.request("GET", "/after-chunked")  # the stream is in step again
    assert observed.status == 200
    server_span = probe.one("SERVER", "/chunked", pyserver.pid)
    client_span = probe.one("CLIENT", "/chunked", observed.pid)
    # The chunk sizes went uncaptured: the body's size counts their bytes too.
    observed.check_server_span(server_span, pyserver, lost="framing")
    observed.check_client_span(client_span, pyserver, lost="framing")
    for span in (server_span, client_span):
        assert span["attributes"]["http.response.body.size"] >= count * size
    after.check_server_span(probe.one("SERVER", "/after-chunked", pyserver.pid), pyserver)
    after.check_client_span(probe.one("CLIENT", "/after-chunked", after.pid), pyserver)
    assert len(probe.spans) == 4


def test_head_larger_than_capture(pyserver, probe_capture, http_client):
    """8 KiB of headers against the default 4 KiB capture: still one span, marked."""
    padding = {f"X-Padding-{i}": "p" * 1000 for i in range(8)}
    with probe_capture("-P", str(pyserver.port)) as probe, http_client(pyserver) as client:
        observed = client.request("GET", "/big-head", headers=padding)
    assert observed.status == 200
    server_span = probe.one("SERVER", "/big-head", pyserver.pid)
    client_span = probe.one("CLIENT", "/big-head", observed.pid)
    observed.check_server_span(server_span, pyserver, lost="head")
    observed.check_client_span(client_span, pyserver, lost="head")
    assert len(probe.spans) == 2


def test_keep_alive_connection(pyserver, probe_capture, http_client):
    paths = [f"/keep-alive/{i}" for i in range(200)]
    with probe_capture("-P", str(pyserver.port)) as probe, http_client(pyserver) as client:
        seen = [client.request("GET", path) for path in paths]
    assert {observed.status for observed in seen} == {200}
    assert len({observed.local_port for observed in seen}) == 1
    server_spans = probe.select("SERVER", pyserver.pid)
    client_spans = probe.select("CLIENT", os.getpid())
    assert [span["attributes"]["url.path"] for span in server_spans] == paths
    assert [span["attributes"]["url.path"] for span in client_spans] == paths
    for observed, server_span, client_span in zip(seen, server_spans, client_spans, strict=True):
        observed.check_server_span(server_span, pyserver)
        observed.check_client_span(client_span, pyserver)
    assert len(probe.spans) == 400


def test_over_the_exchange_rate_spans_stay_whole(pyserver, probe_capture, http_client):
    """At 10 exchanges a second, most of 200 requests sent back to back are
    shed in the kernel: each span traced is one request with its own answer,
    and what was shed is counted."""
    paths = [f"/limited/{i}" for i in range(200)]
    capture = ("-P", str(pyserver.port), "--max-exchange-rate", "10")
    with probe_capture(*capture) as probe, http_client(pyserver) as client:
        seen = {path: client.request("GET", path) for path in paths}
    for span in probe.spans:
        observed = seen[span["attributes"]["url.path"]]
        if span["kind"] == "SERVER":
            observed.check_server_span(span, pyserver)
        else:
            observed.check_client_span(span, pyserver)
    summary = probe.summary()
    assert summary["parse_errors"] == 0
    assert 0 < len(probe.spans) < 400 and summary["exchanges_shed"] > 0
    assert len(probe.spans) + summary["exchanges_shed"] == 400  # both ends of each request


def test_pipelined_requests(pyserver, probe_capture):
    """Five requests in one write; the server answers them one by one."""
    paths = [f"/pipelined/{i}" for i in range(5)]
    requests = b"".join(
        f"GET {path} HTTP/1.1\r\nHost: {pyserver.authority}\r\n".encode()
        + (b"Connection: close\r\n" if path == paths[-1] else b"")
        + b"\r\n"
        for path in paths
    )
    with (
        probe_capture("-P", str(pyserver.port)) as probe,
        socket.create_connection((pyserver.host, pyserver.port)) as sock,
    ):
        local_port = sock.getsockname()[1]
        sock.sendall(requests)
        answers = b"".join(iter(lambda: sock.recv(65536), b""))
    bodies = [f"GET {path} 0\n".encode() for path in paths]
    assert answers.count(b"HTTP/1.1 200 OK\r\n") == 5
    positions = [answers.index(body) for body in bodies]
    assert positions == sorted(positions)

    server_spans = probe.select("SERVER", pyserver.pid)
    assert [span["attributes"]["url.path"] for span in server_spans] == paths
    ends = [span["end_time_unix_nano"] for span in server_spans]
    assert ends == sorted(ends) and len(set(ends)) == 5
    for span in server_spans:
        assert span["attributes"]["client.port"] == local_port
        assert span["attributes"]["http.response.status_code"] == 200
    client_spans = probe.select("CLIENT", os.getpid())
    assert [span["attributes"]["url.path"] for span in client_spans] == paths
    assert len(probe.spans) == 10


def test_server_closes_without_answering(pyserver, probe_capture, http_client):
    with probe_capture("-P", str(pyserver.port)) as probe, http_client(pyserver) as client:
        observed = client.request("GET", "/close")
    assert observed.status is None and observed.error is not None
    server_span = probe.one("SERVER", "/close", pyserver.pid)
    client_span = probe.one("CLIENT", "/close", observed.pid)
    observed.check_server_span(server_span, pyserver)
    observed.check_client_span(client_span, pyserver)
    assert client_span["status_code"] == server_span["status_code"] == "ERROR"
    assert "http.response.status_code" not in client_span["attributes"]
    assert len(probe.spans) == 2


def test_connection_opened_before_the_probe(pyserver, probe_capture, http_client):
    """Requests after ``ready`` on an older connection: spans, with addresses."""
    with http_client(pyserver) as client:
        assert client.request("GET", "/before-probe").status == 200
        with probe_capture("-P", str(pyserver.port)) as probe:
            seen = [client.request("GET", f"/pre-existing/{i}") for i in range(3)]
    client_spans = probe.select("CLIENT", os.getpid())
    assert [span["attributes"]["url.path"] for span in client_spans] == [o.path for o in seen]
    for observed, span in zip(seen, client_spans, strict=True):
        observed.check_client_span(span, pyserver)
    # The server's thread was already blocked in read() when the probe attached,
    # so that one read's data may never reach the probe: the first request's
    # server span may be missing, every later one must be there.
    server_spans = probe.select("SERVER", pyserver.pid)
    paths = [span["attributes"]["url.path"] for span in server_spans]
    assert paths in ([o.path for o in seen], [o.path for o in seen[1:]])
    for span in server_spans:
        observed = next(o for o in seen if o.path == span["attributes"]["url.path"])
        observed.check_server_span(span, pyserver)
    assert not probe.select(path="/before-probe")


def test_ipv6_loopback(pyserver6, probe_capture, http_client):
    with probe_capture("-P", str(pyserver6.port)) as probe, http_client(pyserver6) as client:
        observed = client.request("GET", "/over-ipv6?x=1")
    assert observed.status == 200
    server_span = probe.one("SERVER", "/over-ipv6", pyserver6.pid)
    client_span = probe.one("CLIENT", "/over-ipv6", observed.pid)
    observed.check_server_span(server_span, pyserver6)
    observed.check_client_span(client_span, pyserver6)
    assert server_span["attributes"]["client.address"] == "::1"
    assert client_span["attributes"]["network.peer.address"] == "::1"
    expected_url = f"http://[::1]:{pyserver6.port}/over-ipv6?x=REDACTED"
    assert client_span["attributes"]["url.full"] == expected_url
    assert len(probe.spans) == 2


def test_concurrent_clients(pyserver, probe_capture, http_client):
    """50 clients at once, each on a connection and a path of its own."""
    count = 50
    seen = {}
    start = threading.Barrier(count)

    def one_client(index: int) -> None:
        with http_client(pyserver) as client:
            client.connect()
            start.wait()
            seen[index] = client.request("GET", f"/concurrent/{index}")

    with probe_capture("-P", str(pyserver.port)) as probe:
        threads = [threading.Thread(target=one_client, args=(i,)) for i in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(seen) == list(range(count))
    assert len({observed.local_port for observed in seen.values()}) == count
    for observed in seen.values():
        assert observed.status == 200
        observed.check_server_span(probe.one("SERVER", observed.path, pyserver.pid), pyserver)
        observed.check_client_span(probe.one("CLIENT", observed.path, observed.pid), pyserver)
    assert len(probe.select("SERVER")) == count
    assert len(probe.spans) == 2 * count


def test_slow_response_duration(pyserver, probe_capture, http_client):
    """The server span covers the server's own delay between request and answer."""
    delay_ms = 300
    with probe_capture("-P", str(pyserver.port)) as probe, http_client(pyserver) as client:
        observed = client.request("GET", f"/slow?ms={delay_ms}")
    server_span = probe.one("SERVER", "/slow", pyserver.pid)
    observed.check_server_span(server_span, pyserver)
    observed.check_client_span(probe.one("CLIENT", "/slow", observed.pid), pyserver)
    duration = server_span["end_time_unix_nano"] - server_span["start_time_unix_nano"]
    assert duration >= delay_ms * 1_000_000


def test_pid_filter(pyserver, probe_capture, http_client):
    """``-p`` keeps the server's spans and drops the client's, in this process."""
    with probe_capture("-p", str(pyserver.pid)) as probe, http_client(pyserver) as client:
        observed = client.request("GET", "/only-the-server")
    observed.check_server_span(probe.one("SERVER", "/only-the-server", pyserver.pid), pyserver)
    assert probe.select("CLIENT") == []
    assert {span["resource"]["process.pid"] for span in probe.spans} == {pyserver.pid}


def test_an_excluded_client_is_not_traced(pyserver, probe_capture, curl):
    """A plain name is left out in the kernel, a glob in user space: either way
    the server's span is there and curl's is not."""
    for index, pattern in enumerate(("curl", "cu?l")):
        port = str(pyserver.port)
        with probe_capture("-P", port, "--exclude-comm", pattern, "--link-wait-ms", "0") as probe:
            observed = curl(pyserver, "GET", f"/excluded/{index}")
        assert observed.status == 200
        server_span = probe.one("SERVER", f"/excluded/{index}", pyserver.pid)
        assert server_span["attributes"]["client.port"] == observed.local_port
        assert probe.select("CLIENT") == [], probe.describe()


def test_a_program_exec_d_after_a_call_gets_its_own_resource(pyserver, probe_capture):
    """A launcher (an entrypoint script, a secrets fetcher) makes a call, then
    exec()s the real program, which calls too: each span carries the
    executable that made the call, under the one pid."""
    url = f"http://127.0.0.1:{pyserver.port}"
    launcher = (
        "import os, sys, urllib.request\n"
        f"urllib.request.urlopen('{url}/before').read()\n"
        "sys.stdin.readline()\n"
        f"os.execvp('curl', ['curl', '-sS', '-o', '/dev/null', '{url}/after'])\n"
    )
    with probe_capture("-P", str(pyserver.port)) as probe:
        process = subprocess.Popen(
            [sys.executable, "-c", launcher], stdin=subprocess.PIPE, text=True
        )
        # The exec waits until the probe has described the launcher: a process
        # is read from /proc as its records are, and would be the new image by then.
        deadline = time.monotonic() + 30
        while b"/before" not in _read(probe.output) and time.monotonic() < deadline:
            time.sleep(0.05)
        process.communicate("go\n", timeout=30)
        assert process.returncode == 0
    before = probe.one("CLIENT", "/before", process.pid)
    after = probe.one("CLIENT", "/after", process.pid)
    assert before["resource"]["process.executable.path"] == os.path.realpath(sys.executable)
    # only the name: curl is often gone by the time its records are read, and
    # is then named as the kernel saw it, without a path or command line
    assert after["resource"]["process.executable.name"] == "curl"


def _read(path) -> bytes:
    return path.read_bytes() if path.exists() else b""
