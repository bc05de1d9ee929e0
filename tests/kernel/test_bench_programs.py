"""What the benchmark reads of a process's BPF programs (bench.observe): read
from /proc of this test's own process while it holds the probe's programs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from bench import observe
from probe.kernel.loader import EventSource, ProbeOptions
from probe.stats import Stats

pytestmark = pytest.mark.usefixtures("tracing_ready")


def test_a_process_without_programs_has_none() -> None:
    child = subprocess.Popen([sys.executable, "-c", "input()"], stdin=subprocess.PIPE)
    try:
        assert observe.bpf_programs(child.pid) == []
        assert observe.bpf_verified_instructions(child.pid) == 0
    finally:
        child.communicate(b"\n", timeout=10)


def test_the_programs_a_process_holds_their_verification_and_run_time() -> None:
    pid = os.getpid()
    with EventSource(ProbeOptions(), Stats()):
        programs = observe.bpf_programs(pid)
        assert len(programs) >= 10  # tracepoints of connect, accept, data, close...
        assert len({info["prog_id"] for info in programs}) == len(programs)
        verified = observe.bpf_verified_instructions(pid)
        # Every program's count, and the shared data exit alone walks thousands.
        assert verified == sum(int(info["verified_insns"]) for info in programs)
        assert verified > 1000
        with observe.bpf_stats():
            before = observe.bpf_run_time(pid)
            left, right = socket.socketpair()
            with left, right:
                left.sendall(b"x")
                right.recv(1)
            spent = observe.bpf_run_time(pid) - before
        assert spent.run_count >= 2  # at least the write's and the read's exits
        assert spent.run_time_ns > 0
