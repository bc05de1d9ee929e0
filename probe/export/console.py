"""Human-readable exporters: one line of text per span on a stream.

`StreamSpanExporter` owns the stream handling every line-per-span exporter
shares (the JSON-lines one builds on it too); `ConsoleSpanExporter` formats
spans as a table that fits in 100 columns, in the manner of bcc's tools.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from datetime import datetime, tzinfo
from typing import TextIO

from probe.export.base import ExportResult
from probe.trace.span import Span, SpanKind, StatusCode

WIDTH = 99  # the longest line written: stays under 100 columns
ELLIPSIS = "..."

_KIND_LABELS = {SpanKind.SERVER: "SRV", SpanKind.CLIENT: "CLI", SpanKind.INTERNAL: "INT"}
# Fixed columns before the path, which takes what is left of the line.
_ROW = "{time:<12} {service:<10} {kind:<4} {method:<8} {status:<4} {duration:>8} {peer:<21} "
_HEADER = _ROW.format(
    time="TIME",
    service="SERVICE",
    kind="KIND",
    method="METHOD",
    status="CODE",
    duration="MS",
    peer="PEER",
)


class StreamSpanExporter:
    """Writes ``lines(spans)`` to a text stream and flushes after every export.

    The stream belongs to the caller (stdout by default): shutdown flushes it
    but does not close it.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = sys.stdout if stream is None else stream

    def lines(self, spans: Sequence[Span]) -> Iterable[str]:
        raise NotImplementedError

    def export(self, spans: Sequence[Span]) -> ExportResult:
        try:
            for line in self.lines(spans):
                self._stream.write(line + "\n")
            self._stream.flush()
        except (OSError, ValueError):  # a closed pipe or file
            return ExportResult.FAILURE
        return ExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            return False
        return True

    def shutdown(self) -> None:
        self.force_flush()


class ConsoleSpanExporter(StreamSpanExporter):
    """A table: a header line before the first span, then one row per span.

    Times are local unless ``tz`` says otherwise; a failed span's code is
    followed by "!".
    """

    def __init__(self, stream: TextIO | None = None, *, tz: tzinfo | None = None) -> None:
        super().__init__(stream)
        self._tz = tz
        self._header_written = False

    def lines(self, spans: Sequence[Span]) -> Iterable[str]:
        if spans and not self._header_written:
            self._header_written = True
            yield _HEADER + "PATH"
        for span in spans:
            yield self.format_row(span)

    def format_row(self, span: Span) -> str:
        attrs = span.all_attributes()
        start = datetime.fromtimestamp(span.start_time_unix_nano // 1_000_000_000, self._tz)
        millis = span.start_time_unix_nano // 1_000_000 % 1000
        code = attrs.get("http.response.status_code")
        status = ("---" if code is None else str(code)) + (
            "!" if span.status_code is StatusCode.ERROR else ""
        )
        peer = ""
        if address := attrs.get("network.peer.address"):
            address = str(address)
            peer = f"[{address}]" if ":" in address else address
            if port := attrs.get("network.peer.port"):
                peer += f":{port}"
        method = (
            attrs.get("http.request.method_original")
            or attrs.get("http.request.method")
            or span.name
        )
        path = str(attrs.get("url.path", ""))
        if query := attrs.get("url.query"):
            path += f"?{query}"

        row = _ROW.format(
            time=f"{start:%H:%M:%S}.{millis:03d}",
            service=_fit(str(span.resource.attributes.get("service.name", "")), 10),
            kind=_KIND_LABELS[span.kind],
            method=_fit(str(method), 8),
            status=status,
            duration=f"{span.duration_ns / 1e6:.3f}",
            peer=_fit(peer, 21),
        )
        # The duration column may grow past its width; the path absorbs it.
        return row + _fit(path, WIDTH - len(row))


def _fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` columns, marked when cut, with no control characters.

    Paths and names come off the wire: an escape sequence in one must not
    reach the terminal.
    """
    text = "".join(char if char.isprintable() else "?" for char in text)
    if len(text) <= width:
        return text
    return text[: max(width - len(ELLIPSIS), 0)] + ELLIPSIS[: max(width, 0)]
