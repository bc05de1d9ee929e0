"""programs/pyserver.py's server behind Python's ssl module (OpenSSL, socket BIO).

python tls_pyserver.py CERT KEY   serve HTTPS on 127.0.0.1, print the port, serve until killed
"""

from __future__ import annotations

import ssl
import sys

from pyserver import Handler, Server


def main() -> None:
    cert, key = sys.argv[1:3]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = Server(("127.0.0.1", 0), Handler)
    # The handshake runs in each connection's own thread, not in accept().
    server.socket = context.wrap_socket(
        server.socket, server_side=True, do_handshake_on_connect=False
    )
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
