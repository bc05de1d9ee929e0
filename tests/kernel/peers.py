"""Small programs the kernel tests trace (the probe never traces its own pid).

python peers.py server PORT FILE   accept one connection: recvmsg into two
                                   buffers, answer with sendmsg of three
                                   iovecs, then sendfile FILE, close
python peers.py client PORT SIZE [linger]
                                   connect, send a request with writev-like
                                   sendmsg, then SIZE bytes with one write,
                                   read until the server is done; with
                                   linger, close only when stdin closes
python peers.py udp PORT           connect a UDP socket and send a datagram
python peers.py chatter PORT COUNT [HEX [bytewise]]
                                   one connection to itself: COUNT sends of
                                   the bytes HEX gives (default: 10 bytes of
                                   HTTP), each received before the next (with
                                   bytewise, a byte per recv)
python peers.py tls_chatter PORT COUNT HEX CERT KEY
                                   the same over TLS (Python's ssl: the
                                   system's OpenSSL), the server end in a
                                   thread
python peers.py conversation PORT COUNT
                                   one connection to itself: COUNT requests
                                   (GET /K), each written in two parts, each
                                   answered in two parts, back to back
python peers.py conversations PORT COUNT
                                   COUNT connections to itself in turn, one
                                   conversation request each
python peers.py continued PORT COUNT
                                   the same, each request a head with Expect:
                                   100-continue, then its body once the
                                   server has answered 100 Continue
python peers.py large PORT COUNT   one connection to itself: COUNT requests,
                                   each answered LARGE_HEAD, then a 64 KiB
                                   body in LARGE_PARTS' sixteen sends,
                                   received 4 KiB at a time
python peers.py relay PORT NAME    one connection to itself: the main thread
                                   sends GET /a, a thread named NAME sends
                                   GET /b on it, then takes another name and
                                   sends GET /c on a connection of its own
python peers.py edge_connect PORT  connect with the address in the last 16
                                   bytes before an unreadable page, send
                                   GET / and close
python peers.py exec_reader PORT FILE
                                   connect on descriptor 9, close-on-exec as
                                   Python's sockets are, send GET /before, then
                                   exec a Python that reads FILE on descriptor 9
python peers.py exec_acceptor PORT FILE
                                   accept one connection (close-on-exec), read
                                   nothing from it, then exec a Python that
                                   reads FILE on the connection's descriptor
python peers.py late_reader PORT
                                   accept one connection, say so, then read
                                   its request once a line comes on stdin
python peers.py holder PORT SECONDS [N [handover]]
                                   accept a connection without an address
                                   buffer (as libuv does), read its request,
                                   hold it SECONDS, close; N times (default 1).
                                   With handover, read it on a duplicate of its
                                   descriptor, the accepted one closed first (as
                                   a Node cluster worker gets its connections)

With PEER_COMM set, the program first takes that process name (as in ps).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Iterator

PR_SET_NAME = 15
PROT_NONE = 0  # mmap has no name for it before Python 3.13


def server(port: int, path: str) -> None:
    with socket.create_server(("127.0.0.1", port)) as listener:
        print("listening", flush=True)
        conn, _ = listener.accept()
        with conn:
            first, second = bytearray(16), bytearray(65536)
            conn.recvmsg_into([first, second])
            conn.sendmsg([b"HTTP/1.1 200 OK\r\n", b"Content-Length: 5\r\n", b"\r\n"])
            with open(path, "rb") as body:
                os.sendfile(conn.fileno(), body.fileno(), 0, 5)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass


def client(port: int, size: int, linger: bool = False) -> None:
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendmsg([b"POST /upload ", b"HTTP/1.1\r\n", b"Content-Length: %d\r\n\r\n" % size])
        os.write(conn.fileno(), b"x" * size)
        while conn.recv(65536):
            pass
        if linger:
            sys.stdin.read()


def udp(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("127.0.0.1", port))
        sock.send(b"GET / HTTP/1.1\r\n\r\n")


def receive(sock: socket.socket, size: int, most: int = 65536) -> None:
    """Receive exactly ``size`` bytes, at most ``most`` per call."""
    received = 0
    while received < size:
        received += len(sock.recv(min(most, size - received)))


@contextlib.contextmanager
def connection_to_itself(port: int) -> Iterator[tuple[socket.socket, socket.socket]]:
    """One TCP connection on loopback, both ends in this process: (client's, server's)."""
    with (
        socket.create_server(("127.0.0.1", port)) as listener,
        socket.create_connection(("127.0.0.1", port)) as out,
    ):
        conn, _ = listener.accept()
        with conn:
            yield out, conn


def take_turns(turns: list[tuple[socket.socket, socket.socket, list[bytes]]]) -> None:
    """Each turn: the sender writes its parts one by one, then the receiver reads them all."""
    for sender, receiver, parts in turns:
        for part in parts:
            sender.sendall(part)
        receive(receiver, sum(map(len, parts)))


def chatter(port: int, count: int, message: bytes = b"GET /chat ", bytewise: bool = False) -> None:
    with connection_to_itself(port) as (out, conn):
        for _ in range(count):
            out.sendall(message)
            receive(conn, len(message), 1 if bytewise else len(message))


def conversation(port: int, count: int) -> None:
    with connection_to_itself(port) as (out, conn):
        for k in range(count):
            body = b"%d" % k
            request = [b"GET /%d HTTP/1.1\r\n" % k, b"Host: peer\r\n\r\n"]
            response = [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body), body]
            take_turns([(out, conn, request), (conn, out, response)])


def conversations(port: int, count: int) -> None:
    for _ in range(count):
        conversation(port, 1)


# What `large` answers (test_bpf_events.py checks it byte for byte).
LARGE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 65536\r\n\r\n"
LARGE_PARTS = [b"%x" % part * 4095 + b"\n" for part in range(16)]


def large(port: int, count: int) -> None:
    """``count`` exchanges whose response body, 64 KiB, is sent in sixteen
    4 KiB parts and received 4 KiB at a time: calls with one buffer each."""
    with connection_to_itself(port) as (out, conn):
        for k in range(count):
            request = b"GET /large/%d HTTP/1.1\r\nHost: peer\r\n\r\n" % k
            out.sendall(request)
            receive(conn, len(request))
            for part in [LARGE_HEAD, *LARGE_PARTS]:
                conn.sendall(part)
            receive(out, len(LARGE_HEAD) + 65536, most=4096)


def continued(port: int, count: int) -> None:
    with connection_to_itself(port) as (out, conn):
        for k in range(count):
            body = b"body-%d" % k
            head = b"POST /%d HTTP/1.1\r\nContent-Length: %d\r\n" % (k, len(body))
            head += b"Expect: 100-continue\r\n\r\n"
            proceed = b"HTTP/1.1 100 Continue\r\n\r\n"
            response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%d" % (len(b"%d" % k), k)
            take_turns(
                [
                    (out, conn, [head]),
                    (conn, out, [proceed]),
                    (out, conn, [body]),
                    (conn, out, [response]),
                ]
            )


def tls_chatter(port: int, count: int, message: bytes, cert: str, key: str) -> None:
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE

    def echo(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with server_context.wrap_socket(conn, server_side=True) as tls:
            while data := tls.recv(65536):
                tls.sendall(data)

    with socket.create_server(("127.0.0.1", port)) as listener:
        server = threading.Thread(target=echo, args=(listener,))
        server.start()
        with client_context.wrap_socket(socket.create_connection(("127.0.0.1", port))) as tls:
            for _ in range(count):
                tls.sendall(message)
                receive(tls, len(message))
        server.join()


def rename_thread(name: str) -> None:
    """The calling thread's name (comm), alone: a process's threads each have one."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, name.encode(), 0, 0, 0)


def relay(port: int, name: str) -> None:
    def named_thread(out: socket.socket, served: socket.socket) -> None:
        rename_thread(name)
        out.sendall(b"GET /b ")
        receive(served, 7)
        rename_thread("peer-relay")
        with socket.create_connection(("127.0.0.1", port)) as second:
            conn, _ = listener.accept()
            with conn:
                second.sendall(b"GET /c ")
                receive(conn, 7)

    with (
        socket.create_server(("127.0.0.1", port)) as listener,
        socket.create_connection(("127.0.0.1", port)) as out,
    ):
        served, _ = listener.accept()
        with served:
            out.sendall(b"GET /a ")
            receive(served, 7)
            thread = threading.Thread(target=named_thread, args=(out, served))
            thread.start()
            thread.join()


def edge_connect(port: int) -> None:
    page = mmap.PAGESIZE
    pages = mmap.mmap(-1, 2 * page)
    start = ctypes.addressof(ctypes.c_char.from_buffer(pages))
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mprotect(ctypes.c_void_p(start + page), page, PROT_NONE) == 0
    address = socket.inet_aton("127.0.0.1")
    pages[page - 16 : page] = struct.pack("=HH4s8x", socket.AF_INET, socket.htons(port), address)
    with socket.socket() as sock:
        rc = libc.connect(sock.fileno(), ctypes.c_void_p(start + page - 16), 16)
        assert rc == 0, os.strerror(ctypes.get_errno())
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")


def exec_reader(port: int, path: str) -> None:
    # Far above the descriptors the new image's start-up opens and closes.
    with socket.socket() as sock:
        os.dup2(sock.fileno(), 9, inheritable=False)
    conn = socket.socket(fileno=9)  # held: collected, it would close 9
    conn.connect(("127.0.0.1", port))
    conn.sendall(b"GET /before ")
    exec_file_reader(path)


def exec_acceptor(port: int, path: str) -> None:
    with socket.create_server(("127.0.0.1", port)) as listener:
        print("listening", flush=True)
        conn, _ = listener.accept()  # close-on-exec, as Python's sockets are
        exec_file_reader(path, conn.fileno())


def exec_file_reader(path: str, fd: int = 9) -> None:
    """Become a Python that reads ``path`` on descriptor ``fd`` and prints it."""
    reader = f"import os; os.dup2(os.open({path!r}, os.O_RDONLY), {fd}); print(os.read({fd}, 100))"
    os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", reader])


def late_reader(port: int) -> None:
    with socket.create_server(("127.0.0.1", port)) as listener:
        print("listening", flush=True)
        conn, _ = listener.accept()
        print("accepted", flush=True)
        sys.stdin.readline()
        with conn:
            assert conn.recv(4096)
            time.sleep(0.3)


def holder(port: int, seconds: float, connections: int = 1, hand_over: bool = False) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    with socket.create_server(("127.0.0.1", port)) as listener:
        print("listening", flush=True)
        for _ in range(connections):
            fd = libc.accept4(listener.fileno(), None, None, 0)
            assert fd >= 0, os.strerror(ctypes.get_errno())
            if hand_over:  # read on another descriptor, as a worker handed it reads
                accepted, fd = fd, os.dup(fd)
                os.close(accepted)
            assert os.read(fd, 4096)
            time.sleep(seconds)
            os.close(fd)


if __name__ == "__main__":
    if name := os.environ.get("PEER_COMM"):
        rename_thread(name)
    mode, port = sys.argv[1], int(sys.argv[2])
    if mode == "server":
        server(port, sys.argv[3])
    elif mode == "client":
        client(port, int(sys.argv[3]), linger=sys.argv[4:] == ["linger"])
    elif mode == "chatter":
        message = [bytes.fromhex(arg) for arg in sys.argv[4:5]]
        chatter(port, int(sys.argv[3]), *message, bytewise=sys.argv[5:] == ["bytewise"])
    elif mode == "conversation":
        conversation(port, int(sys.argv[3]))
    elif mode == "conversations":
        conversations(port, int(sys.argv[3]))
    elif mode == "continued":
        continued(port, int(sys.argv[3]))
    elif mode == "large":
        large(port, int(sys.argv[3]))
    elif mode == "tls_chatter":
        tls_chatter(port, int(sys.argv[3]), bytes.fromhex(sys.argv[4]), *sys.argv[5:7])
    elif mode == "relay":
        relay(port, sys.argv[3])
    elif mode == "edge_connect":
        edge_connect(port)
    elif mode == "exec_reader":
        exec_reader(port, sys.argv[3])
    elif mode == "exec_acceptor":
        exec_acceptor(port, sys.argv[3])
    elif mode == "late_reader":
        late_reader(port)
    elif mode == "holder":
        connections = int(sys.argv[4]) if len(sys.argv) > 4 else 1
        holder(port, float(sys.argv[3]), connections, hand_over=sys.argv[5:] == ["handover"])
    else:
        udp(port)
