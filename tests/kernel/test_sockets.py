"""Resolving pre-existing connections from a /proc tree."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from probe.kernel.events import Endpoint
from probe.kernel.sockets import lookup

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 4242 1
"""
TCP6 = """\
  sl  local_address                         remote_address                        st inode
   0: 00000000000000000000000001000000:1F91 00000000000000000000000001000000:C350 01 00000000:00000000 00:00000000 00000000     0        0 4343 1
   1: 0000000000000000FFFF00000100007F:1F92 0000000000000000FFFF00000200007F:C351 01 00000000:00000000 00:00000000 00000000     0        0 4444 1
"""  # noqa: E501


def _proc(tmp_path: Path) -> Path:
    fd_dir = tmp_path / "10" / "fd"
    fd_dir.mkdir(parents=True)
    (tmp_path / "10" / "net").mkdir()
    (tmp_path / "10" / "net" / "tcp").write_text(TCP)
    (tmp_path / "10" / "net" / "tcp6").write_text(TCP6)
    os.symlink("socket:[4242]", fd_dir / "3")
    os.symlink("socket:[4343]", fd_dir / "4")
    os.symlink("socket:[4444]", fd_dir / "5")
    os.symlink("socket:[999]", fd_dir / "6")
    os.symlink("/var/log/app.log", fd_dir / "7")
    return tmp_path


def test_ipv4_connection(tmp_path: Path) -> None:
    found = lookup(10, 3, _proc(tmp_path))
    assert found.is_tcp
    assert (found.local, found.peer) == (Endpoint("127.0.0.1", 8080), Endpoint("127.0.0.1", 54321))


def test_ipv6_and_mapped_ipv4(tmp_path: Path) -> None:
    proc = _proc(tmp_path)
    found = lookup(10, 4, proc)
    assert (found.local, found.peer) == (Endpoint("::1", 8081), Endpoint("::1", 50000))
    mapped = lookup(10, 5, proc)
    assert (mapped.local, mapped.peer) == (
        Endpoint("127.0.0.1", 8082),
        Endpoint("127.0.0.2", 50001),
    )


def test_non_tcp_socket_and_file_and_missing(tmp_path: Path) -> None:
    proc = _proc(tmp_path)
    unix = lookup(10, 6, proc)
    assert unix.is_socket and not unix.is_tcp and unix.local is None
    file = lookup(10, 7, proc)
    assert not file.is_socket and not file.gone
    assert lookup(10, 99, proc).gone
    assert lookup(11, 3, proc).gone


def test_a_real_socket_of_this_process() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        with client, accepted:
            found = lookup(os.getpid(), client.fileno())
            assert found.local == Endpoint(*client.getsockname())
            assert found.peer == Endpoint(*server.getsockname())
