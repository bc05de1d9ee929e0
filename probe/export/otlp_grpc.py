"""OTLP/gRPC trace export: ``TraceService/Export`` on one long-lived channel.

Sends the bytes `probe.export.otlp_wire` encodes as they are, and classifies
the answer as the OTLP specification says, like the HTTP transport in
`probe.export.otlp`; kept apart so that the grpc package is imported only by
those who choose gRPC.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from probe.export.batch import Outcome, SendOutcome
from probe.export.otlp import USER_AGENT, OtlpExporter, partial_outcome

# Retryable per the OTLP specification; RESOURCE_EXHAUSTED only with RetryInfo.
_GRPC_RETRYABLE = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
# Where gRPC carries a google.rpc.Status with details such as RetryInfo.
STATUS_DETAILS_KEY = "grpc-status-details-bin"
EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class OtlpGrpcSpanExporter(OtlpExporter):
    """OTLP/gRPC: ``TraceService/Export`` on one long-lived channel."""

    def __init__(
        self,
        endpoint: str = "http://localhost:4317",
        *,
        insecure: bool = False,
        certificate_file: str | None = None,
        headers: Mapping[str, str] | None = None,
        compression: str | None = None,
        timeout: float = 10.0,
        max_reconnect_backoff_millis: int = 5000,
    ) -> None:
        """``endpoint`` is ``host:port`` or a URL; ``http://`` means plaintext and
        ``https://`` TLS, overriding ``insecure``, as OTel SDKs do."""
        super().__init__(timeout)
        target, secure = _grpc_target(endpoint, insecure)
        options = [
            ("grpc.primary_user_agent", USER_AGENT),
            # gRPC's own reconnect backoff grows to 2 minutes; keep it near ours so a
            # collector that comes back is noticed soon.
            ("grpc.max_reconnect_backoff_ms", max_reconnect_backoff_millis),
            ("grpc.initial_reconnect_backoff_ms", min(1000, max_reconnect_backoff_millis)),
        ]
        channel_compression = _grpc_compression(compression)
        if secure:
            root = None
            if certificate_file:
                with open(certificate_file, "rb") as f:
                    root = f.read()
            credentials = grpc.ssl_channel_credentials(root_certificates=root)
            self._channel = grpc.secure_channel(
                target, credentials, options, compression=channel_compression
            )
        else:
            self._channel = grpc.insecure_channel(target, options, compression=channel_compression)
        # The request is already serialized: no request_serializer, gRPC sends the bytes.
        self._export = self._channel.unary_unary(
            EXPORT_METHOD,
            request_serializer=None,
            response_deserializer=ExportTraceServiceResponse.FromString,
        )
        self._metadata = tuple((k.lower(), v) for k, v in (headers or {}).items())

    def send(self, request: bytes, timeout: float | None = None) -> SendOutcome:
        try:
            response = self._export(
                request, timeout=timeout or self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            return _grpc_outcome(error)
        return partial_outcome(response)

    def shutdown(self) -> None:
        super().shutdown()
        self._channel.close()


def _grpc_target(endpoint: str, insecure: bool) -> tuple[str, bool]:
    """The channel target and whether to use TLS."""
    if "://" not in endpoint:
        return endpoint, not insecure
    url = urlsplit(endpoint)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise ValueError(f"bad OTLP/gRPC endpoint {endpoint!r}")
    return url.netloc, url.scheme == "https"


def _grpc_compression(compression: str | None) -> grpc.Compression:
    if compression in (None, "none"):
        return grpc.Compression.NoCompression
    if compression == "gzip":
        return grpc.Compression.Gzip
    raise ValueError(f"unsupported compression {compression!r}")


def _grpc_outcome(error: grpc.RpcError) -> SendOutcome:
    call: Any = error  # a failed unary call is both an RpcError and a grpc.Call
    code = call.code()
    message = f"{code.name}: {call.details()}"
    delay = _grpc_retry_delay(call.trailing_metadata() or ())
    if code in _GRPC_RETRYABLE or (
        code is grpc.StatusCode.RESOURCE_EXHAUSTED and delay is not None
    ):
        return SendOutcome(Outcome.RETRYABLE, message=message, retry_after=delay)
    return SendOutcome(Outcome.PERMANENT, message=message)


def _grpc_retry_delay(metadata: Sequence[tuple[str, Any]]) -> float | None:
    """Seconds from a google.rpc.RetryInfo in the status details, if the server sent one."""
    for key, value in metadata:
        if key != STATUS_DETAILS_KEY:
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            return None
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None
