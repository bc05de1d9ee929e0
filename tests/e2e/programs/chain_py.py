"""One service of a chain, in Python: answers every GET after asking the next service.

    chain_py.py [--mode thread|asyncio] [--host H] [--port P] [--downstream URL] [--delay-ms N]

Prints its port on stdout once listening, then serves until killed. A request
for PATH is passed on as a GET for the same PATH to ``--downstream`` (if
given), then answered 200 after ``--delay-ms`` (a database-like service sets
only that). ``thread`` serves each request on a thread of its own
(ThreadingHTTPServer); ``asyncio`` serves all of them on one event loop.
Nothing here knows about tracing: no header is read or added.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


def answer(name: str, path: str, downstream: str) -> bytes:
    return f"{name} {path} <- {downstream}\n".encode()


def serve_threads(args: argparse.Namespace) -> None:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            downstream = ""
            if args.downstream:
                url = urlsplit(args.downstream)
                connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
                connection.request("GET", self.path)
                response = connection.getresponse()
                downstream = f"{response.status} {response.read().decode().strip()}"
                connection.close()
            time.sleep(args.delay_ms / 1000)
            body = answer(args.name, self.path, downstream)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *values: object) -> None:
            pass

    ThreadingHTTPServer.request_queue_size = 256  # many clients connect at once
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


async def fetch(url: str, path: str) -> str:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode()
    )
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return f"{head.split()[1].decode()} {body.decode().strip()}"


async def serve_loop(args: argparse.Namespace) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.close()
            return
        path = head.split()[1].decode()
        downstream = await fetch(args.downstream, path) if args.downstream else ""
        await asyncio.sleep(args.delay_ms / 1000)
        body = answer(args.name, path, downstream)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, args.host, args.port, backlog=256)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("thread", "asyncio"), default="thread")
    parser.add_argument("--name", default="py")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--downstream", default="")
    parser.add_argument("--delay-ms", type=int, default=0)
    args = parser.parse_args()
    if args.mode == "thread":
        serve_threads(args)
    else:
        asyncio.run(serve_loop(args))


if __name__ == "__main__":
    main()
