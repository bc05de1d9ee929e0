"""What the benchmark reads about a running process: CPU time from its CPU
clock, memory from /proc, the run-time statistics of its BPF programs, and the probe's
own Prometheus metrics.

BPF run-time statistics cost a little on every program run, so the kernel
keeps them only while ``kernel.bpf_stats_enabled`` is 1: `bpf_stats` turns
it on for one measurement and restores the previous value, whatever happens.
Programs are found through the process's own file descriptors
(``/proc/PID/fd`` links to ``anon_inode:bpf-prog``; their fdinfo holds
``run_time_ns`` and ``run_cnt``), so only that process's programs count;
the same fdinfo says how many instructions the verifier walked to load each.
"""

from __future__ import annotations

import contextlib
import os
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench import parse

BPF_STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
# Linux's id of a process's CPU-time clock, as clock_getcpuclockid() makes
# it: ~pid << 3, and 2 for CPUCLOCK_SCHED (nanoseconds of run time).
_CPUCLOCK_SCHED = 2


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid`` so far, ended threads included, to
    the nanosecond. /proc/PID/stat counts in 10 ms ticks: 5 us per request
    at 1,000 requests/s over 2 s, too coarse for a 10 us target."""
    return time.clock_gettime((~pid << 3) | _CPUCLOCK_SCHED)


@dataclass(frozen=True, slots=True)
class Memory:
    rss_kib: int  # resident now
    peak_kib: int  # the high-water mark since the process started


def memory(pid: int) -> Memory:
    status = Path(f"/proc/{pid}/status").read_text()
    return Memory(parse.status_kib(status, "VmRSS"), parse.status_kib(status, "VmHWM"))


@dataclass(frozen=True, slots=True)
class BpfRunTime:
    run_time_ns: int
    run_count: int

    def __sub__(self, earlier: BpfRunTime) -> BpfRunTime:
        return BpfRunTime(
            self.run_time_ns - earlier.run_time_ns, self.run_count - earlier.run_count
        )


def bpf_programs(pid: int) -> list[dict[str, str]]:
    """The fdinfo of each BPF program ``pid`` holds open, each program once."""
    programs: dict[str, dict[str, str]] = {}
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):  # closed meanwhile
            if os.readlink(fd_dir / fd) != "anon_inode:bpf-prog":
                continue
            info = parse.parse_fdinfo(Path(f"/proc/{pid}/fdinfo/{fd}").read_text())
            programs[info["prog_id"]] = info
    return list(programs.values())


def bpf_run_time(pid: int) -> BpfRunTime:
    """Totals over the BPF programs ``pid`` holds open."""
    programs = bpf_programs(pid)
    return BpfRunTime(
        sum(int(info["run_time_ns"]) for info in programs),
        sum(int(info["run_cnt"]) for info in programs),
    )


def bpf_verified_instructions(pid: int) -> int:
    """Instructions the verifier walked to load ``pid``'s BPF programs: most
    of their load time, and the same from run to run, unlike a clock.
    0 where the kernel does not say (``verified_insns``, Linux 5.16)."""
    return sum(int(info.get("verified_insns", 0)) for info in bpf_programs(pid))


@contextlib.contextmanager
def bpf_stats() -> Iterator[None]:
    """Have the kernel time BPF programs inside the block only."""
    before = BPF_STATS_SYSCTL.read_text().strip()
    BPF_STATS_SYSCTL.write_text("1")
    try:
        yield
    finally:
        BPF_STATS_SYSCTL.write_text(before)


def probe_metrics(base_url: str, timeout: float = 5.0) -> dict[str, float]:
    """The probe's /metrics, as ``{sample name: value}``."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=timeout) as response:
        return parse.parse_prometheus(response.read().decode())
