"""`probe capture`: watch HTTP traffic for a while, print spans, exit."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from probe.config import DEFAULT_EXCHANGE_RATE, ConfigError, load
from probe.export.console import ConsoleSpanExporter
from probe.export.jsonl import JsonLinesSpanExporter
from probe.export.otlp import create_processor
from probe.export.processor import SimpleSpanProcessor, SpanProcessor
from probe.export.tree import TraceGroupingProcessor, TreeExporter
from probe.kernel.features import ProbeError
from probe.kernel.loader import EventSource, ProbeOptions
from probe.pipeline import Pipeline, ProcessFilter, exporter_endpoints
from probe.stats import Stats
from probe.trace.linker import DEFAULT_WAIT_NS
from probe.trace.span import Span

EXAMPLES = """examples:
  probe capture                      # everything on this host, until Ctrl-C
  probe capture -d 10 -P 8080        # connections on port 8080, for 10 seconds
  probe capture -p 1234 -o jsonl     # process 1234, one JSON span per line
  probe capture -o tree -P 8080      # whole traces as waterfalls, slowest hop marked
  probe capture --comm nginx -c 100  # nginx processes, stop after 100 spans
"""


def add_filter_arguments(parser: argparse.ArgumentParser) -> None:
    """What to trace and how much (`run` takes these from its configuration)."""
    parser.add_argument(
        "-p",
        "--pid",
        type=int,
        action="append",
        default=[],
        help="trace only this process (repeatable)",
    )
    parser.add_argument(
        "-P",
        "--port",
        type=int,
        action="append",
        default=[],
        help="trace only connections with this local or remote port (repeatable)",
    )
    parser.add_argument("--comm", help="trace only processes with this name (as in ps)")
    parser.add_argument(
        "--exclude-comm",
        action="append",
        default=[],
        metavar="GLOB",
        help="never trace processes whose name matches (repeatable)",
    )
    parser.add_argument(
        "--capture-bytes",
        type=int,
        default=4096,
        metavar="N",
        help="payload bytes copied per message (default 4096)",
    )
    parser.add_argument("--capture-credentials", action="store_true",
                        help="export credential headers and raw query strings "
                             "(redacted by default)")  # fmt: skip


def add_link_wait_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--link-wait-ms",
        type=int,
        default=DEFAULT_WAIT_NS // 1_000_000,
        metavar="MS",
        help="how long a span may wait for its parent to be seen before it is exported "
        f"as a root (default {DEFAULT_WAIT_NS // 1_000_000})",
    )


def add_exchange_rate_argument(parser: argparse.ArgumentParser, default: int | None) -> None:
    parser.add_argument(
        "--max-exchange-rate",
        dest="max_exchange_rate",
        type=int,
        default=default,
        metavar="N",
        help="trace at most N request/response exchanges a second, host-wide; the kernel "
        f"sheds the rest whole and counts them (default {DEFAULT_EXCHANGE_RATE}; 0: no limit)",
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "capture",
        help="watch HTTP traffic for a while, print spans, exit",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_filter_arguments(parser)
    parser.add_argument(
        "-d", "--duration", type=float, metavar="SECONDS", help="stop after this many seconds"
    )
    parser.add_argument(
        "-c", "--max-spans", type=int, metavar="N", help="stop after this many spans"
    )
    parser.add_argument(
        "-o",
        "--format",
        choices=("table", "jsonl", "tree"),
        default="table",
        help="output format (default: table; tree: one waterfall per trace)",
    )
    add_link_wait_argument(parser)
    add_exchange_rate_argument(parser, DEFAULT_EXCHANGE_RATE)
    parser.add_argument("--output", metavar="FILE", help="write spans here, not to stdout")
    parser.add_argument("--otlp-endpoint", metavar="URL",
                        help="also export spans over OTLP (protocol and the rest from OTEL_* "
                             "variables)")  # fmt: skip
    parser.set_defaults(command=run)


def probe_options(args: argparse.Namespace) -> ProbeOptions:
    return ProbeOptions(
        capture_bytes=args.capture_bytes,
        exchange_rate=args.max_exchange_rate,
        pids=tuple(args.pid),
        ports=tuple(args.port),
        comm=args.comm,
        excluded_comms=plain_names(args.exclude_comm),
    )


def plain_names(patterns: Sequence[str]) -> tuple[str, ...]:
    """The patterns that are plain process names, which the kernel can match;
    globs are matched in user space (ProcessFilter)."""
    return tuple(p for p in patterns if not any(c in p for c in "*?["))


class StopFlag:
    """Set by SIGINT/SIGTERM, a deadline or a span budget."""

    def __init__(self, duration: float | None = None) -> None:
        self.stopped = False
        self.deadline = time.monotonic() + duration if duration is not None else None
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, _signum: int, _frame: object) -> None:
        self.stopped = True

    def __call__(self) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.stopped = True
        return self.stopped


def print_summary(stats: Stats, stream: TextIO = sys.stderr) -> None:
    print(
        f"events seen: {stats['events']}, events lost: {stats['events_lost']}, "
        f"parse errors: {stats['parse_errors']}, spans: {stats['spans_produced']}, "
        f"exchanges shed: {stats['exchanges_shed']}",
        file=stream,
    )
    # Calls on connections whose first bytes were not HTTP's: no events at all.
    print(
        f"not HTTP withheld: {stats['not_http_withheld']}, "
        f"TLS ciphertext withheld: {stats['tls_ciphertext_dropped']}",
        file=stream,
    )
    counts = [
        f"{rule.replace('_', ' ')} {stats[f'links_{rule}']}"
        for rule in ("thread", "goroutine", "traceparent", "same_host", "inferred", "none")
    ]
    counts[2] += f" ({stats['traceparent_malformed']} malformed)"
    print(f"links: {', '.join(counts)}", file=stream)


def open_output(path: str | None, stack: contextlib.ExitStack) -> TextIO:
    if path is None:
        return sys.stdout
    return stack.enter_context(open(path, "w", encoding="utf-8"))


class SpanBudget:
    """Passes the first ``limit`` spans (all if None) to its processors."""

    def __init__(self, limit: int | None, processors: list[SpanProcessor]) -> None:
        self.limit = limit
        self.processors = processors
        self.passed = 0

    @property
    def spent(self) -> bool:
        return self.limit is not None and self.passed >= self.limit

    def on_end(self, span: Span) -> None:
        if self.spent:
            return
        self.passed += 1
        for processor in self.processors:
            processor.on_end(span)

    def force_flush(self, timeout_millis: float = 30_000) -> bool:
        return all(p.force_flush(timeout_millis) for p in self.processors)

    def shutdown(self, timeout_millis: float = 30_000) -> bool:
        return all([p.shutdown(timeout_millis) for p in self.processors])


def run(args: argparse.Namespace) -> int:
    stats = Stats()
    stop = StopFlag(args.duration)
    with contextlib.ExitStack() as stack:
        output = open_output(args.output, stack)
        link_wait_ns = args.link_wait_ms * 1_000_000
        on_tick = []
        processors: list[SpanProcessor] = []
        if args.format == "tree":
            trees = TraceGroupingProcessor(TreeExporter(output), wait_ns=link_wait_ns)
            processors.append(trees)
            on_tick.append(trees.tick)
        else:
            exporter_class = (
                JsonLinesSpanExporter if args.format == "jsonl" else ConsoleSpanExporter
            )
            processors.append(SimpleSpanProcessor(exporter_class(output)))
        if args.otlp_endpoint:
            try:
                config = load({"otlp_endpoint": args.otlp_endpoint}, os.environ)
            except ConfigError as error:
                print(f"probe: configuration: {error}", file=sys.stderr)
                return 2
            processors.append(create_processor(config, stats))
        budget = SpanBudget(args.max_spans, processors)
        source = EventSource(probe_options(args), stats)
        try:
            source.start()
        except ProbeError as error:
            print(f"probe: {error}", file=sys.stderr)
            return 1
        stack.callback(source.close)
        for note in source.notes:
            print(f"probe: {note}", file=sys.stderr)
        print("Tracing HTTP... Ctrl-C to end.", file=sys.stderr)
        print("ready", file=sys.stderr, flush=True)
        pipeline = Pipeline(
            source,
            [budget],
            stats,
            capture_credentials=args.capture_credentials,
            redact_query=not args.capture_credentials,
            process_filter=ProcessFilter(exclude_comm_patterns=tuple(args.exclude_comm)),
            link_wait_ns=link_wait_ns,
            on_tick=on_tick,
            untraced_endpoints=exporter_endpoints(args.otlp_endpoint) if args.otlp_endpoint else (),
        )
        pipeline.run(lambda: stop() or budget.spent)
        pipeline.finish()
    print_summary(stats)
    return 0
