"""OTLP trace export over HTTP (http/protobuf, the default) and over gRPC.

The two transports send the request bytes that `probe.export.otlp_wire`
encodes (no protobuf message objects on the way out). gRPC's lives in
`probe.export.otlp_grpc`, imported only when it is asked for: the grpc
package adds 18 MB to the process and starts threads of its own. Each
transport's `send` sends one request once and classifies the answer as the
OTLP specification says (success, partial success, retryable with the
server's delay, permanent); retrying is the `BatchSpanProcessor`'s job. `export` is the plain
`SpanExporter` face: one attempt, partial success counted as success.
`create_processor` builds the configured exporter behind a BatchSpanProcessor.
"""

from __future__ import annotations

import email.utils
import gzip
import http.client
import ssl
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

import probe
from probe.config import ProbeConfig
from probe.export.base import ExportResult
from probe.export.batch import SUCCESS, BatchSpanProcessor, Outcome, SendOutcome
from probe.export.otlp_wire import TraceRequestEncoder
from probe.stats import Stats
from probe.trace.span import Span

USER_AGENT = f"probe/{probe.__version__}"

# -- from the configuration ----


def create_exporter(config: ProbeConfig) -> OtlpExporter:
    """The exporter ``config`` asks for."""
    options: dict[str, Any] = {
        "certificate_file": config.otlp_certificate,
        "headers": config.otlp_headers,
        "compression": config.otlp_compression,
        "timeout": config.otlp_timeout_ms / 1000,
    }
    if config.otlp_protocol == "http/protobuf":
        return OtlpHttpSpanExporter(config.otlp_endpoint, **options)
    from probe.export.otlp_grpc import OtlpGrpcSpanExporter  # noqa: PLC0415 - see above

    return OtlpGrpcSpanExporter(config.otlp_endpoint, insecure=config.otlp_insecure, **options)


def create_processor(config: ProbeConfig, stats: Stats) -> BatchSpanProcessor:
    """A running BatchSpanProcessor feeding the configured OTLP exporter."""
    return BatchSpanProcessor(
        create_exporter(config),
        stats,
        max_queue_size=config.bsp_max_queue_size,
        max_queue_bytes=config.bsp_max_queue_bytes,
        max_export_batch_size=config.bsp_max_export_batch_size,
        schedule_delay_millis=config.bsp_schedule_delay_ms,
        export_timeout_millis=config.bsp_export_timeout_ms,
    )


# -- the shared exporter face ----


def partial_outcome(response: ExportTraceServiceResponse) -> SendOutcome:
    partial = response.partial_success
    if partial.rejected_spans or partial.error_message:
        return SendOutcome(Outcome.PARTIAL, partial.rejected_spans, partial.error_message)
    return SUCCESS


class OtlpExporter:
    """`SpanExporter` on top of a transport's `send`."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout  # seconds, for a send that names none
        self._closed = False
        self._encoder = TraceRequestEncoder()

    def encode(self, spans: Sequence[Span]) -> bytes:
        """An ExportTraceServiceRequest, serialized."""
        return self._encoder.encode(spans)

    def send(self, request: bytes, timeout: float | None = None) -> SendOutcome:
        raise NotImplementedError

    def export(self, spans: Sequence[Span]) -> ExportResult:
        if self._closed:
            return ExportResult.FAILURE
        outcome = self.send(self.encode(spans))
        ok = outcome.outcome in (Outcome.SUCCESS, Outcome.PARTIAL)
        return ExportResult.SUCCESS if ok else ExportResult.FAILURE

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True  # nothing is buffered here

    def shutdown(self) -> None:
        self._closed = True


# -- HTTP ----

_HTTP_RETRYABLE = frozenset({429, 502, 503, 504})
_CONTENT_TYPE = "application/x-protobuf"


class OtlpHttpSpanExporter(OtlpExporter):
    """OTLP/HTTP with binary protobuf bodies, on one kept-alive connection."""

    def __init__(
        self,
        endpoint: str = "http://localhost:4318/v1/traces",
        *,
        certificate_file: str | None = None,
        headers: Mapping[str, str] | None = None,
        compression: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        """``endpoint`` is the full URL, ``/v1/traces`` included."""
        super().__init__(timeout)
        url = urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"bad OTLP/HTTP endpoint {endpoint!r}")
        if compression not in (None, "none", "gzip"):
            raise ValueError(f"unsupported compression {compression!r}")
        self._gzip = compression == "gzip"
        self._host = url.hostname
        self._port = url.port
        self._path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self._tls: ssl.SSLContext | None = None
        if url.scheme == "https":
            self._tls = ssl.create_default_context(cafile=certificate_file)
        self._headers = {
            **(headers or {}),
            "Content-Type": _CONTENT_TYPE,
            "User-Agent": USER_AGENT,
        }
        if self._gzip:
            self._headers["Content-Encoding"] = "gzip"
        self._connection: http.client.HTTPConnection | None = None

    def send(self, request: bytes, timeout: float | None = None) -> SendOutcome:
        body = request
        if self._gzip:
            body = gzip.compress(body, compresslevel=6)
        try:
            status, reason, response_headers, data = self._post(body, timeout or self._timeout)
        except (OSError, http.client.HTTPException) as error:
            return SendOutcome(Outcome.RETRYABLE, message=f"{type(error).__name__}: {error}")
        if 200 <= status < 300:
            try:
                return partial_outcome(ExportTraceServiceResponse.FromString(data))
            except DecodeError:
                return SUCCESS  # accepted; an answer we cannot read adds nothing
        message = f"HTTP {status} {reason}: {_error_text(data, response_headers)}"
        if status in _HTTP_RETRYABLE:
            delay = _retry_after(response_headers.get("Retry-After"))
            return SendOutcome(Outcome.RETRYABLE, message=message, retry_after=delay)
        return SendOutcome(Outcome.PERMANENT, message=message)

    def _post(self, body: bytes, timeout: float) -> tuple[int, str, http.client.HTTPMessage, bytes]:
        reused = self._connection is not None
        connection = self._connection or self._connect(timeout)
        self._connection = connection
        if connection.sock is not None:
            connection.sock.settimeout(timeout)
        try:
            connection.request("POST", self._path, body, self._headers)
            response = connection.getresponse()
            data = response.read()
        except (ConnectionError, http.client.RemoteDisconnected):
            self._close()
            if not reused:
                raise
            # The collector closed the idle kept-alive connection: one more try, fresh.
            return self._post(body, timeout)
        except (OSError, http.client.HTTPException):
            self._close()
            raise
        if response.will_close:
            self._close()
        if response.headers.get("Content-Encoding", "").lower() == "gzip":
            data = gzip.decompress(data)  # a bad stream raises BadGzipFile, an OSError
        return response.status, response.reason, response.headers, data

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        if self._tls is not None:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=self._tls
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def shutdown(self) -> None:
        super().shutdown()
        self._close()


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_text(data: bytes, headers: http.client.HTTPMessage) -> str:
    """The collector's explanation: a google.rpc.Status message, or the body's text."""
    if headers.get("Content-Type", "").startswith(_CONTENT_TYPE):
        try:
            return status_pb2.Status.FromString(data).message
        except DecodeError:
            pass
    return data[:200].decode("utf-8", "replace")
