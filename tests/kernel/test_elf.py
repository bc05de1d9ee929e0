"""ELF symbol lookup and return-instruction search, on this machine's binaries."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest

from probe.kernel.elf import (
    find_symbols,
    is_go_binary,
    return_offsets,
    section_contains,
    sections,
)


def _libssl() -> str:
    paths = sorted(glob.glob("/usr/lib/x86_64-linux-gnu/libssl.so.*"))
    if not paths:
        pytest.skip("no libssl on this machine")
    return paths[-1]


def test_dynamic_symbols_of_libssl() -> None:
    found = find_symbols(_libssl(), ["SSL_write", "SSL_read", "no_such_function"])
    assert set(found) == {"SSL_write", "SSL_read"}
    write = found["SSL_write"]
    assert write.size > 0 and write.address > 0 and write.offset > 0


def test_return_offsets_inside_the_function() -> None:
    path = _libssl()
    write = find_symbols(path, ["SSL_write"])["SSL_write"]
    offsets = return_offsets(path, write)
    assert offsets, "SSL_write has at least one ret"
    assert all(0 < offset < write.size for offset in offsets)
    with open(path, "rb") as stream:
        for offset in offsets:
            stream.seek(write.offset + offset)
            code = stream.read(2)  # ret, ret imm16, or a prefixed ret (repz, bnd)
            assert code[0] in (0xC3, 0xC2) or (code[0] in (0xF3, 0xF2) and code[1] == 0xC3)


def test_not_elf_and_not_go(tmp_path) -> None:
    text = tmp_path / "script.sh"
    text.write_text("#!/bin/sh\n")
    assert find_symbols(text, ["main"]) == {}
    assert not is_go_binary(text)
    assert not is_go_binary(_libssl())


def test_section_table_matches_pyelftools() -> None:
    from elftools.elf.elffile import ELFFile  # noqa: PLC0415 - the reference, here only

    for path in (_libssl(), "/bin/sh"):
        with open(path, "rb") as stream:
            expected = {
                section.name: (section["sh_offset"], section["sh_size"])
                for section in ELFFile(stream).iter_sections()
                if section.name
            }
        found = {name: (s.offset, s.size) for name, s in sections(path).items()}
        assert found == expected
    assert section_contains(_libssl(), sections(_libssl())[".dynstr"], b"\0SSL_write\0")
    assert not section_contains(_libssl(), sections(_libssl())[".dynstr"], b"\0no_such\0")


def test_section_table_of_a_cut_file(tmp_path) -> None:
    cut = tmp_path / "cut.so"
    cut.write_bytes(Path(_libssl()).read_bytes()[:4096])  # header, no section table
    assert sections(cut) == {}
    assert sections(tmp_path / "missing") == {}
