"""Give back the memory that compiling the BPF programs used.

bcc compiles with clang and LLVM in-process: by the time the programs are
loaded, the probe has touched some 80 MB of their code and freed most of the
compiler's heap, yet both still count as its resident memory, on every node,
for the probe's whole life. The programs are compiled once, at start (uprobes
attached later reuse the compiled code), so after that:

- the C library is asked to return freed heap to the kernel (``malloc_trim``);
- the compiler libraries' clean pages are unmapped from the probe
  (``madvise(MADV_DONTNEED)``). They stay in the page cache, where the kernel
  may reclaim them; if the compiler ever runs again, they are faulted back in
  from the file. Only read-only mappings that hold no private copy of a page
  are touched: dropping a private copy (relocated data) would lose it.
  (``MADV_PAGEOUT`` was tried first: on this kernel it left the pages mapped.)

Both are best effort: what cannot be done leaves memory as it was.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from dataclasses import dataclass

MADV_DONTNEED = 4  # <sys/mman.h>
# The libraries bcc compiles with: libLLVM-N.so, libclang-cpp.so.N, libclang.so.
COMPILER_LIBRARY = re.compile(r"/lib(LLVM|clang)[^/]*\.so[^/]*$")
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ")


@dataclass(frozen=True, slots=True)
class Mapping:
    start: int
    length: int
    permissions: str  # as /proc/PID/maps writes them, e.g. "r-xp"
    path: str
    private_copies_kib: int  # "Anonymous:": pages copied on write, not in the file


def mappings(smaps: str) -> list[Mapping]:
    """Every file mapping of a /proc/PID/smaps text."""
    found: list[Mapping] = []
    current: dict | None = None
    for line in smaps.splitlines():
        match = _MAPPING.match(line)
        if match:
            if current is not None:
                found.append(Mapping(**current))
            fields = line.split(maxsplit=5)
            current = {
                "start": int(match[1], 16),
                "length": int(match[2], 16) - int(match[1], 16),
                "permissions": match[3],
                "path": fields[5] if len(fields) == 6 else "",
                "private_copies_kib": 0,
            }
        elif current is not None and line.startswith("Anonymous:"):
            current["private_copies_kib"] = int(line.split()[1])
    if current is not None:
        found.append(Mapping(**current))
    return found


def releasable(mapping: Mapping) -> bool:
    """A compiler library's mapping whose pages all come back from the file."""
    return (
        bool(COMPILER_LIBRARY.search(mapping.path))
        and "w" not in mapping.permissions
        and mapping.private_copies_kib == 0
    )


def release_compiler_memory() -> int:
    """Return freed heap and the compiler's clean pages to the kernel;
    returns how many mappings were released."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if hasattr(libc, "malloc_trim"):  # glibc only
        libc.malloc_trim(ctypes.c_size_t(0))
    with open("/proc/self/smaps", encoding="ascii", errors="replace") as smaps:
        chosen = [m for m in mappings(smaps.read()) if releasable(m)]
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    released = 0
    for mapping in chosen:
        if libc.madvise(mapping.start, mapping.length, MADV_DONTNEED) == 0:
            released += 1
    return released
