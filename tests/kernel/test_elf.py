"""ELF symbol lookup and return-instruction search, on this machine's binaries."""

from __future__ import annotations

import glob

import pytest

from probe.kernel.elf import find_symbols, is_go_binary, return_offsets


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
