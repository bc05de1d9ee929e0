"""Span processors: what happens to a span once it ends, before export.

As in OpenTelemetry's SDK, a processor sits between the span source and an
exporter. `SimpleSpanProcessor` exports each span as it ends (console and
JSON lines, where a person is watching); `probe.export.batch` queues and
batches for the network.
"""

from __future__ import annotations

from typing import Protocol

from probe.export.base import SpanExporter
from probe.trace.span import Span


class SpanProcessor(Protocol):
    def on_end(self, span: Span) -> None:
        """Take a finished span; must not block the event loop for long."""
        ...

    def force_flush(self, timeout_millis: float = 30_000) -> bool: ...

    def shutdown(self, timeout_millis: float = 30_000) -> bool: ...


class SimpleSpanProcessor:
    """Exports every span at once, on the caller's thread."""

    def __init__(self, exporter: SpanExporter) -> None:
        self.exporter = exporter

    def on_end(self, span: Span) -> None:
        self.exporter.export([span])

    def force_flush(self, timeout_millis: float = 30_000) -> bool:
        return self.exporter.force_flush(int(timeout_millis))

    def shutdown(self, timeout_millis: float = 30_000) -> bool:
        self.exporter.shutdown()
        return True
