"""Where the Go uprobes go, in Go binaries built here (needs Go, not root)."""

from __future__ import annotations

import logging
import re
import runpy
import shutil
import subprocess
from pathlib import Path

import pytest

from probe.kernel.elf import find_symbols, return_offsets
from probe.kernel.golang import GROUPS, RUNTIME, GoHandler, NotTraceable, go_version, plan

PROGRAMS = Path(__file__).parents[1] / "e2e" / "programs"
build = runpy.run_path(str(PROGRAMS / "go_build.py"))["build"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("go") is None:
        pytest.skip("no Go toolchain (run make setup)")
    return tmp_path_factory.mktemp("go")


@pytest.fixture(scope="module")
def relay(workdir: Path) -> Path:
    return build(PROGRAMS / "go_relay", workdir / "relay")


@pytest.fixture(scope="module")
def stripped(workdir: Path) -> Path:
    return build(PROGRAMS / "go_relay", workdir / "relay-stripped", "-s", "-w")


def test_version_is_the_toolchain_s(relay: Path) -> None:
    toolchain = subprocess.run(["go", "version"], capture_output=True, text=True, check=True)
    version = go_version(relay)
    assert version is not None and re.match(r"go\d+\.\d+", version)
    assert toolchain.stdout.split()[2] == version


def test_plan_covers_every_function_with_entry_and_returns(relay: Path) -> None:
    uprobes = plan(relay)
    functions = [*RUNTIME, *(f for group in GROUPS for f in group)]
    symbols = find_symbols(relay, [f.symbol for f in functions])
    expected = []
    for function in functions:
        expected.append((function.symbol, 0, function.entry))
        if function.returns:
            offsets = return_offsets(relay, symbols[function.symbol])
            assert offsets, function.symbol
            expected += [(function.symbol, offset, function.returns) for offset in offsets]
    assert [(u.symbol, u.offset, u.fn_name) for u in uprobes] == expected


def test_stripped_binary_is_declined_with_a_reason(
    stripped: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(NotTraceable, match="no symbol table"):
        plan(stripped)
    handler = GoHandler(bpf=None)  # declines before touching BPF
    with caplog.at_level(logging.WARNING, logger="probe.kernel.golang"):
        assert handler.wants(str(stripped)) is False
    assert [r.getMessage() for r in caplog.records] == [
        f"go: not probing {stripped}: no symbol table (stripped with -ldflags=-s?)"
    ]


def test_go_without_net_http_or_tls_needs_no_uprobes(workdir: Path) -> None:
    hello = build(PROGRAMS / "go_hello", workdir / "hello")
    assert plan(hello) == []
    assert GoHandler(bpf=None).wants(str(hello)) is False


def test_not_go(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\n")
    assert go_version(script) is None
    assert GoHandler(bpf=None).wants(str(script)) is False
