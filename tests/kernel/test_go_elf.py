"""Where the Go uprobes go, in Go binaries built here (needs Go, not root)."""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path

import pytest

from probe.kernel.elf import find_symbols, return_offsets
from probe.kernel.golang import GROUPS, RUNTIME, GoHandler, NotTraceable, go_version, plan
from tests.helpers import PROGRAMS, go_build


def test_version_is_the_toolchain_s(go_relay: Path) -> None:
    toolchain = subprocess.run(["go", "version"], capture_output=True, text=True, check=True)
    version = go_version(go_relay)
    assert version is not None and re.match(r"go\d+\.\d+", version)
    assert toolchain.stdout.split()[2] == version


def test_plan_covers_every_function_with_entry_and_returns(go_relay: Path) -> None:
    uprobes = plan(go_relay)
    functions = [*RUNTIME, *(f for group in GROUPS for f in group)]
    symbols = find_symbols(go_relay, [f.symbol for f in functions])
    expected = []
    for function in functions:
        expected.append((function.symbol, 0, function.entry))
        if function.returns:
            offsets = return_offsets(go_relay, symbols[function.symbol])
            assert offsets, function.symbol
            expected += [(function.symbol, offset, function.returns) for offset in offsets]
    assert [(u.symbol, u.offset, u.fn_name) for u in uprobes] == expected


def test_stripped_binary_is_declined_with_a_reason(
    go_relay_stripped: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(NotTraceable, match="no symbol table"):
        plan(go_relay_stripped)
    handler = GoHandler(bpf=None)  # declines before touching BPF
    with caplog.at_level(logging.WARNING, logger="probe.kernel.golang"):
        assert handler.wants(str(go_relay_stripped)) is False
    assert [r.getMessage() for r in caplog.records] == [
        f"go: not probing {go_relay_stripped}: no symbol table (stripped with -ldflags=-s?)"
    ]


def test_go_without_net_http_or_tls_needs_no_uprobes(go_workdir: Path) -> None:
    hello = go_build(PROGRAMS / "go_hello", go_workdir / "hello")
    assert plan(hello) == []
    assert GoHandler(bpf=None).wants(str(hello)) is False


def test_not_go(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\n")
    assert go_version(script) is None
    assert GoHandler(bpf=None).wants(str(script)) is False
