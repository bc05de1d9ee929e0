"""The data's whole journey, wired once for every command.

kernel events (`EventSource`) -> HTTP exchanges (`ConnectionTracker`) ->
spans (`SpanBuilder`) -> traces (`SpanLinker`, told of each request as it
starts) -> span processors (console, JSON lines, trees, OTLP). All stages run
on the one thread that polls the ring buffer; only OTLP export has a thread
of its own, behind its processor's queue.
"""

from __future__ import annotations

import fnmatch
import logging
import socket
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

from probe.export.otlp import USER_AGENT
from probe.export.processor import SpanProcessor
from probe.kernel import sockets
from probe.kernel.elf import is_go_binary
from probe.kernel.events import ConnOpen, Endpoint, KernelEvent, ProcessExec, ProcessExit
from probe.kernel.loader import EventSource
from probe.protocol.model import ConnectionInfo, HttpExchange, HttpRequest
from probe.protocol.tracker import ConnectionTracker
from probe.stats import Stats
from probe.trace.builder import SpanBuilder
from probe.trace.clock import MonotonicClock
from probe.trace.linker import DEFAULT_WAIT_NS, SpanLinker
from probe.trace.resource import ResourceDetector
from probe.trace.span import Resource, Span

log = logging.getLogger(__name__)

# The kernel's counters are read this often while records come, and every
# KERNEL_COUNTERS_QUIET_S while none do: a reading of the cold maps costs an
# idle probe about 0.1 ms of CPU on the VM this was measured on, and what
# counts with no record (bytes that are not HTTP, TLS ciphertext) can wait.
KERNEL_COUNTERS_INTERVAL_S: Final = 1.0
KERNEL_COUNTERS_QUIET_S: Final = 10.0
# Shedding over the exchange rate limit goes on as long as the load does: it
# is told at most this often.
SHED_WARNING_INTERVAL_S: Final = 60.0
# How long a poll waits for the kernel's wakeup. Below the rate at which the
# kernel wakes the reader (bpf/common.h, emit_record(): a share of the ring
# buffer written, or a record that cannot wait), records are read this often:
# a wakeup of the thread costs about 0.1 ms of CPU on the VM this was measured
# on, warming caches included, and at 1,000 requests/s 500 ms rather than
# 100 ms cost 1.9 us less per request (15.7 against 17.6, 4 runs each).
POLL_MS: Final = 500


# Process descriptions whose ProcessFilter verdict is kept: far more than the
# distinct executables on a node; past it the verdicts start over.
MAX_FILTER_VERDICTS = 4096
# Resources whose verdict is kept by identity, each held (a few KB at most):
# the processes opening connections lately.
MAX_FILTER_RESOURCES = 1024


@dataclass(frozen=True, slots=True)
class ProcessFilter:
    """Which processes to trace, by what the kernel cannot see cheaply: glob
    patterns on the process name and executable path, and container ids.
    Empty means everything; a name matching an exclusion is never traced."""

    comm_patterns: tuple[str, ...] = ()
    exe_patterns: tuple[str, ...] = ()
    container_ids: tuple[str, ...] = ()
    exclude_comm_patterns: tuple[str, ...] = ()
    # (name, path, container) -> verdict: asked at every connection, and the
    # globs cost 0.5-0.9 us a connection, for the few distinct answers a node has.
    _verdicts: dict[tuple[str, str, str], bool] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )
    # id(resource) -> (the resource, its verdict): a process's connections bring
    # the one Resource its detector keeps (a new connection per request asked
    # `_verdicts` by a tuple of three attributes made and hashed each time).
    # Each entry holds its resource, so that its id is no other's meanwhile.
    _by_resource: dict[int, tuple[Resource, bool]] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    def __bool__(self) -> bool:
        return bool(
            self.comm_patterns
            or self.exe_patterns
            or self.container_ids
            or self.exclude_comm_patterns
        )

    def wants(self, resource: Resource) -> bool:
        known = self._by_resource.get(id(resource))
        if known is not None and known[0] is resource:
            return known[1]
        verdict = self._verdict(resource)
        if len(self._by_resource) >= MAX_FILTER_RESOURCES:
            self._by_resource.clear()
        self._by_resource[id(resource)] = (resource, verdict)
        return verdict

    def _verdict(self, resource: Resource) -> bool:
        attributes = resource.attributes
        described = (
            str(attributes.get("process.executable.name", "")),
            str(attributes.get("process.executable.path", "")),
            str(attributes.get("container.id", "")),
        )
        verdict = self._verdicts.get(described)
        if verdict is None:
            if len(self._verdicts) >= MAX_FILTER_VERDICTS:
                self._verdicts.clear()
            verdict = self._verdicts[described] = self._judge(*described)
        return verdict

    def _judge(self, name: str, path: str, container: str) -> bool:
        if any(fnmatch.fnmatch(name, p) for p in self.exclude_comm_patterns):
            return False
        if self.comm_patterns and not any(fnmatch.fnmatch(name, p) for p in self.comm_patterns):
            return False
        if self.exe_patterns and not any(fnmatch.fnmatch(path, p) for p in self.exe_patterns):
            return False
        return not self.container_ids or any(
            container.startswith(wanted) for wanted in self.container_ids if wanted
        )


def exporter_endpoints(endpoint: str) -> frozenset[Endpoint]:
    """The addresses and port of an OTLP endpoint (a URL, or gRPC's bare
    ``host:port``), resolved now; empty if it does not resolve.

    Connections to them are not traced. On this host the collector's end of
    each export would otherwise be an HTTP exchange like any other: a span
    per export, exported in turn, and so on for as long as the probe runs."""
    url = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
    if url.hostname is None:
        return frozenset()
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
        found = socket.getaddrinfo(url.hostname, port, type=socket.SOCK_STREAM)
    except (OSError, ValueError) as error:
        log.info("%s does not resolve (%s): exports to it may be traced", endpoint, error)
        return frozenset()
    return frozenset(Endpoint(str(address[0]), port) for *_, address in found)


# The User-Agent of every probe's exporter, whatever its version.
_EXPORTER_AGENT: Final = USER_AGENT.split("/", 1)[0] + "/"


def is_own_export(request: HttpRequest) -> bool:
    """An OTLP/HTTP export of a probe's, this one's or another node's, wherever it
    arrives: a collector on this node reached at an address `exporter_endpoints` does
    not know (a Service's, a hostPort), or this node's collector receiving from
    others. Its span would be exported in turn, and received, without end. The
    method is compared first: the header is looked up for POSTs only."""
    if request.method != "POST":
        return False
    agent = request.header("user-agent")
    return agent is not None and agent.startswith(_EXPORTER_AGENT)


def _addresses(pid: int, fd: int) -> tuple[Endpoint | None, Endpoint | None]:
    """For a connection whose open event was lost: ask /proc."""
    found = sockets.lookup(pid, fd)
    return found.local, found.peer


class Pipeline:
    def __init__(
        self,
        source: EventSource,
        processors: Sequence[SpanProcessor],
        stats: Stats,
        *,
        resources: ResourceDetector | None = None,
        process_filter: ProcessFilter | None = None,
        capture_credentials: bool = False,
        redact_query: bool = True,
        capture_headers: Sequence[str] = (),
        link_wait_ns: int = DEFAULT_WAIT_NS,
        on_tick: Sequence[Callable[[], None]] = (),
        untraced_endpoints: Collection[Endpoint] = (),
    ) -> None:
        """``on_tick`` callbacks run after every poll, e.g. to print traces whose wait is
        over; connections with either end at one of ``untraced_endpoints`` (the span
        exporter's, `exporter_endpoints`) are not traced."""
        self.source = source
        self.processors = list(processors)
        self.on_tick = list(on_tick)
        self.stats = stats
        self.resources = resources or ResourceDetector()
        self.process_filter = process_filter or ProcessFilter()
        self.untraced_endpoints = frozenset(untraced_endpoints)
        self.builder = SpanBuilder(
            self.resources,
            MonotonicClock(),
            capture_credentials=capture_credentials,
            redact_query=redact_query,
            capture_headers=capture_headers,
        )
        self.linker = SpanLinker(
            self._export,
            stats,
            wait_ns=link_wait_ns,
            is_go=_is_go,
            client_end=self._has_client_end,
        )
        self.tracker = ConnectionTracker(
            self._on_exchange, stats, resolve=_addresses, on_request=self._request_started
        )
        source.on_open = self._on_open
        self._shed_told = 0  # exchanges_shed when shedding was last told
        self._shed_told_at = -SHED_WARNING_INTERVAL_S

    def _on_open(self, event: ConnOpen) -> bool:
        """Describe the process while it is surely alive; filter by it."""
        untraced = self.untraced_endpoints
        if untraced and (event.local in untraced or event.peer in untraced):
            return False
        resource = self.resources.detect(event.key.pid, event.comm, event.image)
        return not self.process_filter or self.process_filter.wants(resource)

    def _has_client_end(self, server: ConnectionInfo) -> bool:
        return self.tracker.has_client_end(server)

    def _request_started(self, connection: ConnectionInfo, request: HttpRequest) -> None:
        if not is_own_export(request):  # no context: its process's other calls are roots
            self.linker.request_started(connection, request)

    def _on_exchange(self, exchange: HttpExchange) -> None:
        if is_own_export(exchange.request):
            self.stats["own_exports_untraced"] += 1
            return
        span = self.builder.build(exchange)
        self.stats["spans_produced"] += 1
        self.linker.span_ended(exchange, span)

    def _export(self, span: Span) -> None:
        for processor in self.processors:
            processor.on_end(span)

    def handle(self, event: KernelEvent) -> None:
        self.tracker.handle(event)
        if isinstance(event, ProcessExit):
            self.resources.forget(event.pid)
            self.linker.process_exited(event.pid)
        elif isinstance(event, ProcessExec):
            self.resources.executed(event.pid, event.image)

    def tick(self) -> None:
        """Time passed: spans and traces whose wait is over go out."""
        self.linker.expire()
        for callback in self.on_tick:
            callback()

    def run(self, should_stop: Callable[[], bool], poll_ms: int = POLL_MS) -> None:
        """Poll, decode and process until ``should_stop()`` says so."""
        counters_read_at = -KERNEL_COUNTERS_QUIET_S
        records_then = -1  # records read when the counters were
        while not should_stop():
            for event in self.source.poll(poll_ms):
                self.handle(event)
            self.tick()
            self.stats["connections_tracked"] = len(self.tracker)
            # Under load a poll returns every few records; the kernel's
            # counters are a map read per CPU each, so they are read once a
            # second (every KERNEL_COUNTERS_QUIET_S while no record comes).
            now = time.monotonic()
            records = self.source.stats["events"]
            quiet = records == records_then
            if now - counters_read_at >= (
                KERNEL_COUNTERS_QUIET_S if quiet else KERNEL_COUNTERS_INTERVAL_S
            ):
                self._read_kernel_counters()
                counters_read_at, records_then = now, records

    def _read_kernel_counters(self) -> None:
        counters = self.source.kernel_counters()
        lost = counters["events_lost"]
        if lost > self.stats["events_lost"]:
            log.warning(
                "the kernel dropped %d events: the ring buffer was full (%d in all); "
                "spans of those requests are missing or incomplete",
                lost - self.stats["events_lost"],
                lost,
            )
        shed = counters["exchanges_shed"]
        now = time.monotonic()
        if shed > self._shed_told and now - self._shed_told_at >= SHED_WARNING_INTERVAL_S:
            limit, most = self.source.exchange_rate, self.source.options.exchange_rate
            log.warning(
                "over the limit of %d exchanges a second%s: %d exchanges shed in the kernel, "
                "not traced (%d in all); --max-exchange-rate or capture.max_exchange_rate "
                "raises it",
                limit,
                f" (lowered from {most} while the CPU is short)" if limit < most else "",
                shed - self._shed_told,
                shed,
            )
            self._shed_told, self._shed_told_at = shed, now
        for name, value in counters.items():  # totals: set, not added
            self.stats[name] = value

    def drain(self) -> None:
        """Process what the kernel has already written: a stop right after
        traffic must not lose its last events."""
        while batch := self.source.poll(0):
            for event in batch:
                self.handle(event)

    def finish(self, timeout_millis: float = 10_000) -> None:
        """Read what is left, complete what is pending, flush every processor."""
        self.drain()
        self.tracker.flush()
        self.linker.flush()
        for processor in self.processors:
            processor.shutdown(timeout_millis)
        self._read_kernel_counters()


def _is_go(pid: int) -> bool:
    """Go's threads say nothing of which request they serve: the linker must know."""
    return is_go_binary(f"/proc/{pid}/exe")
