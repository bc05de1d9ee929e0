"""Instructions the probe's user space executes per request, counted by callgrind.

``python -m bench.instructions`` plays `bench.replay`'s records through the
probe's reader, pipeline and a `BatchSpanProcessor` whose exporter encodes
each batch as OTLP and sends nothing: what `probe run` does with a request
but the kernel and the network. It runs that under valgrind's callgrind twice
per pattern, once with ``--requests`` and once with twice as many, and
prints the difference per request (start-up, imports and the records' making
cancel out). An instruction count does not vary with the machine's load
where timings on this VM vary by tens of per cent from one minute to the
next: use it to compare two builds of a change to user space (its effect on
cache misses and the kernel still wants `make bench`). Needs valgrind (Debian
package `valgrind`, which `make setup` installs); about two minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from typing import Any

PATTERNS = ("keepalive", "close")
_COLLECTED = re.compile(r"Collected : (\d+)")


def parse_collected(stderr: str) -> int:
    """The instructions callgrind reports having counted (its "Collected" line)."""
    match = _COLLECTED.search(stderr)
    if match is None:
        raise ValueError(f"no 'Collected' line in callgrind's output: {stderr[-500:]!r}")
    return int(match.group(1))


def per_request(fewer: int, more: int, requests: int) -> float:
    """Instructions a request: what ``requests`` more requests added to a run."""
    if more <= fewer:
        raise ValueError(f"{requests} more requests counted {more - fewer} instructions")
    return (more - fewer) / requests


def _count(pattern: str, requests: int, total: int) -> int:
    """Instructions of a whole run that plays the first ``requests`` of ``total``."""
    argv = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "bench.instructions",
        "--play",
        pattern,
        str(requests),
        str(total),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench.instructions: {pattern}: {done.stderr[-2000:]}")
    return parse_collected(done.stderr)


def _play(pattern: str, requests: int, total: int) -> None:
    """The child: the records of ``total`` requests made, the first ``requests``' played."""
    # Imported here: the parent only starts valgrind.
    from bench import replay
    from probe.commands.run import settle_heap
    from probe.export.batch import SUCCESS, BatchSpanProcessor, SendOutcome
    from probe.export.otlp_wire import TraceRequestEncoder
    from probe.stats import Stats

    class Discarding:
        """Encodes as the OTLP exporters do; sends nothing."""

        def __init__(self) -> None:
            self.encoder = TraceRequestEncoder()
            self.spans = 0

        def encode(self, spans: Any) -> bytes:
            self.spans += len(spans)
            return self.encoder.encode(spans)

        def send(self, request: Any, timeout: float | None = None) -> SendOutcome:
            return SUCCESS

        def shutdown(self) -> None:
            pass

    records = replay.records(pattern, total)[: replay.records_of(pattern, requests)]
    settle_heap()  # as probe run does once started
    stats = Stats()
    exporter = Discarding()
    processor = BatchSpanProcessor(exporter, stats, max_queue_size=8192)
    pipeline, reader = replay.pipeline_for(processor, stats)
    replay.play(records, pipeline, reader)
    processor.force_flush()
    processor.shutdown()
    if exporter.spans != requests:
        raise SystemExit(f"bench.instructions: {exporter.spans} spans for {requests} requests")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("--requests", type=int, default=2_000)
    parser.add_argument("--play", nargs=3, metavar=("PATTERN", "REQUESTS", "TOTAL"))
    args = parser.parse_args(argv)
    if args.play:
        pattern, requests, total = args.play
        _play(pattern, int(requests), int(total))
        return 0
    os.environ.setdefault("PYTHONHASHSEED", "0")  # the same dicts and sets in every run
    results = {}
    for pattern in PATTERNS:
        fewer = _count(pattern, args.requests, 2 * args.requests)
        more = _count(pattern, 2 * args.requests, 2 * args.requests)
        results[pattern] = round(per_request(fewer, more, args.requests))
        print(
            f"bench.instructions: {pattern}: {results[pattern]:,} instructions a request",
            file=sys.stderr,
        )
    print(json.dumps({"instructions_per_request": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
