"""OpenSSL's plaintext: which files define its read and write functions, and
the uprobes of ``bpf/tls.bpf.c`` on them.

`OpenSslHandler` is the `BinaryHandler` that `BinaryDiscovery` offers every
executable and mapped file to. A file is probed when it defines SSL_read or
SSL_write: every libssl (OpenSSL 1.1 and 3, BoringSSL), and programs that
link OpenSSL statically, such as Node.js, which exports them. NSS's
``libssl3.so`` defines neither and is left alone.
"""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from probe.kernel.discovery import BinaryDiscovery
from probe.kernel.elf import find_symbols, section_contains, sections
from probe.stats import Stats

# function -> (BPF program at its entry, BPF program at its return)
PROGRAMS = {
    "SSL_read": (b"ssl_read_enter", b"ssl_return"),
    "SSL_read_ex": (b"ssl_read_ex_enter", b"ssl_return"),
    "SSL_write": (b"ssl_write_enter", b"ssl_return"),
    "SSL_write_ex": (b"ssl_write_ex_enter", b"ssl_return"),
}
_REQUIRED = ("SSL_read", "SSL_write")  # the _ex variants exist from OpenSSL 1.1.1 on
_LDCONFIG_LIBSSL = re.compile(r"^\s*libssl\.so\S*\s.*=>\s*(\S+)$", re.M)


def ssl_functions(path: str | Path) -> set[str]:
    """Which of the functions of `PROGRAMS` ``path`` defines; empty unless it
    defines both SSL_read and SSL_write.

    The dynamic symbol hash table answers for libraries and for programs
    that export the functions (Node.js's 100 MB binary in milliseconds); a
    full symbol table is searched only when its strings name SSL_write.
    """
    if not any(
        section_contains(path, section, b"\0SSL_write\0")
        for name, section in sections(path).items()
        if name in (".dynstr", ".strtab")
    ):
        return set()  # most files: no need to read their symbols at all
    try:
        with open(path, "rb") as stream:
            elf = ELFFile(stream)
            found = _exported(elf)
            if not found and _strings_name(elf, b"SSL_write"):
                found = set(find_symbols(path, PROGRAMS))
    except (OSError, ELFError):
        return set()
    return found if all(name in found for name in _REQUIRED) else set()


def _exported(elf: ELFFile) -> set[str]:
    table = elf.get_section_by_name(".gnu.hash") or elf.get_section_by_name(".hash")
    if table is None:
        return set()
    found = set()
    for name in PROGRAMS:
        symbol = table.get_symbol(name)
        if (
            symbol is not None
            and symbol["st_shndx"] != "SHN_UNDEF"
            and symbol["st_info"]["type"] in ("STT_FUNC", "STT_GNU_IFUNC")
        ):
            found.add(name)
    return found


def _strings_name(elf: ELFFile, name: bytes) -> bool:
    strings = elf.get_section_by_name(".strtab")
    return strings is not None and b"\0" + name + b"\0" in strings.data()


def system_libraries() -> list[str]:
    """The libssl files the dynamic linker knows (``ldconfig -p``): probed
    at start, so a program started later is traced from its first request
    even when no running process had mapped its libssl yet."""
    try:
        listing = subprocess.run(
            ["ldconfig", "-p"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return _LDCONFIG_LIBSSL.findall(listing)


class OpenSslHandler:
    """Uprobes and uretprobes on OpenSSL's read and write functions."""

    name = "openssl"

    def __init__(self, bpf: object) -> None:
        self._bpf = bpf

    def wants(self, path: str) -> bool:
        return bool(ssl_functions(path))

    def attach(self, path: str) -> list[str]:
        probes = []
        for function in sorted(ssl_functions(path)):
            entry, exit_ = PROGRAMS[function]
            self._bpf.attach_uprobe(name=path.encode(), sym=function.encode(), fn_name=entry)
            self._bpf.attach_uretprobe(name=path.encode(), sym=function.encode(), fn_name=exit_)
            probes.append(function)
        return probes


def attach_thread_exit(bpf: object) -> None:
    """Clear a thread's TLS call records when it exits (see tls.bpf.c)."""
    # A raw tracepoint: socket_conn.bpf.c has the plain one, and bcc keeps one
    # fd per plain tracepoint name, so a second would never be detached.
    bpf.attach_raw_tracepoint(tp=b"sched_process_exit", fn_name=b"tls_thread_exit")


class _Listing(OpenSslHandler):
    """Decides like `OpenSslHandler`, attaches nothing."""

    def attach(self, path: str) -> list[str]:
        return sorted(ssl_functions(path))


def openssl_files() -> list[str]:
    """The files the probe would attach OpenSSL uprobes to now: the system's
    libssl and every OpenSSL a running process maps (for `probe check`)."""
    discovery = BinaryDiscovery(None, Stats(), logging.getLogger(__name__))
    discovery.add_handler(_Listing(None))
    discovery.scan_files(system_libraries())
    discovery.scan_all()
    return discovery.found().get(OpenSslHandler.name, [])
