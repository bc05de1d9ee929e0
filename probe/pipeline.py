"""The data's whole journey, wired once for every command.

kernel events (`EventSource`) -> HTTP exchanges (`ConnectionTracker`) ->
spans (`SpanBuilder`) -> span processors (console, JSON lines, OTLP). All
stages run on the one thread that polls the ring buffer; only OTLP export
has a thread of its own, behind its processor's queue.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from probe.export.processor import SpanProcessor
from probe.kernel import sockets
from probe.kernel.events import ConnOpen, Endpoint, KernelEvent, ProcessExit
from probe.kernel.loader import EventSource
from probe.protocol.model import HttpExchange
from probe.protocol.tracker import ConnectionTracker
from probe.stats import Stats
from probe.trace.builder import SpanBuilder
from probe.trace.clock import MonotonicClock
from probe.trace.resource import ResourceDetector
from probe.trace.span import Resource


@dataclass(frozen=True, slots=True)
class ProcessFilter:
    """Which processes to trace, by what the kernel cannot see cheaply: glob
    patterns on the process name and executable path, and container ids.
    Empty means everything."""

    comm_patterns: tuple[str, ...] = ()
    exe_patterns: tuple[str, ...] = ()
    container_ids: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.comm_patterns or self.exe_patterns or self.container_ids)

    def wants(self, resource: Resource) -> bool:
        attributes = resource.attributes
        name = str(attributes.get("process.executable.name", ""))
        path = str(attributes.get("process.executable.path", ""))
        container = str(attributes.get("container.id", ""))
        if self.comm_patterns and not any(fnmatch.fnmatch(name, p) for p in self.comm_patterns):
            return False
        if self.exe_patterns and not any(fnmatch.fnmatch(path, p) for p in self.exe_patterns):
            return False
        return not self.container_ids or any(
            container.startswith(wanted) for wanted in self.container_ids if wanted
        )


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
    ) -> None:
        self.source = source
        self.processors = list(processors)
        self.stats = stats
        self.resources = resources or ResourceDetector()
        self.process_filter = process_filter or ProcessFilter()
        self.builder = SpanBuilder(
            self.resources,
            MonotonicClock(),
            capture_credentials=capture_credentials,
            redact_query=redact_query,
            capture_headers=capture_headers,
        )
        self.tracker = ConnectionTracker(self._on_exchange, stats, resolve=_addresses)
        source.on_open = self._on_open

    def _on_open(self, event: ConnOpen) -> bool:
        """Describe the process while it is surely alive; filter by it."""
        resource = self.resources.detect(event.key.pid, event.comm)
        return not self.process_filter or self.process_filter.wants(resource)

    def _on_exchange(self, exchange: HttpExchange) -> None:
        span = self.builder.build(exchange)
        self.stats["spans_produced"] += 1
        for processor in self.processors:
            processor.on_end(span)

    def handle(self, event: KernelEvent) -> None:
        self.tracker.handle(event)
        if isinstance(event, ProcessExit):
            self.resources.forget(event.pid)

    def run(self, should_stop: Callable[[], bool], poll_ms: int = 100) -> None:
        """Poll, decode and process until ``should_stop()`` says so."""
        while not should_stop():
            for event in self.source.poll(poll_ms):
                self.handle(event)
            self.stats["connections_tracked"] = len(self.tracker)
            self.stats["events_lost"] = self.source.lost_events()

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
        for processor in self.processors:
            processor.shutdown(timeout_millis)
        self.stats["events_lost"] = self.source.lost_events()
