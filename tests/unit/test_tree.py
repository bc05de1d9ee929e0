"""Trees: grouping spans into whole traces, and the waterfall each trace prints as."""

from __future__ import annotations

import io

from probe.export.tree import TraceGroupingProcessor, TreeExporter, render_trace, self_time_ns
from probe.trace.span import Resource, Span, SpanKind, StatusCode

MS = 1_000_000
TRACE = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")


def span(
    service: str,
    kind: SpanKind,
    start_ms: float,
    end_ms: float,
    span_id: int,
    parent: int | None = None,
    path: str = "/checkout",
    code: int = 200,
    trace_id: bytes = TRACE,
) -> Span:
    return Span(
        "GET",
        kind,
        int(start_ms * MS),
        int(end_ms * MS),
        Resource({"service.name": service}),
        trace_id=trace_id,
        span_id=span_id.to_bytes(8, "big"),
        parent_span_id=None if parent is None else parent.to_bytes(8, "big"),
        status_code=StatusCode.ERROR if code >= 500 else StatusCode.UNSET,
        attributes={
            "http.request.method": "GET",
            "url.path": path,
            "http.response.status_code": code,
        },
    )


def seed_trace() -> list[Span]:
    """curl -> frontend -> orders -> db, in the order the spans end (bottom-up)."""
    return [
        span("db", SpanKind.SERVER, 30, 330, 6, parent=5, path="/query"),
        span("orders", SpanKind.CLIENT, 29, 331, 5, parent=4, path="/query"),
        span("orders", SpanKind.SERVER, 20, 335, 4, parent=3, path="/orders"),
        span("frontend", SpanKind.CLIENT, 15, 336, 3, parent=2, path="/orders"),
        span("frontend", SpanKind.SERVER, 10, 340, 2, parent=1),
        span("curl", SpanKind.CLIENT, 0, 400, 1),
    ]


WATERFALL = """\
trace 4bf92f3577b34da6a3ce929d0e0e4736  6 spans  400.0 ms
  SERVICE              KIND METHOD PATH             CODE        MS |          timeline          |
  curl                 CLI  GET    /checkout         200     400.0 |============================|
    frontend           SRV  GET    /checkout         200     330.0 |=======================     |
      frontend         CLI  GET    /orders           200     321.0 | ======================     |
        orders         SRV  GET    /orders           200     315.0 | ======================     |
          orders       CLI  GET    /query            200     302.0 |  =====================     |
*           db         SRV  GET    /query            200     300.0 |  =====================     |
* most self time: db SRV 300.0 ms (100% of its span)
"""


def test_waterfall() -> None:
    lines = render_trace(seed_trace())
    assert lines == WATERFALL.splitlines()
    assert max(len(line) for line in lines) < 100


def test_self_time_counts_overlapping_children_once() -> None:
    parent = span("a", SpanKind.SERVER, 0, 100, 1)
    children = [
        span("a", SpanKind.CLIENT, 10, 50, 2, parent=1),
        span("a", SpanKind.CLIENT, 30, 60, 3, parent=1),  # concurrent with the first
        span("a", SpanKind.CLIENT, 90, 120, 4, parent=1),  # outlives its parent
    ]
    assert self_time_ns(parent, children) == 100 * MS - 50 * MS - 10 * MS


def test_deep_trees_and_odd_names_stay_in_100_columns() -> None:
    spans = [span("x" * 40, SpanKind.SERVER, 0, 10, 1, path="/\x1b[31m" + "p" * 90)]
    spans += [
        span("svc\n", SpanKind.CLIENT, i, 10, i + 1, parent=i, code=503) for i in range(1, 30)
    ]
    lines = render_trace(spans)
    assert max(len(line) for line in lines) < 100
    assert all(line.isprintable() for line in lines)
    assert "503!" in lines[-2]


def test_spans_whose_parent_is_elsewhere_are_drawn_at_the_top() -> None:
    outside = span("b", SpanKind.SERVER, 5, 8, 2, parent=99)
    lines = render_trace([span("a", SpanKind.CLIENT, 0, 10, 1), outside])
    assert [line[:12] for line in lines[2:4]] == ["* a         ", "  b         "]


class Clock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


def grouping(wait_ns: int = 100, **kwargs) -> tuple[TraceGroupingProcessor, io.StringIO, Clock]:
    stream, clock = io.StringIO(), Clock()
    processor = TraceGroupingProcessor(TreeExporter(stream), wait_ns=wait_ns, clock=clock, **kwargs)
    return processor, stream, clock


def traces_printed(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line.startswith("trace ")]


def test_a_trace_prints_once_its_root_and_every_parent_are_in() -> None:
    processor, stream, _ = grouping()
    spans = seed_trace()
    for item in spans[:-1]:
        processor.on_end(item)
    assert stream.getvalue() == ""
    processor.on_end(spans[-1])
    assert stream.getvalue() == "\n".join(render_trace(spans)) + "\n\n"


def test_traces_interleave_and_print_separately() -> None:
    processor, stream, _ = grouping()
    other = bytes(15) + b"\x01"
    first = seed_trace()
    second = [span("x", SpanKind.SERVER, 0, 5, 8, parent=7, trace_id=other)]
    second.append(span("x", SpanKind.CLIENT, 0, 6, 7, trace_id=other))
    for a, b in zip(first, second, strict=False):
        processor.on_end(a)
        processor.on_end(b)
    assert traces_printed(stream) == [f"trace {other.hex()}  2 spans  6.00 ms"]
    for rest in first[2:]:
        processor.on_end(rest)
    assert len(traces_printed(stream)) == 2


def test_a_trace_without_its_root_prints_when_the_wait_ends() -> None:
    processor, stream, clock = grouping(wait_ns=100)
    processor.on_end(span("b", SpanKind.SERVER, 5, 8, 2, parent=99))
    clock.now = 99
    processor.tick()
    assert stream.getvalue() == ""
    clock.now = 100
    processor.tick()
    assert len(traces_printed(stream)) == 1


def test_shutdown_prints_what_is_left_and_memory_is_bounded() -> None:
    processor, stream, _ = grouping(max_traces=2)
    for i in range(3):
        trace_id = (i + 1).to_bytes(16, "big")
        processor.on_end(span("b", SpanKind.SERVER, 0, 8, 2, parent=99, trace_id=trace_id))
    assert len(traces_printed(stream)) == 1  # the oldest made room
    assert processor.shutdown() is True
    assert len(traces_printed(stream)) == 3


def test_a_huge_trace_is_drawn_in_parts() -> None:
    processor, stream, _ = grouping(max_spans=2)
    for i in range(5):
        processor.on_end(span("b", SpanKind.SERVER, 0, 8, 10 + i, parent=99))
    processor.force_flush()
    assert [line.split()[2] for line in traces_printed(stream)] == ["2", "2", "1"]
