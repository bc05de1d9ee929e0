"""The data's whole journey, wired once for every command.

kernel events (`EventSource`) -> HTTP exchanges (`ConnectionTracker`) ->
spans (`SpanBuilder`) -> span processors (console, JSON lines, OTLP). All
stages run on the one thread that polls the ring buffer; only OTLP export
has a thread of its own, behind its processor's queue.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from probe.export.processor import SpanProcessor
from probe.kernel.events import ConnOpen, KernelEvent, ProcessExit
from probe.kernel.loader import EventSource
from probe.protocol.model import HttpExchange
from probe.protocol.tracker import ConnectionTracker
from probe.stats import Stats
from probe.trace.builder import SpanBuilder
from probe.trace.clock import MonotonicClock
from probe.trace.resource import ResourceDetector


class Pipeline:
    def __init__(
        self,
        source: EventSource,
        processors: Sequence[SpanProcessor],
        stats: Stats,
        *,
        resources: ResourceDetector | None = None,
        capture_credentials: bool = False,
        redact_query: bool = True,
        capture_headers: Sequence[str] = (),
    ) -> None:
        self.source = source
        self.processors = list(processors)
        self.stats = stats
        self.resources = resources or ResourceDetector()
        self.builder = SpanBuilder(
            self.resources,
            MonotonicClock(),
            capture_credentials=capture_credentials,
            redact_query=redact_query,
            capture_headers=capture_headers,
        )
        self.tracker = ConnectionTracker(self._on_exchange, stats)

    def _on_exchange(self, exchange: HttpExchange) -> None:
        span = self.builder.build(exchange)
        self.stats["spans"] += 1
        for processor in self.processors:
            processor.on_end(span)

    def handle(self, event: KernelEvent) -> None:
        if isinstance(event, ConnOpen):
            # Read /proc now: a short-lived client may be gone when its span ends.
            self.resources.detect(event.key.pid)
        self.tracker.handle(event)
        if isinstance(event, ProcessExit):
            self.resources.forget(event.pid)

    def run(self, should_stop: Callable[[], bool], poll_ms: int = 100) -> None:
        """Poll, decode and process until ``should_stop()`` says so."""
        while not should_stop():
            for event in self.source.poll(poll_ms):
                self.handle(event)
                if should_stop():
                    return

    def finish(self, timeout_millis: float = 10_000) -> None:
        """Complete what is pending and flush every processor."""
        self.tracker.flush()
        for processor in self.processors:
            processor.shutdown(timeout_millis)
        self.stats["events_lost"] = self.source.lost_events()
