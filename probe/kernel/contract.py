"""The kernel/user contract, read from ``bpf/probe.h`` at import.

cffi parses the header's structs, enums and integer ``#define``s, so Python
never restates a layout: field offsets, sizes and constants all come from
the same text the BPF programs are compiled from. Only the include guard
and comments need stripping first (cffi's ``cdef`` takes declarations only).
"""

from __future__ import annotations

import re
from pathlib import Path

import cffi

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"
HEADER = BPF_DIR / "probe.h"

# The kernel's fixed-width types, as cffi knows them.
_KERNEL_TYPES = """
typedef uint8_t __u8;
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef uint64_t __u64;
typedef int32_t __s32;
typedef int64_t __s64;
"""
_INT_DEFINE = re.compile(r"#define\s+\w+\s+\d+\s*$")


def _declarations(header_text: str) -> str:
    """The header without comments and without preprocessor lines other
    than integer constants."""
    text = re.sub(r"/\*.*?\*/", "", header_text, flags=re.S)
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not _INT_DEFINE.match(stripped):
            continue
        lines.append(line)
    return "\n".join(lines)


ffi = cffi.FFI()
ffi.cdef(_KERNEL_TYPES + _declarations(HEADER.read_text()))
lib = ffi.dlopen(None)  # only for the enum and #define constants

DATA_HEADER_SIZE: int = ffi.offsetof("struct probe_data_event", "payload")
CONN_EVENT_SIZE: int = ffi.sizeof("struct probe_conn_event")
MAX_CAPTURE: int = lib.PROBE_MAX_CAPTURE
