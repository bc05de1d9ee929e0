"""Real OTLP receivers for tests: gRPC (grpcio) and HTTP (http.server).

Both listen on 127.0.0.1 (an ephemeral port unless told one), decode every
`ExportTraceServiceRequest` they get, and answer from a script of `Reply`
values, one per request (success once the script runs out). Tests read what
arrived from ``received`` (every request) and ``accepted`` (requests answered
with success or partial success).
"""

from __future__ import annotations

import contextlib
import gzip
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from probe.export.otlp_grpc import STATUS_DETAILS_KEY
from tests.helpers import self_signed_certificate


@dataclass(frozen=True)
class Reply:
    """One scripted answer; the gRPC receiver reads ``code``, the HTTP one ``http_status``."""

    code: grpc.StatusCode = grpc.StatusCode.OK
    http_status: int = 200
    retry_delay: float | None = None  # gRPC RetryInfo / HTTP Retry-After, in seconds
    rejected: int = 0  # partial success
    message: str = ""

    @property
    def accepted(self) -> bool:
        return self.code is grpc.StatusCode.OK and self.http_status == 200


@dataclass(frozen=True)
class Received:
    request: ExportTraceServiceRequest
    headers: dict[str, str]  # gRPC metadata or HTTP headers, keys lower-cased
    at: float  # time.monotonic() on arrival
    accepted: bool


class _Receiver:
    def __init__(self, replies: Iterable[Reply] = ()) -> None:
        self._replies = deque(replies)
        self._lock = threading.Condition()
        self.received: list[Received] = []

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self._replies.extend(replies)

    def _next(self, request: ExportTraceServiceRequest, headers: dict[str, str]) -> Reply:
        with self._lock:
            reply = self._replies.popleft() if self._replies else Reply()
            self.received.append(Received(request, headers, time.monotonic(), reply.accepted))
            self._lock.notify_all()
            return reply

    @property
    def accepted(self) -> list[ExportTraceServiceRequest]:
        with self._lock:
            return [r.request for r in self.received if r.accepted]

    def wait_for(self, requests: int, timeout: float = 20.0) -> list[Received]:
        """Wait until at least ``requests`` requests have arrived."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self.received) >= requests, timeout):
                raise TimeoutError(f"{len(self.received)} requests arrived, wanted {requests}")
            return list(self.received)


@dataclass(frozen=True)
class Tls:
    """A server certificate and its key (PEM files); the certificate is its own CA."""

    cert_file: str
    key_file: str

    @classmethod
    def self_signed(cls, directory: Path) -> Tls:
        """A new certificate for 127.0.0.1 and localhost, in ``directory``."""
        cert, key = self_signed_certificate(directory)
        return cls(str(cert), str(key))


class GrpcReceiver(_Receiver, trace_service_pb2_grpc.TraceServiceServicer):
    """OTLP/gRPC receiver on 127.0.0.1; with TLS when given a key and certificate."""

    def __init__(
        self, replies: Iterable[Reply] = (), port: int = 0, tls: Tls | None = None
    ) -> None:
        super().__init__(replies)
        self._scheme = "https" if tls else "http"
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4),
            options=[("grpc.so_reuseport", 0)],  # a second receiver must not share the port
        )
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        if tls:
            with open(tls.key_file, "rb") as key, open(tls.cert_file, "rb") as cert:
                credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
            self.port = self._server.add_secure_port(f"127.0.0.1:{port}", credentials)
        else:
            self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self._server.start()

    @property
    def endpoint(self) -> str:
        return f"{self._scheme}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.stop(grace=None).wait()

    def Export(self, request, context):  # noqa: N802 (the generated servicer's name)
        headers = {k.lower(): v for k, v in context.invocation_metadata()}
        reply = self._next(request, headers)
        if reply.code is not grpc.StatusCode.OK:
            if reply.retry_delay is not None:
                context.set_trailing_metadata([(STATUS_DETAILS_KEY, _status(reply))])
            context.abort(reply.code, reply.message)
        return _response(reply)


class HttpReceiver(_Receiver):
    """OTLP/HTTP receiver on 127.0.0.1, at /v1/traces, HTTP/1.1 with keep-alive; with TLS
    when given a key and certificate."""

    def __init__(
        self, replies: Iterable[Reply] = (), port: int = 0, tls: Tls | None = None
    ) -> None:
        super().__init__(replies)
        self._scheme = "https" if tls else "http"
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        if tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(tls.cert_file, tls.key_file)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._server.daemon_threads = True
        self._connections: set[socket.socket] = set()  # kept-alive ones outlive shutdown()
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            args=(0.05,),
            daemon=True,  # quick to stop
        )
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"{self._scheme}://127.0.0.1:{self.port}/v1/traces"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):  # it may be closing already
                    connection.shutdown(socket.SHUT_RDWR)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with receiver._lock:
                    receiver._connections.add(self.connection)

            def finish(self) -> None:
                with receiver._lock:
                    receiver._connections.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path != "/v1/traces":
                    return self._answer(404, b"", {})
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                headers = {k.lower(): v for k, v in self.headers.items()}
                reply = receiver._next(request, headers)
                extra = {}
                if reply.retry_delay is not None:
                    extra["Retry-After"] = str(int(reply.retry_delay))
                if reply.http_status == 200:
                    payload = _response(reply).SerializeToString()
                else:
                    payload = _status(reply)
                self._answer(reply.http_status, payload, extra)

            def _answer(self, code: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(body)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler


def _response(reply: Reply) -> ExportTraceServiceResponse:
    response = ExportTraceServiceResponse()
    if reply.rejected or reply.message:
        response.partial_success.rejected_spans = reply.rejected
        response.partial_success.error_message = reply.message
    return response


def _status(reply: Reply) -> bytes:
    """A serialized google.rpc.Status, with RetryInfo when the reply has a delay."""
    status = status_pb2.Status(code=reply.code.value[0], message=reply.message)
    if reply.retry_delay is not None:
        seconds = int(reply.retry_delay)
        delay = Duration(seconds=seconds, nanos=round((reply.retry_delay - seconds) * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status.SerializeToString()


def decode_value(value: AnyValue) -> object:
    """An OTLP AnyValue back to the Python value the probe's span model uses."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [decode_value(v) for v in value.array_value.values]
    return getattr(value, kind)


def decode_attributes(pairs: Iterable) -> dict[str, object]:
    return {pair.key: decode_value(pair.value) for pair in pairs}


def span_ids(requests: Iterable[ExportTraceServiceRequest]) -> list[bytes]:
    """Every span id in the requests, in order, duplicates kept."""
    return [
        span.span_id
        for request in requests
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    ]
