"""Addresses of connections the probe did not see open, read from /proc.

A connection that existed before the probe started is first seen in its
data, with no address. ``/proc/PID/fd/FD`` names its socket inode, and
``/proc/PID/net/tcp{,6}`` lists the sockets of *that process's* network
namespace (socket diagnostics over netlink would see only the probe's own
namespace), so the lookup is right for containers too.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from probe.kernel.events import Endpoint

_SOCKET_LINK = re.compile(r"socket:\[(\d+)\]")


@dataclass(frozen=True, slots=True)
class SocketInfo:
    """What /proc tells of one file descriptor."""

    is_socket: bool
    gone: bool = False  # the process or descriptor no longer exists
    is_tcp: bool = False
    local: Endpoint | None = None
    peer: Endpoint | None = None


def _ipv4(hex_addr: str) -> str:
    # /proc prints the address as one 32-bit word in host (little-endian) order.
    return socket.inet_ntop(socket.AF_INET, bytes.fromhex(hex_addr)[::-1])


def _ipv6(hex_addr: str) -> str:
    # Four 32-bit words, each in host order.
    raw = b"".join(bytes.fromhex(hex_addr[i : i + 8])[::-1] for i in range(0, 32, 8))
    return unmap_ipv4(socket.inet_ntop(socket.AF_INET6, raw))


def unmap_ipv4(address: str) -> str:
    """``::ffff:127.0.0.1`` -> ``127.0.0.1``: a dual-stack socket's IPv4 peer."""
    return address[7:] if address.startswith("::ffff:") and "." in address else address


def _endpoint(field: str, ipv6: bool) -> Endpoint:
    hex_addr, hex_port = field.split(":")
    address = _ipv6(hex_addr) if ipv6 else _ipv4(hex_addr)
    return Endpoint(address, int(hex_port, 16))


def _socket_inode(pid: int, fd: int, proc: Path) -> str | None:
    """The inode of the socket that descriptor ``fd`` of ``pid`` is; "" when it
    is not a socket, None when the descriptor (or the process) is gone."""
    try:
        target = os.readlink(proc / str(pid) / "fd" / str(fd))
    except OSError:
        return None
    match = _SOCKET_LINK.fullmatch(target)
    return match.group(1) if match else ""


def is_socket(pid: int, fd: int, proc: Path = Path("/proc")) -> bool:
    """Whether descriptor ``fd`` of ``pid`` is a socket now; never raises."""
    return bool(_socket_inode(pid, fd, proc))


def lookup(pid: int, fd: int, proc: Path = Path("/proc")) -> SocketInfo:
    """Resolve one descriptor of one process; never raises."""
    wanted = _socket_inode(pid, fd, proc)
    if wanted is None:
        return SocketInfo(is_socket=False, gone=True)
    if not wanted:
        return SocketInfo(is_socket=False)
    for name, ipv6 in (("tcp", False), ("tcp6", True)):
        try:
            lines = (proc / str(pid) / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[9] == wanted:
                return SocketInfo(
                    is_socket=True,
                    is_tcp=True,
                    local=_endpoint(fields[1], ipv6),
                    peer=_endpoint(fields[2], ipv6),
                )
    return SocketInfo(is_socket=True)
