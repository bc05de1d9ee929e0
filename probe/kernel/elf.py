"""What the probe needs to know of an executable or library before placing
uprobes in it: where its symbols are, whether it is a Go binary, and where a
function returns (Go moves goroutine stacks, so return probes on Go code
must sit on each return instruction instead of using uretprobes)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import capstone
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile


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
    try:
        with open(path, "rb") as stream:
            elf = ELFFile(stream)
            return any(
                elf.get_section_by_name(name) is not None
                for name in (".go.buildinfo", ".gopclntab")
            )
    except (OSError, ELFError):
        return False


def return_offsets(path: str | Path, symbol: Symbol) -> list[int]:
    """Offsets, from the start of ``symbol``, of its x86-64 return instructions."""
    with open(path, "rb") as stream:
        stream.seek(symbol.offset)
        code = stream.read(symbol.size)
    disassembler = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    return [
        instruction.address
        for instruction in disassembler.disasm(code, 0)
        if instruction.mnemonic.split()[-1] in ("ret", "retq")  # also "repz ret", "bnd ret"
    ]
