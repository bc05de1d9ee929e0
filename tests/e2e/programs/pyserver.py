"""An HTTP/1.1 test server on ThreadingHTTPServer, run as its own process.

Prints its port on stdout once listening, then serves until killed. Every
response carries ``X-Thread-Id`` (the handling thread's native id) so a test
can check a span's ``thread.id``. Routes, for any method (unknown ones too):

    /status/NNN[/...]  answer NNN
    /chunked?n=N&size=S  a chunked body of N chunks of S bytes
    /close             read the request, then close without answering
    /slow?ms=M         answer after M milliseconds
    anything else      200, body "<METHOD> <path> <request body length>\\n"
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive by default

    def __getattr__(self, name: str):
        # BaseHTTPRequestHandler dispatches to do_<METHOD>; serve every method alike.
        if name.startswith("do_"):
            return self.serve
        raise AttributeError(name)

    def serve(self) -> None:
        url = urlsplit(self.path)
        query = {key: values[0] for key, values in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        received = len(self.rfile.read(length)) if length else 0

        if url.path == "/close":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if url.path == "/chunked":
            self.send_chunked(int(query.get("n", 3)), int(query.get("size", 100)))
            return
        if url.path == "/slow":
            time.sleep(int(query.get("ms", 100)) / 1000)
        status = 200
        if url.path.startswith("/status/"):
            status = int(url.path.split("/")[2])
        self.send_body(status, f"{self.command} {url.path} {received}\n".encode())

    def send_body(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Thread-Id", str(threading.get_native_id()))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_chunked(self, count: int, size: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Thread-Id", str(threading.get_native_id()))
        self.end_headers()
        for _ in range(count):
            self.wfile.write(b"%x\r\n%s\r\n" % (size, b"x" * size))
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep the test output clean


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # 50 clients connect at once in a test


class Server6(Server):
    address_family = socket.AF_INET6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    server_class = Server6 if ":" in args.host else Server
    server = server_class((args.host, 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
