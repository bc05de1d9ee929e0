"""Traffic that is not HTTP must yield no spans and must not stop the probe."""

from __future__ import annotations

import random
import socket

# Each is the first thing a client sends on a fresh connection to the echo
# server, which sends it straight back: neither direction is HTTP.
GARBAGE = {
    "random binary": random.Random(1).randbytes(64 * 1024),
    "TLS ClientHello": bytes.fromhex("160301020001000200fc0303") + random.Random(2).randbytes(500),
    "NUL bytes": b"\x00" * 4096,
    "broken request line": b"G\x00T /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad header block": b"GETX / HTTP/1.1\r\n\x7f\x01: \x02\r\n\r\n",
    "bad version": b"GET / HTTP/7.q\r\n\r\n",
    "endless line": b"A" * 20_000,
    "lonely newlines": b"\r\n" * 3000,
}


def echo(server, data: bytes) -> bytes:
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: sock.recv(65536), b""))


def test_garbage_yields_no_spans(echoserver, pyserver, probe_capture, http_client):
    with probe_capture("-P", str(echoserver.port), "-P", str(pyserver.port)) as probe:
        for name, data in GARBAGE.items():
            assert echo(echoserver, data) == data, name
        # The probe still traces HTTP after all of that.
        with http_client(pyserver) as client:
            observed = client.request("GET", "/after-garbage")
    assert observed.status == 200
    observed.check_server_span(probe.one("SERVER", "/after-garbage", pyserver.pid), pyserver)
    observed.check_client_span(probe.one("CLIENT", "/after-garbage", observed.pid), pyserver)
    assert len(probe.spans) == 2, probe.describe()
    summary = probe.summary()
    assert "parse_errors" in summary, f"no parse error count in the summary:\n{probe.stderr}"
    # Request lines httptools rejects reach user space and count as parse
    # errors; bytes that start no request line never leave the kernel.
    assert summary["parse_errors"] >= 1
    assert summary["not_http_withheld"] >= 1, probe.stderr
