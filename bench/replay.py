"""What the probe's user space costs per request, without the kernel or a load.

``python -m bench.replay`` builds the ring-buffer records that the kernel
would send for nginx-like traffic (laid out by ``bpf/probe.h``, through cffi),
and plays them through the probe's own reader, decoder and pipeline on this
thread, as `Pipeline.run` would, and encodes the spans it makes as the export
thread would (OTLP protobuf, 512 to a request). It prints the CPU time per
request of the two, the median over repeats, and one JSON document.

Two patterns: ``keepalive``, many requests on one connection, and ``close``,
one connection per request (its OPEN and CLOSE records too). The figures are
repeatable to a few per cent from run to run, where ``make bench``'s vary by
tens: use it to measure a change to user space, and ``make bench`` for what
the whole probe costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from probe.commands.run import settle_heap
from probe.export.otlp_wire import TraceRequestEncoder
from probe.export.processor import SpanProcessor
from probe.kernel.contract import ffi, lib
from probe.kernel.decode import RecordReader
from probe.kernel.loader import EventSource, ProbeOptions
from probe.pipeline import Pipeline, ProcessFilter
from probe.stats import Stats
from probe.trace.span import Span

REQUEST = (
    b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
    b"User-Agent: h2load nghttp2/1.52.0\r\nAccept: */*\r\n\r\n"
)
BODY = b"x" * 615
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\n"
    b"Date: Thu, 26 Nov 2026 16:00:00 GMT\r\nContent-Type: text/html\r\n"
    b"Content-Length: %d\r\nConnection: keep-alive\r\nAccept-Ranges: bytes\r\n\r\n" % len(BODY)
) + BODY
SERVER_PORT = 8080
EXPORT_BATCH = 512  # spans per request, as BatchSpanProcessor sends them
READ_BATCH = 512  # records per poll, about what a poll reads at 5,000 requests/s
PID = os.getpid()  # the resource detector reads /proc: a process that exists


def _fill_header(header, kind: int, fd: int, generation: int, at_ns: int) -> None:
    header.type = kind
    header.tid = PID
    header.conn.pid = PID
    header.conn.fd = fd
    header.conn.generation = generation
    header.timestamp_ns = at_ns


def _open_record(fd: int, generation: int, peer_port: int) -> bytes:
    record = ffi.new("struct probe_conn_event *")
    _fill_header(record.header, lib.PROBE_EVENT_OPEN, fd, generation, generation)
    for endpoint, port in ((record.local, SERVER_PORT), (record.peer, peer_port)):
        endpoint.family = lib.PROBE_AF_INET
        endpoint.port = port
        endpoint.addr[0:4] = [127, 0, 0, 1]
    record.role = lib.PROBE_ROLE_SERVER
    record.comm = b"nginx"
    return bytes(ffi.buffer(record))


def _data_record(fd: int, generation: int, at_ns: int, direction: int, payload: bytes) -> bytes:
    record = ffi.new("struct probe_data_event *")
    _fill_header(record.header, lib.PROBE_EVENT_DATA, fd, generation, at_ns)
    record.exit_ns = at_ns + 1_000
    record.bytes = len(payload)
    record.captured = len(payload)
    record.direction = direction
    record.role = lib.PROBE_ROLE_SERVER
    ingress = direction == lib.PROBE_INGRESS
    record.syscall = lib.PROBE_SYS_RECVFROM if ingress else lib.PROBE_SYS_WRITEV
    header = bytes(ffi.buffer(record))[: ffi.offsetof("struct probe_data_event", "payload")]
    return header + payload


def _close_record(fd: int, generation: int, at_ns: int) -> bytes:
    record = ffi.new("struct probe_event_header *")
    _fill_header(record, lib.PROBE_EVENT_CLOSE, fd, generation, at_ns)
    return bytes(ffi.buffer(record))


def records_of(pattern: str, requests: int) -> int:
    """How many of `records`' first records are those of ``requests`` requests."""
    return 1 + 2 * requests if pattern == "keepalive" else 4 * requests


def records(pattern: str, requests: int) -> list[bytes]:
    """The kernel's records for ``requests`` requests, 10 us apart."""
    start = time.monotonic_ns()
    out = []
    if pattern == "keepalive":
        out.append(_open_record(10, start, 40_000))
    for n in range(requests):
        at = start + n * 10_000
        fd, generation = (10, start) if pattern == "keepalive" else (10 + n % 1000, at)
        if pattern == "close":
            out.append(_open_record(fd, generation, 30_000 + n % 30_000))
        out.append(_data_record(fd, generation, at + 1, lib.PROBE_INGRESS, REQUEST))
        out.append(_data_record(fd, generation, at + 2, lib.PROBE_EGRESS, RESPONSE))
        if pattern == "close":
            out.append(_close_record(fd, generation, at + 3))
    return out


class _Encode:
    """A span processor that encodes what it is given, EXPORT_BATCH at a time
    (as the export thread does, so that as few spans are alive at once), and
    counts the CPU time that took apart."""

    def __init__(self) -> None:
        self.encoder = TraceRequestEncoder()
        self.pending: list[Span] = []
        self.spans = 0
        self.seconds = 0.0

    def on_end(self, span: Span) -> None:
        self.pending.append(span)
        self.spans += 1
        if len(self.pending) >= EXPORT_BATCH:
            self.force_flush()

    def force_flush(self, timeout_millis: float = 30_000) -> bool:
        started = time.process_time()
        if self.pending:
            self.encoder.encode(self.pending)
        self.pending = []
        self.seconds += time.process_time() - started
        return True

    def shutdown(self, timeout_millis: float = 30_000) -> bool:
        return self.force_flush()


def pipeline_for(processor: SpanProcessor, stats: Stats) -> tuple[Pipeline, RecordReader]:
    """A pipeline into ``processor`` and the per-record callback libbcc would call."""
    source = EventSource(ProbeOptions(), stats)
    # A filter, as a daemon run with --exclude-comm has; no wait for parents.
    excluded = ProcessFilter(exclude_comm_patterns=("wrk", "h2load"))
    pipeline = Pipeline(source, [processor], stats, process_filter=excluded, link_wait_ns=0)
    return pipeline, source._reader


def play(recorded: Sequence[bytes], pipeline: Pipeline, reader: RecordReader) -> None:
    """``recorded`` through ``reader`` and ``pipeline``, as `Pipeline.run` takes them."""
    for first in range(0, len(recorded), READ_BATCH):
        for record in recorded[first : first + READ_BATCH]:
            reader(None, record, len(record))
        batch, reader.batch = reader.batch, []
        for event in batch:
            pipeline.handle(event)
        pipeline.tick()


def replay(recorded: Sequence[bytes]) -> tuple[float, _Encode]:
    """CPU seconds to read, decode and process ``recorded``, and the encoder
    that took the spans (its own time not counted in the first)."""
    encode = _Encode()
    pipeline, reader = pipeline_for(encode, Stats())
    started = time.process_time()
    play(recorded, pipeline, reader)
    encode.force_flush()
    return time.process_time() - started - encode.seconds, encode


def measure(pattern: str, requests: int, repeats: int) -> dict[str, Any]:
    recorded = records(pattern, requests)
    pipeline_us, encode_us = [], []
    for _ in range(repeats):
        seconds, encode = replay(recorded)
        if encode.spans != requests:
            made = f"{encode.spans} spans for {requests} requests"
            raise SystemExit(f"bench.replay: {pattern}: {made}")
        pipeline_us.append(seconds * 1e6 / requests)
        encode_us.append(encode.seconds * 1e6 / requests)
    return {
        "requests": requests,
        "records": len(recorded),
        "pipeline_us_per_request": round(statistics.median(pipeline_us), 3),
        "encode_us_per_request": round(statistics.median(encode_us), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    settle_heap()  # as probe run does once started
    results = {
        pattern: measure(pattern, args.requests, args.repeats) for pattern in ("keepalive", "close")
    }
    for pattern, figures in results.items():
        print(
            f"bench.replay: {pattern}: pipeline {figures['pipeline_us_per_request']:.2f} us, "
            f"encode {figures['encode_us_per_request']:.2f} us per request "
            f"(median of {args.repeats}, {figures['records']} records)",
            file=sys.stderr,
        )
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
