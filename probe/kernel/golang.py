"""Go programs: which functions of a Go binary the uprobes of ``bpf/go.bpf.c``
go on, and attaching them (`GoHandler`, offered every binary by
probe.kernel.discovery).

Goroutines: ``syscall.read``/``syscall.write`` announce each socket read and
write with its goroutine; ``net/http.(*conn).serve`` marks the goroutine of
a server connection, ``runtime.newproc1`` the goroutines it and they create,
and ``net/http.(*persistConn)``'s roundTrip, readLoop and writeLoop tell
which request a client connection's own goroutines work for. TLS:
``crypto/tls.(*Conn)``'s Read, Write and handshake.

Go moves goroutine stacks, so returns are probed at each return instruction,
never with uretprobes. Registers follow Go's internal ABI on x86-64
(arguments in RAX, RBX, RCX, ...; the goroutine in R14), with
``runtime.newproc1``'s arguments as of Go 1.18: older binaries are skipped,
and so are binaries without a symbol table (``-ldflags=-s``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from probe.kernel.elf import find_symbols, is_go_binary, return_offsets

log = logging.getLogger(__name__)

MIN_VERSION = (1, 18)


@dataclass(frozen=True, slots=True)
class GoFunction:
    symbol: str
    entry: str  # BPF function run at its first instruction
    returns: str | None = None  # BPF function run at each of its return instructions


# Needed by all the groups below: every Go program that has one of them has these.
RUNTIME = (
    GoFunction("syscall.read", "go_syscall_enter"),
    GoFunction("syscall.write", "go_syscall_enter"),
    GoFunction("runtime.newproc1", "go_newproc_enter", "go_newproc_return"),
)
# Each group is attached when the binary has all of its functions.
GROUPS = (
    (GoFunction("net/http.(*conn).serve", "go_serve_enter"),),
    (
        GoFunction("net/http.(*persistConn).roundTrip", "go_round_trip"),
        GoFunction("net/http.(*persistConn).readLoop", "go_conn_loop_enter"),
        GoFunction("net/http.(*persistConn).writeLoop", "go_conn_loop_enter"),
    ),
    (
        GoFunction("crypto/tls.(*Conn).Read", "go_tls_read_enter", "go_tls_data_return"),
        GoFunction("crypto/tls.(*Conn).Write", "go_tls_write_enter", "go_tls_data_return"),
        GoFunction(
            "crypto/tls.(*Conn).handshakeContext",
            "go_tls_handshake_enter",
            "go_tls_handshake_return",
        ),
    ),
)


class NotTraceable(Exception):
    """A Go binary whose uprobes cannot or need not be placed; says why."""


@dataclass(frozen=True, slots=True)
class Uprobe:
    symbol: str
    offset: int  # from the symbol's first instruction
    fn_name: str


def go_version(path: str | Path) -> str | None:
    """The Go release that built ``path`` (e.g. "go1.19.8"), read from
    .go.buildinfo; None when it is not written inline (before Go 1.18)."""
    try:
        with open(path, "rb") as stream:
            section = ELFFile(stream).get_section_by_name(".go.buildinfo")
            data = section.data() if section is not None else b""
    except (OSError, ELFError):
        return None
    # 14-byte magic, pointer size, flags (2: strings inline), padding to 32,
    # then the version as a varint-prefixed string.
    if not data.startswith(b"\xff Go buildinf:") or len(data) < 33 or not data[15] & 2:
        return None
    length, shift, position = 0, 0, 32
    while position < len(data):
        byte = data[position]
        position += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return data[position : position + length].decode("utf-8", "replace")
    return None


def _release(version: str) -> tuple[int, int] | None:
    match = re.search(r"go(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


def plan(path: str | Path) -> list[Uprobe]:
    """Where the uprobes go in the Go binary ``path``: none if it uses neither
    net/http nor crypto/tls; NotTraceable if they cannot be placed."""
    version = go_version(path) or "a Go older than 1.18"
    release = _release(version)
    if release is None or release < MIN_VERSION:
        raise NotTraceable(f"built by {version}; the probe needs Go 1.18 or later")
    names = [f.symbol for f in RUNTIME] + [f.symbol for g in GROUPS for f in g]
    symbols = find_symbols(path, names)
    if not symbols:
        raise NotTraceable("no symbol table (stripped with -ldflags=-s?)")
    groups = [g for g in GROUPS if all(f.symbol in symbols for f in g)]
    if not groups:
        return []  # neither net/http nor crypto/tls: nothing to follow
    missing = [f.symbol for f in RUNTIME if f.symbol not in symbols]
    if missing:
        raise NotTraceable(f"no {', '.join(missing)} among its symbols")
    uprobes = []
    for function in [*RUNTIME, *(f for group in groups for f in group)]:
        uprobes.append(Uprobe(function.symbol, 0, function.entry))
        if function.returns is not None:
            offsets = return_offsets(path, symbols[function.symbol])
            if not offsets:
                raise NotTraceable(f"no return instruction found in {function.symbol}")
            uprobes += [Uprobe(function.symbol, off, function.returns) for off in offsets]
    return uprobes


class GoHandler:
    """The `BinaryHandler` for Go binaries (see probe.kernel.discovery).

    A Go binary that cannot be probed is declined in `wants`, with one log
    line saying why; the plan made there is what `attach` then places."""

    name = "go"

    def __init__(self, bpf) -> None:
        self._bpf = bpf
        self._plans: dict[str, list[Uprobe]] = {}

    def wants(self, path: str) -> bool:
        if not is_go_binary(path):
            return False
        try:
            uprobes = plan(path)
        except NotTraceable as reason:
            log.warning("go: not probing %s: %s", path, reason)
            return False
        if not uprobes:
            log.info("go: not probing %s: it uses neither net/http nor crypto/tls", path)
            return False
        self._plans[path] = uprobes
        return True

    def attach(self, path: str) -> list[str]:
        uprobes = self._plans.pop(path, None) or plan(path)
        for uprobe in uprobes:
            self._bpf.attach_uprobe(
                name=path.encode(),
                sym=uprobe.symbol.encode(),
                sym_off=uprobe.offset,
                fn_name=uprobe.fn_name.encode(),
            )
        return [f"{u.symbol}+{u.offset:#x}" if u.offset else u.symbol for u in uprobes]
