"""Whole traces as waterfalls: ``probe capture -o tree``.

`TraceGroupingProcessor` collects spans by trace id and hands each trace to
its exporter once it is complete: a root span (one without a parent) has
ended and every other span's parent is among the trace's spans; or no span
joined it for ``wait_ns`` (its root was outside what was traced); or the
probe stops. `TreeExporter` prints a trace as `render_trace` lays it out,
in under 100 columns: one line per span, indented by depth, with a bar that
shows when in the trace the span ran; the span with the most self time
(its duration minus the time its children cover) is marked with ``*``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from probe.export.base import SpanExporter
from probe.export.console import _KIND_LABELS, StreamSpanExporter, _fit
from probe.trace.span import Span, StatusCode

DEFAULT_WAIT_NS = 500_000_000
MAX_TRACES = 10_000  # traces being collected; the oldest is printed early beyond
MAX_SPANS = 1_000  # spans kept per trace; a bigger one is drawn in parts
BAR_WIDTH = 28
MAX_INDENT = 10
MARK = "*"

_ROW = "{mark:1} {name:<20} {kind:<4} {method:<6} {path:<16} {code:>4} {ms:>9} |{bar}|"
_HEADER = _ROW.format(
    mark="",
    name="SERVICE",
    kind="KIND",
    method="METHOD",
    path="PATH",
    code="CODE",
    ms="MS",
    bar="timeline".center(BAR_WIDTH),
)


def self_time_ns(span: Span, children: Iterable[Span]) -> int:
    """``span``'s duration minus the union of its children's time within it."""
    start, end = span.start_time_unix_nano, span.end_time_unix_nano
    covered, cursor = 0, start
    for child in sorted(children, key=lambda c: c.start_time_unix_nano):
        low = max(child.start_time_unix_nano, cursor)
        high = min(child.end_time_unix_nano, end)
        if high > low:
            covered += high - low
            cursor = high
    return span.duration_ns - covered


def _ordered(spans: Sequence[Span]) -> tuple[list[tuple[int, Span]], dict[bytes, list[Span]]]:
    """(depth, span) in depth-first order, children by start time; and each span's children."""
    ids = {span.span_id for span in spans}
    children: dict[bytes, list[Span]] = {}
    tops = []
    for span in sorted(spans, key=lambda s: (s.start_time_unix_nano, s.end_time_unix_nano)):
        parent = span.parent_span_id
        if parent is not None and parent in ids and parent != span.span_id:
            children.setdefault(parent, []).append(span)
        else:
            tops.append(span)
    rows: list[tuple[int, Span]] = []
    seen: set[bytes] = set()
    stack = [(0, span) for span in reversed(tops)]
    while stack:
        depth, span = stack.pop()
        if span.span_id in seen:  # repeated ids: draw each span once
            continue
        seen.add(span.span_id)
        rows.append((depth, span))
        stack.extend((depth + 1, child) for child in reversed(children.get(span.span_id, [])))
    return rows, children


def render_trace(spans: Sequence[Span]) -> list[str]:
    """The waterfall of one trace's spans: a title, a header, a line per span, a footer."""
    if not spans:
        return []
    rows, children = _ordered(spans)
    begin = min(span.start_time_unix_nano for _, span in rows)
    end = max(span.end_time_unix_nano for _, span in rows)
    total = max(end - begin, 1)
    self_times = {id(span): self_time_ns(span, children.get(span.span_id, [])) for _, span in rows}
    slowest = max((span for _, span in rows), key=lambda span: self_times[id(span)])

    lines = [
        f"trace {spans[0].trace_id.hex()}  {len(rows)} spans  {_millis(end - begin)} ms",
        _HEADER,
    ]
    for depth, span in rows:
        attrs = span.all_attributes()
        method = attrs.get("http.request.method_original") or attrs.get("http.request.method")
        code = attrs.get("http.response.status_code")
        service = str(span.resource.attributes.get("service.name", "?"))
        indent = "  " * min(depth, MAX_INDENT // 2)
        lines.append(
            _ROW.format(
                mark=MARK if span is slowest else "",
                name=_fit(indent + service, 20),
                kind=_KIND_LABELS[span.kind],
                method=_fit(str(method or span.name), 6),
                path=_fit(str(attrs.get("url.path", "")), 16),
                code=("---" if code is None else str(code))
                + ("!" if span.status_code is StatusCode.ERROR else ""),
                ms=_millis(span.duration_ns),
                bar=_bar(span, begin, total),
            )
        )
    share = 100 * self_times[id(slowest)] // max(slowest.duration_ns, 1)
    service = _fit(str(slowest.resource.attributes.get("service.name", "?")), 20)
    lines.append(
        f"{MARK} most self time: {service} {_KIND_LABELS[slowest.kind]} "
        f"{_millis(self_times[id(slowest)])} ms ({share}% of its span)"
    )
    return lines


def _millis(ns: int) -> str:
    return f"{ns / 1e6:.1f}" if ns >= 10_000_000 else f"{ns / 1e6:.2f}"


def _bar(span: Span, begin: int, total: int) -> str:
    """Where in the trace's time the span ran, on ``BAR_WIDTH`` columns."""
    first = (span.start_time_unix_nano - begin) * BAR_WIDTH // total
    last = (span.end_time_unix_nano - begin) * BAR_WIDTH // total
    first = min(first, BAR_WIDTH - 1)
    last = min(max(last, first + 1), BAR_WIDTH)
    return " " * first + "=" * (last - first) + " " * (BAR_WIDTH - last)


class TreeExporter(StreamSpanExporter):
    """Writes each exported batch, one trace's spans, as a waterfall and a blank line."""

    def lines(self, spans: Sequence[Span]) -> Iterable[str]:
        yield from render_trace(spans)
        yield ""


class _Trace:
    __slots__ = ("spans", "last_ns")

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.last_ns = 0

    def complete(self) -> bool:
        ids = {span.span_id for span in self.spans}
        roots = [span for span in self.spans if span.parent_span_id is None]
        return bool(roots) and all(
            span.parent_span_id is None or span.parent_span_id in ids for span in self.spans
        )


class TraceGroupingProcessor:
    """Hands its exporter one whole trace at a time, as soon as it is complete.

    ``tick`` (called by the pipeline after every poll) sends the traces no
    span joined for ``wait_ns``.
    """

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        wait_ns: int = DEFAULT_WAIT_NS,
        clock: Callable[[], int] = time.monotonic_ns,
        max_traces: int = MAX_TRACES,
        max_spans: int = MAX_SPANS,
    ) -> None:
        self.exporter = exporter
        self._wait_ns = wait_ns
        self._clock = clock
        self._max_traces = max_traces
        self._max_spans = max_spans
        self._traces: OrderedDict[bytes, _Trace] = OrderedDict()

    def on_end(self, span: Span) -> None:
        trace = self._traces.get(span.trace_id)
        if trace is not None and len(trace.spans) >= self._max_spans:
            self._send(span.trace_id)  # a huge trace is drawn in parts
            trace = None
        if trace is None:
            if len(self._traces) >= self._max_traces:
                self._send(next(iter(self._traces)))
            trace = self._traces[span.trace_id] = _Trace()
        trace.spans.append(span)
        trace.last_ns = self._clock()
        self._traces.move_to_end(span.trace_id)  # oldest activity first
        if trace.complete():
            self._send(span.trace_id)

    def tick(self) -> None:
        deadline = self._clock() - self._wait_ns
        while self._traces:
            trace_id, trace = next(iter(self._traces.items()))
            if trace.last_ns > deadline:
                break
            self._send(trace_id)

    def force_flush(self, timeout_millis: float = 30_000) -> bool:
        while self._traces:
            self._send(next(iter(self._traces)))
        return self.exporter.force_flush(int(timeout_millis))

    def shutdown(self, timeout_millis: float = 30_000) -> bool:
        flushed = self.force_flush(timeout_millis)
        self.exporter.shutdown()
        return flushed

    def _send(self, trace_id: bytes) -> None:
        trace = self._traces.pop(trace_id)
        self.exporter.export(trace.spans)
