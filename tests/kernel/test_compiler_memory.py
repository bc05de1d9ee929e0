"""Compiling the programs must not leave the compiler resident (probe.kernel.memory)."""

from __future__ import annotations

from pathlib import Path

import pytest

from probe.kernel.loader import EventSource, ProbeOptions
from probe.stats import Stats

pytestmark = pytest.mark.usefixtures("tracing_ready")


def compiler_file_pages_kib() -> int:
    """Resident KiB of libLLVM and libclang that come from their files: all
    but the private copies of relocated data, which cannot be given back."""
    total, in_compiler = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and ":" in fields[3]:  # a mapping's first line
            in_compiler = len(fields) == 6 and ("/libLLVM" in fields[5] or "/libclang" in fields[5])
        elif in_compiler and fields[0] == "Rss:":
            total += int(fields[1])
        elif in_compiler and fields[0] == "Anonymous:":
            total -= int(fields[1])
    return total


def test_compiler_pages_are_given_back_after_start() -> None:
    with EventSource(ProbeOptions(), Stats()):
        # bcc really compiled in this process: its compiler is mapped here
        assert "libLLVM" in Path("/proc/self/maps").read_text()
        # Compiling touched tens of MB of its code; a few pages may be
        # faulted back meanwhile, not more.
        assert compiler_file_pages_kib() < 4 * 1024
