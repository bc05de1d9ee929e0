"""Machine-readable export: one JSON object per span, one span per line.

The object's fields mirror OTLP's span (ids in lower-case hex, times in Unix
nanoseconds), flattened, with the span's resource attributes inlined so that
every line stands alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from probe.export.console import StreamSpanExporter
from probe.trace.span import Span


def span_to_dict(span: Span) -> dict[str, Any]:
    """The span as plain JSON-ready data; the JSON-lines format, field for field."""
    return {
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent_span_id": span.parent_span_id.hex() if span.parent_span_id else "",
        "name": span.name,
        "kind": span.kind.name,
        "start_time_unix_nano": span.start_time_unix_nano,
        "end_time_unix_nano": span.end_time_unix_nano,
        "status_code": span.status_code.name,
        "status_message": span.status_message,
        "attributes": dict(span.all_attributes()),
        "events": [
            {
                "name": event.name,
                "time_unix_nano": event.time_unix_nano,
                "attributes": dict(event.attributes),
            }
            for event in span.events
        ],
        "links": [
            {
                "trace_id": link.trace_id.hex(),
                "span_id": link.span_id.hex(),
                "attributes": dict(link.attributes),
            }
            for link in span.links
        ],
        "resource": dict(span.resource.attributes),
    }


class JsonLinesSpanExporter(StreamSpanExporter):
    """Writes `span_to_dict` of each span as one compact JSON line."""

    def lines(self, spans: Sequence[Span]) -> Iterable[str]:
        for span in spans:
            yield json.dumps(span_to_dict(span), separators=(",", ":"))
