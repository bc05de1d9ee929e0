"""The kernel/user contract, read from ``bpf/probe.h`` at import.

cffi parses the header's structs, enums and integer ``#define``s, so Python
never restates a layout: field offsets, sizes and constants all come from
the same text the BPF programs are compiled from. Only the include guard
and comments need stripping first (cffi's ``cdef`` takes declarations only).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
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

# Integer types of the header, as `struct` format characters.
_STRUCT_CODES = {
    "uint8_t": "B",
    "uint16_t": "H",
    "uint32_t": "I",
    "uint64_t": "Q",
    "int32_t": "i",
    "int64_t": "q",
}


def _flat_fields(ctype, base: int = 0, prefix: str = "") -> list[tuple[int, str, str]]:
    """``(offset, dotted name, struct code)`` of every leaf field of ``ctype``."""
    leaves = []
    for name, field in ctype.fields:
        offset, kind = base + field.offset, field.type.kind
        if kind == "struct":
            leaves += _flat_fields(field.type, offset, f"{prefix}{name}.")
        elif kind == "array":
            leaves.append((offset, prefix + name, f"{ffi.sizeof(field.type)}s"))
        else:
            leaves.append((offset, prefix + name, _STRUCT_CODES[field.type.cname]))
    return leaves


def flat_struct(
    type_name: str, end: int | None = None, only: Sequence[str] | None = None
) -> tuple[struct.Struct, tuple[str, ...]]:
    """A `struct.Struct` that unpacks the fields of ``type_name`` lying before
    offset ``end`` (all of them by default) in one call, and their dotted
    names ("header.conn.pid") in unpacking order; padding is skipped. For the
    hot path, where cffi's per-field access costs more than the decoding.

    With ``only``, the other fields are skipped as padding too, and ``only``
    must name fields in the order they lie (ValueError otherwise), so that a
    caller can unpack them positionally in that order."""
    ctype = ffi.typeof(type_name)
    end = ffi.sizeof(ctype) if end is None else end
    codes, names, position = ["<"], [], 0
    for offset, name, code in _flat_fields(ctype):
        if offset >= end:
            break
        if only is not None and name not in only:
            continue
        if offset > position:
            codes.append(f"{offset - position}x")
        codes.append(code)
        names.append(name)
        position = offset + struct.calcsize("<" + code)
    if only is not None and tuple(only) != tuple(names):
        raise ValueError(f"{type_name}: fields {list(only)} are not, in this order, {names}")
    return struct.Struct("".join(codes)), tuple(names)
