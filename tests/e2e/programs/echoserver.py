"""A raw TCP echo server, run as its own process: no HTTP anywhere.

Prints its port on stdout once listening, then echoes every connection's
bytes back until the peer closes.
"""

from __future__ import annotations

import socketserver


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def main() -> None:
    server = Server(("127.0.0.1", 0), Echo)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
