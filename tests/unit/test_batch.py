"""BatchSpanProcessor: bounds, drops, retries, flush and shutdown.

Queue arithmetic is checked with a scripted in-memory exporter that can be
held mid-send; the collector's behaviour with the real OTLP exporters and
receivers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import grpc
import pytest

from probe.export.batch import (
    SUCCESS,
    BatchSpanProcessor,
    Outcome,
    SendOutcome,
    backoff_delay,
    estimate_size,
)
from probe.export.otlp import OtlpHttpSpanExporter
from probe.export.otlp_grpc import OtlpGrpcSpanExporter
from probe.stats import Stats
from probe.trace.span import Resource, Span, SpanKind
from tests.otlp_receiver import GrpcReceiver, HttpReceiver, Reply, span_ids

RESOURCE = Resource({"service.name": "test"})
FAST = {"schedule_delay_millis": 20, "initial_backoff_millis": 5, "max_backoff_millis": 50}
WAIT = 20_000  # ms: generous waits for things that do happen


def make_spans(count: int) -> list[Span]:
    return [
        Span(f"span {i}", SpanKind.SERVER, i, i + 1, RESOURCE, span_id=i.to_bytes(8, "big"))
        for i in range(count)
    ]


def wait_until(condition, timeout: float = WAIT / 1000) -> None:
    """Poll ``condition`` until it holds; fail the test if it never does."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


def numbers(ids: Sequence[bytes]) -> list[int]:
    return [int.from_bytes(i, "big") for i in ids]


def same_size_spans() -> tuple[list[Span], int]:
    """Ten spans whose names have one length, and so one estimated size; that size."""
    spans = make_spans(20)[10:]
    return spans, estimate_size(spans[0])


class ScriptedExporter:
    """A BatchExporter answering from a script; ``hold`` keeps sends waiting
    (``held``: from the start)."""

    def __init__(self, *outcomes: SendOutcome, held: bool = False) -> None:
        self.outcomes = list(outcomes)
        self.batches: list[list[Span]] = []  # every send, in order
        self.hold = threading.Event()
        if not held:
            self.hold.set()
        self.sending = threading.Event()  # set while a send is held
        self.shut_down = False

    def encode(self, spans: Sequence[Span]) -> list[Span]:
        return list(spans)

    def send(self, request: list[Span], timeout: float | None = None) -> SendOutcome:
        self.batches.append(request)
        self.sending.set()
        self.hold.wait()
        self.sending.clear()
        return self.outcomes.pop(0) if self.outcomes else SUCCESS

    def shutdown(self) -> None:
        self.shut_down = True


@pytest.fixture
def stats() -> Stats:
    return Stats()


@pytest.fixture
def processors():
    """Makes processors and shuts them all down after the test."""
    made: list[BatchSpanProcessor] = []

    def make(exporter, stats, **options) -> BatchSpanProcessor:
        processor = BatchSpanProcessor(exporter, stats, **{**FAST, **options})
        made.append(processor)
        return processor

    yield make
    for processor in made:
        processor.shutdown(timeout_millis=1000)


def test_exports_in_batches_of_the_maximum_size(stats, processors):
    exporter = ScriptedExporter()
    processor = processors(exporter, stats, max_export_batch_size=4, schedule_delay_millis=60_000)
    for span in make_spans(10):
        processor.on_end(span)

    assert processor.force_flush(WAIT)

    assert [len(b) for b in exporter.batches] == [4, 4, 2]
    assert [s.name for b in exporter.batches for s in b] == [f"span {i}" for i in range(10)]
    assert stats["spans_exported"] == 10
    assert stats["export_requests"] == 3
    assert processor.queue_depth() == 0


def test_schedule_delay_sends_a_partial_batch(stats, processors):
    exporter = ScriptedExporter()
    processor = processors(exporter, stats, max_export_batch_size=100)
    processor.on_end(make_spans(1)[0])  # no flush: only the schedule sends it
    wait_until(lambda: stats["spans_exported"] == 1)
    assert [len(b) for b in exporter.batches] == [1]


def test_an_idle_worker_sleeps_until_a_span_comes(stats, processors):
    """With nothing queued at a tick, the worker waits with no timeout: an idle
    probe's export thread does not wake at every tick of the schedule."""
    exporter = ScriptedExporter()
    processor = processors(exporter, stats)  # a tick every 20 ms
    waits: list[float | None] = []
    wait = processor._wake.wait

    def counted_wait(timeout: float | None = None) -> bool:
        waits.append(timeout)
        return wait(timeout)

    processor._wake.wait = counted_wait
    wait_until(lambda: None in waits)
    time.sleep(0.2)  # ten ticks of the schedule
    assert waits[-1] is None and waits.count(None) == 1
    processor.on_end(make_spans(1)[0])
    wait_until(lambda: stats["spans_exported"] == 1)
    assert waits.count(None) == 1  # woken by the span, then on the schedule again


def test_overflow_drops_the_oldest_and_counts_each(stats, processors):
    exporter = ScriptedExporter(held=True)
    processor = processors(
        exporter, stats, max_queue_size=10, max_export_batch_size=5, schedule_delay_millis=60_000
    )
    spans = make_spans(25)
    for span in spans[:5]:
        processor.on_end(span)
    assert exporter.sending.wait(WAIT / 1000)  # spans 0-4 are held in flight

    for span in spans[5:]:
        processor.on_end(span)  # never blocks, although the exporter is stuck
        assert processor.queue_depth() <= 10

    assert stats["spans_dropped"] == 15
    assert processor.queue_depth() == 10
    exporter.hold.set()
    assert processor.force_flush(WAIT)
    sent = [s.name for b in exporter.batches for s in b]
    assert sent == [f"span {i}" for i in (0, 1, 2, 3, 4, 20, 21, 22, 23, 24)]
    assert stats["spans_exported"] == 10


def test_queue_is_bounded_in_bytes(stats, processors):
    exporter = ScriptedExporter(held=True)
    spans, size = same_size_spans()
    processor = processors(
        exporter,
        stats,
        max_queue_bytes=3 * size,
        max_export_batch_size=1,
        schedule_delay_millis=60_000,
    )
    processor.on_end(spans[0])
    assert exporter.sending.wait(WAIT / 1000)
    for span in spans[1:]:
        processor.on_end(span)

    assert processor.status().queue_bytes == 3 * size  # 2 queued, 1 in flight
    assert stats["spans_dropped"] == 7
    exporter.hold.set()
    assert processor.force_flush(WAIT)
    assert [s.name for b in exporter.batches for s in b] == ["span 10", "span 18", "span 19"]


def test_backlog_is_the_fuller_of_its_bounds_in_flight_included(stats, processors):
    exporter = ScriptedExporter(held=True)
    spans, size = same_size_spans()
    processor = processors(
        exporter,
        stats,
        max_queue_size=8,
        max_queue_bytes=16 * size,
        max_export_batch_size=2,
        schedule_delay_millis=60_000,
    )
    assert processor.backlog() == 0
    for span in spans[:2]:
        processor.on_end(span)
    assert exporter.sending.wait(WAIT / 1000)  # two in flight
    processor.on_end(spans[2])
    assert processor.backlog() == 3 / 8  # spans, the fuller bound
    for span in spans[3:]:
        processor.on_end(span)
    assert processor.backlog() == 1.0 and stats["spans_dropped"] == 2  # full: dropping
    exporter.hold.set()
    assert processor.force_flush(WAIT)
    assert processor.backlog() == 0

    held = ScriptedExporter(held=True)
    by_bytes = processors(
        held, stats, max_queue_size=100, max_queue_bytes=4 * size, max_export_batch_size=2
    )
    for span in spans[:3]:
        by_bytes.on_end(span)
    assert held.sending.wait(WAIT / 1000)
    assert by_bytes.backlog() == 3 / 4  # bytes, the fuller bound
    held.hold.set()


def test_estimate_grows_with_content():
    small = make_spans(1)[0]
    large = make_spans(1)[0]
    large.attributes = {"url.full": "x" * 1000, "probe.list": ["a" * 100] * 3, "n": 1}
    assert estimate_size(large) >= estimate_size(small) + 1300
    shared = make_spans(1)[0]
    shared.shared_attributes = {f"network.{n}": "10.0.0.1" for n in range(10)}
    assert estimate_size(shared) >= estimate_size(small) + 400  # counted, not walked


def test_backoff_doubles_with_jitter_up_to_the_maximum():
    for attempt, base in [(1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0)]:
        assert base * 0.5 <= backoff_delay(attempt, 1.0, 30.0) <= base * 1.5
    for attempt in (6, 100, 10_000):  # days of outage
        assert 15.0 <= backoff_delay(attempt, 1.0, 30.0) <= 30.0


def test_retryable_failures_keep_the_spans_and_back_off(stats, processors):
    retry = SendOutcome(Outcome.RETRYABLE, message="down")
    exporter = ScriptedExporter(retry, retry, retry)
    processor = processors(exporter, stats, max_export_batch_size=3)
    for span in make_spans(3):
        processor.on_end(span)

    assert processor.force_flush(WAIT)

    assert [[s.name for s in b] for b in exporter.batches] == [["span 0", "span 1", "span 2"]] * 4
    assert stats["export_retries"] == 3
    assert stats["spans_exported"] == 3
    assert processor.failing_for() == 0.0


def test_health_tracks_failures(stats, processors):
    exporter = ScriptedExporter(SendOutcome(Outcome.PERMANENT, message="no"))
    processor = processors(exporter, stats)
    processor.on_end(make_spans(1)[0])
    assert processor.force_flush(WAIT)
    assert stats["spans_failed"] == 1
    assert processor.failing_for() > 0
    assert processor.status().failing_for > 0

    processor.on_end(make_spans(1)[0])
    assert processor.force_flush(WAIT)
    assert processor.failing_for() == 0.0


def test_shutdown_flushes_what_is_queued(stats):
    exporter = ScriptedExporter()
    processor = BatchSpanProcessor(exporter, stats, schedule_delay_millis=60_000)
    for span in make_spans(7):
        processor.on_end(span)

    assert processor.shutdown(timeout_millis=WAIT)

    assert [len(b) for b in exporter.batches] == [7]
    assert exporter.shut_down
    processor.on_end(make_spans(1)[0])  # too late: dropped, and counted
    assert stats["spans_dropped"] == 1
    assert stats["spans_exported"] == 7


# -- with the real exporters and receivers ----


def grpc_processor(receiver, stats, **options) -> BatchSpanProcessor:
    exporter = OtlpGrpcSpanExporter(receiver.endpoint, max_reconnect_backoff_millis=100)
    return BatchSpanProcessor(exporter, stats, **{**FAST, **options})


def http_processor(receiver, stats, **options) -> BatchSpanProcessor:
    return BatchSpanProcessor(OtlpHttpSpanExporter(receiver.endpoint), stats, **{**FAST, **options})


PROTOCOLS = {"grpc": (GrpcReceiver, grpc_processor), "http": (HttpReceiver, http_processor)}


@pytest.fixture(params=sorted(PROTOCOLS))
def protocol(request):
    """(receiver class, processor factory) for each OTLP protocol."""
    return PROTOCOLS[request.param]


def test_collector_down_at_start_then_up(protocol, stats):
    receiver_class, make_processor = protocol
    down = receiver_class()  # only to own a free port, then gone
    down.stop()
    processor = make_processor(down, stats, max_export_batch_size=8)
    spans = make_spans(30)
    for span in spans:
        processor.on_end(span)
    wait_until(lambda: stats["export_retries"] >= 3)
    assert stats["spans_exported"] == 0

    receiver = receiver_class(port=down.port)
    try:
        assert processor.force_flush(WAIT)
        delivered = span_ids(receiver.accepted)
        assert sorted(numbers(delivered)) == list(range(30))  # each one, once
        assert stats["spans_exported"] == 30
        assert stats["spans_dropped"] == 0
        assert processor.failing_for() == 0.0
    finally:
        processor.shutdown(1000)
        receiver.stop()


def test_outage_keeps_the_queue_bounded(protocol, stats):
    receiver_class, make_processor = protocol
    down = receiver_class()
    down.stop()
    processor = make_processor(down, stats, max_queue_size=10, max_export_batch_size=5)
    for span in make_spans(25):
        processor.on_end(span)
        assert processor.queue_depth() <= 10
    assert stats["spans_dropped"] == 15

    receiver = receiver_class(port=down.port)
    try:
        assert processor.force_flush(WAIT)
        delivered = numbers(span_ids(receiver.accepted))
        assert len(delivered) == len(set(delivered)) == 10
        assert stats["spans_exported"] == 10
    finally:
        processor.shutdown(1000)
        receiver.stop()


RETRIED = {
    "grpc": [
        Reply(grpc.StatusCode.UNAVAILABLE),
        Reply(grpc.StatusCode.RESOURCE_EXHAUSTED, retry_delay=0.01),
        Reply(grpc.StatusCode.DEADLINE_EXCEEDED),
    ],
    "http": [Reply(http_status=503), Reply(http_status=429, retry_delay=0), Reply(http_status=502)],
}
PERMANENT = {
    "grpc": [Reply(grpc.StatusCode.INVALID_ARGUMENT), Reply(grpc.StatusCode.RESOURCE_EXHAUSTED)],
    "http": [Reply(http_status=400), Reply(http_status=401)],
}


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_retryable_errors_are_retried_until_accepted(name, stats):
    receiver_class, make_processor = PROTOCOLS[name]
    receiver = receiver_class(RETRIED[name])
    processor = make_processor(receiver, stats, max_export_batch_size=4)
    try:
        for span in make_spans(4):
            processor.on_end(span)
        assert processor.force_flush(WAIT)
        assert len(receiver.received) == 4
        assert numbers(span_ids(receiver.accepted)) == [0, 1, 2, 3]
        assert stats["export_retries"] == 3
        assert stats["spans_exported"] == 4
    finally:
        processor.shutdown(1000)
        receiver.stop()


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_permanent_errors_drop_and_count(name, stats):
    receiver_class, make_processor = PROTOCOLS[name]
    receiver = receiver_class(PERMANENT[name])
    processor = make_processor(receiver, stats, max_export_batch_size=3)
    try:
        for span in make_spans(7):
            processor.on_end(span)
        assert processor.force_flush(WAIT)
        assert len(receiver.received) == 3  # nothing was sent twice
        assert stats["spans_failed"] == 6
        assert stats["spans_exported"] == 1
        assert stats["export_retries"] == 0
    finally:
        processor.shutdown(1000)
        receiver.stop()


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_partial_success_counts_rejected_spans(name, stats):
    receiver_class, make_processor = PROTOCOLS[name]
    receiver = receiver_class([Reply(rejected=2, message="too old")])
    processor = make_processor(receiver, stats, max_export_batch_size=5)
    try:
        for span in make_spans(5):
            processor.on_end(span)
        assert processor.force_flush(WAIT)
        assert len(receiver.received) == 1  # never retried
        assert stats["spans_rejected"] == 2
        assert stats["spans_exported"] == 3
    finally:
        processor.shutdown(1000)
        receiver.stop()


def test_server_retry_delay_is_honoured(stats):
    receiver = GrpcReceiver([Reply(grpc.StatusCode.RESOURCE_EXHAUSTED, retry_delay=0.3)])
    processor = grpc_processor(receiver, stats)
    try:
        processor.on_end(make_spans(1)[0])
        first, second = receiver.wait_for(2)
        assert second.at - first.at >= 0.3  # the backoff alone would have been 5 ms
    finally:
        processor.shutdown(1000)
        receiver.stop()


def test_shutdown_flushes_to_the_collector(protocol, stats):
    receiver_class, make_processor = protocol
    receiver = receiver_class()
    processor = make_processor(receiver, stats, schedule_delay_millis=60_000)
    for span in make_spans(9):
        processor.on_end(span)
    try:
        assert processor.shutdown(timeout_millis=WAIT)
        assert numbers(span_ids(receiver.accepted)) == list(range(9))
    finally:
        receiver.stop()


def test_shutdown_gives_up_at_its_deadline(protocol, stats):
    receiver_class, make_processor = protocol
    down = receiver_class()
    down.stop()
    processor = make_processor(
        down, stats, initial_backoff_millis=60_000, max_backoff_millis=60_000
    )
    for span in make_spans(6):
        processor.on_end(span)
    wait_until(lambda: stats["export_retries"] >= 1)

    assert processor.shutdown(timeout_millis=200) is False  # does not wait out the backoff
    assert stats["spans_dropped"] == 6
    assert processor.queue_depth() == 0
