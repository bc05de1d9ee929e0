"""Stopping detaches everything the probe attached (EventSource.close)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import bcc
import pytest

from probe.kernel.loader import EventSource, ProbeOptions
from probe.stats import Stats

pytestmark = pytest.mark.usefixtures("tracing_ready")


def bpf_fds() -> int:
    """This process's fds of BPF objects: programs, maps, and their attachments
    (a perf event per tracepoint or uprobe, a link per raw tracepoint)."""
    kinds = ("anon_inode:bpf-prog", "anon_inode:bpf-map", "anon_inode:[perf_event]",
             "anon_inode:bpf_link")  # fmt: skip
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # the fd of the listing itself, gone by now
            count += os.readlink(fd) in kinds
    return count


def test_close_detaches_every_tracepoint_and_uprobe() -> None:
    before, counted_before = bpf_fds(), bcc._get_num_open_probes()
    source = EventSource(ProbeOptions(), Stats())
    source.start()
    bpf = source._bpf
    attached = len(bpf.tracepoint_fds) + len(bpf.uprobe_fds) + len(bpf.raw_tracepoint_fds)
    assert bpf_fds() - before > attached > 0
    source.close()
    assert bpf_fds() == before  # nothing left attached, nothing left loaded
    # bcc refuses new probes past a global count: closing must give its share back
    assert bcc._get_num_open_probes() == counted_before
