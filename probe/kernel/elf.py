"""What the probe needs to know of an executable or library before placing
uprobes in it: where its symbols are, whether it is a Go binary, and where a
function returns (Go moves goroutine stacks, so return probes on Go code
must sit on each return instruction instead of using uretprobes)."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile


@dataclass(frozen=True, slots=True)
class Section:
    offset: int  # in the file
    size: int


# ELF identification and the header fields that locate the section table
# (e_shoff, e_shentsize, e_shnum, e_shstrndx), by class: 1 is 32-bit, 2 is 64.
_ELF_MAGIC = b"\x7fELF"
_SECTION_TABLE = {1: ("I", 32, 46), 2: ("Q", 40, 58)}
# sh_name, then sh_offset and sh_size, in a section header, by class
_SECTION_HEADER = {1: "I12xII", 2: "I20xQQ"}


def sections(path: str | Path) -> dict[str, Section]:
    """Name -> where it is, for every section of an ELF file; empty for any
    other file. Three reads and no parsing library: it runs on every file
    that every process maps, at start, where pyelftools took milliseconds
    a file to build the same table."""
    try:
        with open(path, "rb") as stream:
            ident = stream.read(64)
            if len(ident) < 64 or not ident.startswith(_ELF_MAGIC) or ident[4] not in (1, 2):
                return {}
            elf_class, order = ident[4], "<" if ident[5] == 1 else ">"
            offset_code, offset_at, counts_at = _SECTION_TABLE[elf_class]
            (table_offset,) = struct.unpack_from(order + offset_code, ident, offset_at)
            entry_size, count, names_index = struct.unpack_from(order + "HHH", ident, counts_at)
            if not table_offset or not count or names_index >= count:
                return {}
            stream.seek(table_offset)
            table = stream.read(entry_size * count)
            if len(table) < entry_size * count:
                return {}
            header = struct.Struct(order + _SECTION_HEADER[elf_class])
            headers = [header.unpack_from(table, i * entry_size) for i in range(count)]
            _, names_offset, names_size = headers[names_index]
            stream.seek(names_offset)
            names = stream.read(names_size)
    except (OSError, struct.error):
        return {}
    found = {}
    for name_offset, offset, size in headers:
        end = names.find(b"\0", name_offset)
        if end > name_offset:
            found[names[name_offset:end].decode("latin-1")] = Section(offset, size)
    return found


def section_contains(path: str | Path, section: Section, needle: bytes) -> bool:
    """Whether the bytes of ``section`` of ``path`` contain ``needle``."""
    try:
        with open(path, "rb") as stream:
            stream.seek(section.offset)
            return needle in stream.read(section.size)
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class Symbol:
    name: str
    address: int  # virtual address
    size: int
    offset: int  # file offset of the first instruction


def _file_offset(elf: ELFFile, address: int) -> int | None:
    for segment in elf.iter_segments(type="PT_LOAD"):
        start = segment["p_vaddr"]
        if start <= address < start + segment["p_filesz"]:
            return address - start + segment["p_offset"]
    return None


def find_symbols(path: str | Path, names: Iterable[str]) -> dict[str, Symbol]:
    """The function symbols among ``names`` defined in ``path`` (.symtab, then
    .dynsym). Missing names, or a file that is not ELF, give no entry."""
    wanted = set(names)
    found: dict[str, Symbol] = {}
    try:
        with open(path, "rb") as stream:
            elf = ELFFile(stream)
            for section_name in (".symtab", ".dynsym"):
                table = elf.get_section_by_name(section_name)
                if table is None:
                    continue
                for entry in table.iter_symbols():
                    name = entry.name
                    if name not in wanted or name in found or entry["st_value"] == 0:
                        continue
                    if entry["st_info"]["type"] not in ("STT_FUNC", "STT_GNU_IFUNC"):
                        continue
                    offset = _file_offset(elf, entry["st_value"])
                    if offset is not None:
                        found[name] = Symbol(name, entry["st_value"], entry["st_size"], offset)
    except (OSError, ELFError):
        return {}
    return found


def is_go_binary(path: str | Path) -> bool:
    """Go's linker always writes a .gopclntab or .go.buildinfo section."""
    found = sections(path)
    return ".go.buildinfo" in found or ".gopclntab" in found


def return_offsets(path: str | Path, symbol: Symbol) -> list[int]:
    """Offsets, from the start of ``symbol``, of its x86-64 return instructions."""
    with open(path, "rb") as stream:
        stream.seek(symbol.offset)
        code = stream.read(symbol.size)
    # Imported here: only Go binaries need it, and it maps a few MB of RSS.
    import capstone  # noqa: PLC0415

    disassembler = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    return [
        instruction.address
        for instruction in disassembler.disasm(code, 0)
        if instruction.mnemonic.split()[-1] in ("ret", "retq")  # also "repz ret", "bnd ret"
    ]
