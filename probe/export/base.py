"""The interface every exporter implements, after OpenTelemetry's SDK."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Protocol

from probe.trace.span import Span


class ExportResult(Enum):
    SUCCESS = 0
    FAILURE = 1


class SpanExporter(Protocol):
    def export(self, spans: Sequence[Span]) -> ExportResult:
        """Send ``spans``; called from one thread at a time."""
        ...

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Deliver anything buffered; True if it all went out in time."""
        ...

    def shutdown(self) -> None:
        """Flush and release resources; export() is not called after this."""
        ...
