"""The bounded span queue between the hot thread and a network exporter.

Owns `BatchSpanProcessor`: `on_end` appends a span to a queue bounded both in
spans and in (estimated) bytes, dropping the oldest when full; one worker
thread cuts batches, sends them, and retries retryable failures with
exponential backoff and jitter, honouring any delay the server asked for.
While the collector is down the spans wait in the queue (still bounded) and
go out when it is back, each at most once.

Also owns the small contract between the processor and what it drives:
`BatchExporter` (encode a batch once, send the encoded request, possibly
several times) and the `SendOutcome` a send reports.

Counters it keeps in the shared `Stats` (always under its own lock, because
unlike the other stages it runs on two threads): ``spans_exported``,
``spans_dropped`` (queue overflow, or left over at shutdown), ``spans_rejected``
(the collector's partial success), ``spans_failed`` (permanent failures),
``export_retries``, ``export_requests``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from itertools import islice
from typing import Any, Final, NamedTuple, Protocol

from probe.stats import Stats
from probe.trace.span import Attributes, Span

log = logging.getLogger(__name__)


class Outcome(Enum):
    SUCCESS = "success"
    PARTIAL = "partial"  # accepted, but the collector rejected some spans: never retried
    RETRYABLE = "retryable"  # try the same spans again later
    PERMANENT = "permanent"  # the spans will never be accepted: drop them


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """What happened to one export request."""

    outcome: Outcome
    rejected: int = 0  # PARTIAL: spans the collector refused
    message: str = ""  # the collector's or the transport's words, for the log
    retry_after: float | None = None  # RETRYABLE: seconds the server asked us to wait


SUCCESS: Final = SendOutcome(Outcome.SUCCESS)


class BatchExporter(Protocol):
    """What the processor drives; the OTLP exporters implement it."""

    def encode(self, spans: Sequence[Span]) -> Any:
        """Turn spans into a request that `send` can send, possibly more than once."""
        ...

    def send(self, request: Any, timeout: float | None = None) -> SendOutcome:
        """Send one request, waiting at most ``timeout`` seconds; never raises."""
        ...

    def shutdown(self) -> None: ...


class ExportStatus(NamedTuple):
    """A reading of the processor's gauges, for the metrics endpoint."""

    queue_depth: int  # spans waiting or being sent
    queue_bytes: int  # their estimated size
    last_latency: float  # seconds the last export request took, 0 before any
    latency_total: float  # seconds all export requests took
    failing_for: float  # seconds since export started failing; 0 while it works


@dataclass(slots=True, init=False)
class _Entry:
    seq: int  # order of arrival, to know when a flush is done
    span: Span
    size: int

    def __init__(self, seq: int, span: Span, size: int) -> None:
        self.seq = seq  # written out for mypyc (probe/compiled.py): one per span
        self.span = span
        self.size = size


# About what _attributes_size counts for one of a connection's attributes
# (an address or a port, under a name of some twenty characters).
_SHARED_ATTRIBUTE_SIZE: Final = 48


def estimate_size(span: Span) -> int:
    """Roughly the bytes a span holds, without walking it deeply: cheap for the hot thread."""
    size = 160 + len(span.name) + len(span.status_message) + _attributes_size(span.attributes)
    if span.shared_attributes:  # shared with other spans (a connection's): not walked
        size += _SHARED_ATTRIBUTE_SIZE * len(span.shared_attributes)
    for event in span.events:
        size += 48 + len(event.name) + _attributes_size(event.attributes)
    for link in span.links:
        size += 64 + _attributes_size(link.attributes)
    return size


def _attributes_size(attributes: Attributes) -> int:
    size = 0
    for key, value in attributes.items():
        if isinstance(value, str):
            size += 24 + len(key) + len(value)
        elif isinstance(value, list):
            size += 24 + len(key) + sum(len(v) if isinstance(v, str) else 8 for v in value)
        else:
            size += 32 + len(key)
    return size


def backoff_delay(attempt: int, initial: float, maximum: float) -> float:
    """Seconds before retry number ``attempt`` (from 1): doubling from ``initial``, with
    jitter of +-50% so that many probes do not retry in step, never above ``maximum``."""
    # the exponent is capped: an outage of days must not overflow the float
    delay = min(maximum, initial * 2 ** min(attempt - 1, 30))
    return min(maximum, delay * random.uniform(0.5, 1.5))


class BatchSpanProcessor:
    """Queues finished spans and exports them in batches from a worker thread."""

    def __init__(
        self,
        exporter: BatchExporter,
        stats: Stats,
        *,
        max_queue_size: int = 8192,
        max_queue_bytes: int = 16 * 1024 * 1024,
        max_export_batch_size: int = 512,
        schedule_delay_millis: float = 5000,
        export_timeout_millis: float = 30000,
        initial_backoff_millis: float = 1000,
        max_backoff_millis: float = 30000,
    ) -> None:
        if not 0 < max_export_batch_size <= max_queue_size:
            raise ValueError("need 0 < max_export_batch_size <= max_queue_size")
        if max_queue_bytes <= 0:
            raise ValueError("max_queue_bytes must be positive")
        self._exporter = exporter
        self._stats = stats
        self._max_queue_size = max_queue_size
        self._max_queue_bytes = max_queue_bytes
        self._batch_size = max_export_batch_size
        self._schedule_delay = schedule_delay_millis / 1000
        self._export_timeout = export_timeout_millis / 1000
        self._initial_backoff = initial_backoff_millis / 1000
        self._max_backoff = max_backoff_millis / 1000

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the worker waits on it
        self._settled = threading.Condition(self._lock)  # flushers wait on it
        self._queue: deque[_Entry] = deque()
        self._queue_bytes = 0
        self._in_flight: list[_Entry] = []  # taken off the queue, being sent
        self._in_flight_bytes = 0
        self._next_seq = 0
        # The worker waits for a span with no timeout: the queue was empty at
        # its last tick. An idle probe's export thread then never wakes.
        self._awaiting_spans = False
        self._flush_upto = -1  # export without waiting while spans up to this seq remain
        self._shutdown = False
        self._stopped_clean = False  # the worker ended with nothing left to drop
        self._stop_by: float | None = None  # monotonic deadline set by shutdown()
        self._failing_since: float | None = None
        self._last_latency = 0.0
        self._latency_total = 0.0

        self._worker = threading.Thread(target=self._run, name="probe-batch-export", daemon=True)
        self._worker.start()

    # -- the hot thread ----

    def on_end(self, span: Span) -> None:
        """Queue a finished span; never blocks on the network, drops the oldest when full."""
        size = estimate_size(span)
        with self._lock:
            if self._shutdown:
                self._stats["spans_dropped"] += 1
                return
            self._queue.append(_Entry(self._next_seq, span, size))
            self._next_seq += 1
            self._queue_bytes += size
            self._trim()
            if len(self._queue) == self._batch_size or self._awaiting_spans:
                self._awaiting_spans = False
                self._wake.notify()

    def _trim(self) -> None:
        """Drop the oldest queued spans until the queue fits its bounds (lock held)."""
        dropped = 0
        while self._queue and (
            len(self._queue) + len(self._in_flight) > self._max_queue_size
            or self._queue_bytes + self._in_flight_bytes > self._max_queue_bytes
        ):
            self._queue_bytes -= self._queue.popleft().size
            dropped += 1
        if dropped:
            self._stats["spans_dropped"] += dropped
            self._settled.notify_all()

    # -- readings ----

    def queue_depth(self) -> int:
        with self._lock:
            return len(self._queue) + len(self._in_flight)

    def backlog(self) -> float:
        """The share of the queue's bounds (spans, bytes) in use, in flight
        included: at 1 the oldest spans start to be dropped."""
        with self._lock:
            spans = len(self._queue) + len(self._in_flight)
            size = self._queue_bytes + self._in_flight_bytes
        return max(spans / self._max_queue_size, size / self._max_queue_bytes)

    def failing_for(self) -> float:
        """Seconds since exports started failing without a success since; 0 while healthy."""
        since = self._failing_since
        return 0.0 if since is None else time.monotonic() - since

    def status(self) -> ExportStatus:
        with self._lock:
            return ExportStatus(
                queue_depth=len(self._queue) + len(self._in_flight),
                queue_bytes=self._queue_bytes + self._in_flight_bytes,
                last_latency=self._last_latency,
                latency_total=self._latency_total,
                failing_for=self.failing_for(),
            )

    # -- flush and shutdown ----

    def force_flush(self, timeout_millis: float = 30000) -> bool:
        """Export every span queued so far; True if they were all settled in time.

        Settled means exported, rejected, failed or dropped: a flush during an
        outage waits for the collector (with backoff) until its timeout.
        """
        deadline = time.monotonic() + timeout_millis / 1000
        with self._lock:
            upto = self._next_seq - 1
            self._flush_upto = max(self._flush_upto, upto)
            self._wake.notify()
            return self._wait_settled(upto, deadline)

    def shutdown(self, timeout_millis: float = 30000) -> bool:
        """Flush within ``timeout_millis``, then stop the worker and the exporter.

        Spans still queued at the deadline are dropped and counted. Returns True
        if everything queued went out in time.
        """
        deadline = time.monotonic() + timeout_millis / 1000
        with self._lock:
            if self._shutdown:
                return self._stopped_clean
            self._shutdown = True
            self._stop_by = deadline
            self._wake.notify()
        # A send during shutdown is itself bounded by the deadline; allow it a moment past.
        self._worker.join(max(0.0, deadline - time.monotonic()) + 1.0)
        self._exporter.shutdown()
        with self._lock:
            return self._stopped_clean

    def _wait_settled(self, upto: int, deadline: float) -> bool:
        while self._oldest_unsettled() <= upto:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self._shutdown and not self._worker.is_alive()):
                return False
            self._settled.wait(remaining)
        return True

    def _oldest_unsettled(self) -> int:
        if self._in_flight:
            return self._in_flight[0].seq
        if self._queue:
            return self._queue[0].seq
        return self._next_seq

    # -- the worker ----

    def _run(self) -> None:
        attempt = 0  # consecutive retryable failures of the batch at the head
        retry_at = 0.0  # monotonic time before which the head batch is not retried
        next_export = time.monotonic() + self._schedule_delay
        while True:
            with self._lock:
                batch = self._next_batch(next_export, retry_at)
            if batch is None:
                break
            outcome = self._send(batch)
            now = time.monotonic()
            with self._lock:
                self._in_flight = []
                self._in_flight_bytes = 0
                if outcome.outcome is Outcome.RETRYABLE:
                    attempt += 1
                    delay = outcome.retry_after  # the server's word wins
                    if delay is None:
                        delay = backoff_delay(attempt, self._initial_backoff, self._max_backoff)
                    retry_at = now + delay
                    next_export = retry_at  # the retry is due as soon as the backoff ends
                    self._requeue(batch, outcome)
                else:
                    attempt = 0
                    retry_at = 0.0
                    next_export = now + self._schedule_delay
                    self._settle(batch, outcome)
                self._settled.notify_all()
        self._drop_remaining()

    def _next_batch(self, next_export: float, retry_at: float) -> list[_Entry] | None:
        """Wait until a batch is due and take it off the queue; None to stop (lock held)."""
        while True:
            now = time.monotonic()
            if self._shutdown and (not self._queue or self._past_stop(retry_at)):
                return None
            if not self._queue and now >= next_export:  # (not shutting down: see above)
                # Nothing to send at the tick: sleep until a span comes, which
                # then waits a whole delay for others to join its batch. (A
                # wakeup of an idle thread costs about 0.1 ms of CPU on the VM
                # this was measured on.)
                self._awaiting_spans = True
                self._wake.wait()
                self._awaiting_spans = False
                next_export = time.monotonic() + self._schedule_delay
                continue
            due = self._queue and (
                self._shutdown
                or len(self._queue) >= self._batch_size
                or self._queue[0].seq <= self._flush_upto
                or now >= next_export
            )
            if due and now >= retry_at:
                batch = list(islice(self._queue, self._batch_size))
                for _ in batch:
                    self._queue.popleft()
                self._in_flight = batch
                self._in_flight_bytes = sum(e.size for e in batch)
                self._queue_bytes -= self._in_flight_bytes
                return batch
            wake_at = max(retry_at, now) if due else next_export
            if self._stop_by is not None:
                wake_at = min(wake_at, self._stop_by)
            self._wake.wait(max(0.0, wake_at - now))

    def _past_stop(self, retry_at: float) -> bool:
        """Shutting down and the next try would come after the deadline."""
        assert self._stop_by is not None
        return max(retry_at, time.monotonic()) >= self._stop_by

    def _send(self, batch: list[_Entry]) -> SendOutcome:
        timeout = self._export_timeout
        if self._stop_by is not None:
            timeout = max(0.001, min(timeout, self._stop_by - time.monotonic()))
        started = time.monotonic()
        try:
            outcome = self._exporter.send(self._exporter.encode([e.span for e in batch]), timeout)
        except Exception as error:  # an encoding bug must not kill the worker
            log.exception("exporting %d spans failed", len(batch))
            outcome = SendOutcome(Outcome.PERMANENT, message=repr(error))
        elapsed = time.monotonic() - started
        with self._lock:
            self._stats["export_requests"] += 1
            self._last_latency = elapsed
            self._latency_total += elapsed
        return outcome

    def _requeue(self, batch: list[_Entry], outcome: SendOutcome) -> None:
        """Put a batch back at the head of the queue to retry it, then re-bound (lock held)."""
        self._stats["export_retries"] += 1
        self._note_failure(f"export failed, will retry: {outcome.message}")
        self._queue.extendleft(reversed(batch))
        self._queue_bytes += sum(e.size for e in batch)
        self._trim()

    def _settle(self, batch: list[_Entry], outcome: SendOutcome) -> None:
        """Count a batch that will not be sent again (lock held)."""
        if outcome.outcome is Outcome.PERMANENT:
            self._stats["spans_failed"] += len(batch)
            self._note_failure(f"export failed, {len(batch)} spans dropped: {outcome.message}")
            return
        rejected = min(outcome.rejected, len(batch))
        self._stats["spans_exported"] += len(batch) - rejected
        if outcome.outcome is Outcome.PARTIAL:
            self._stats["spans_rejected"] += rejected
            log.warning(
                "collector rejected %d of %d spans: %s", rejected, len(batch), outcome.message
            )
        if self._failing_since is not None:
            log.info("export works again")
        self._failing_since = None

    def _note_failure(self, message: str) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning("%s", message)

    def _drop_remaining(self) -> None:
        with self._lock:
            self._stopped_clean = not self._queue
            if self._queue:
                self._stats["spans_dropped"] += len(self._queue)
                self._queue.clear()
                self._queue_bytes = 0
            self._settled.notify_all()
