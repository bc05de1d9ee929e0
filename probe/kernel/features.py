"""What this kernel and machine offer, and making ready what bcc needs.

`findings()` feeds `probe check`; `prepare()` runs before every attach and
turns each missing piece into a `ProbeError` that says how to fix it.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from probe.kernel.governor import PRESSURE_FILE

TRACEFS = Path("/sys/kernel/tracing")
DEBUGFS = Path("/sys/kernel/debug")
BTF = Path("/sys/kernel/btf/vmlinux")

# The syscalls that move a connection's bytes: one BPF program serves all
# their exits (bpf/socket_data.bpf.c, data_syscall_exit).
DATA_SYSCALLS = (
    "read",
    "write",
    "readv",
    "writev",
    "recvfrom",
    "sendto",
    "recvmsg",
    "sendmsg",
    "sendfile64",
)
# Tracepoints the programs in bpf/ attach to at start,
ATTACHED_TRACEPOINTS = [
    f"syscalls/sys_{edge}_{call}"
    for call in ("connect", "accept", "accept4", "close", *DATA_SYSCALLS)
    for edge in ("enter", "exit")
] + ["sock/inet_sock_set_state", "sched/sched_process_exit", "sched/sched_process_exec"]
# and once they are needed (bpf/socket_data.bpf.c, tcp_rcv_space_adjust).
ON_DEMAND_TRACEPOINTS = ["tcp/tcp_rcv_space_adjust"]
REQUIRED_TRACEPOINTS = ATTACHED_TRACEPOINTS + ON_DEMAND_TRACEPOINTS

# Capabilities by number (linux/capability.h) and what the probe needs each for.
CAPABILITIES = {
    39: ("CAP_BPF", "load BPF programs and create maps"),
    38: ("CAP_PERFMON", "attach to tracepoints and uprobes"),
    21: ("CAP_SYS_ADMIN", "mount tracefs; stands in for CAP_BPF/CAP_PERFMON before 5.8"),
    19: ("CAP_SYS_PTRACE", "read other processes' /proc/PID/environ and exe"),
    2: ("CAP_DAC_READ_SEARCH", "read /proc/PID/fd of other users' processes"),
    24: ("CAP_SYS_RESOURCE", "raise the locked-memory limit for maps on old kernels"),
}


class ProbeError(Exception):
    """A reason the probe cannot run, phrased for the person running it."""


@dataclass(frozen=True, slots=True)
class Finding:
    name: str
    ok: bool
    detail: str
    required: bool = True


def kernel_headers_dir() -> Path:
    """Where bcc looks for kernel headers: $BCC_KERNEL_SOURCE, else /lib/modules."""
    return Path(os.environ.get("BCC_KERNEL_SOURCE") or Path("/lib/modules") / platform.release())


def effective_capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def _mounted(path: Path) -> bool:
    return os.path.ismount(path)


def mount_tracing() -> list[str]:
    """Mount tracefs and debugfs where missing (a fresh boot has neither);
    returns what was done, to be said to the user."""
    done = []
    for fstype, path in (("tracefs", TRACEFS), ("debugfs", DEBUGFS)):
        if _mounted(path):
            continue
        result = subprocess.run(
            ["mount", "-t", fstype, "nodev", str(path)], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise ProbeError(
                f"{fstype} is not mounted at {path} and mounting it failed "
                f"({result.stderr.strip() or 'exit ' + str(result.returncode)}). bcc reads "
                f"tracepoint formats from it. Mount it as root: "
                f"`mount -t {fstype} nodev {path}`, or in a container bind-mount it from the host."
            )
        done.append(f"mounted {fstype} at {path}")
    return done


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of this kernel's release ("6.18.44-fc", "6.1-rc3"); (0, 0) if unreadable."""
    found = re.match(r"(\d+)\.(\d+)", platform.release() if release is None else release)
    return (int(found[1]), int(found[2])) if found else (0, 0)


def task_storage_available() -> bool:
    """Can tracepoint programs keep per-thread data in task storage? Linux
    5.12 opened it (and bpf_get_current_task_btf) to them; it needs BTF."""
    return kernel_version() >= (5, 12) and BTF.exists()


def _bcc_version() -> str | None:
    try:
        import bcc  # noqa: PLC0415 - optional until the probe attaches
    except ImportError:
        return None
    return getattr(bcc, "__version__", "unknown")


def _headers_present() -> bool:
    base = kernel_headers_dir()
    if "BCC_KERNEL_SOURCE" in os.environ:  # one tree, as bcc then takes it
        return (base / "include" / "linux" / "kconfig.h").exists()
    return (base / "build" / "Makefile").exists() and (
        base / "source" / "include" / "linux" / "kconfig.h"
    ).exists()


def prepare() -> list[str]:
    """Check everything the probe needs before compiling; raise ProbeError
    naming the fix for the first thing missing. Returns notes for the user."""
    if os.geteuid() != 0 and not effective_capabilities() & (1 << 39):
        raise ProbeError(
            "probe needs root (or CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE and "
            "CAP_DAC_READ_SEARCH) to load BPF programs into the kernel. Run it with sudo, "
            "or install the systemd unit in deploy/ which grants exactly these."
        )
    if _bcc_version() is None:
        raise ProbeError(
            "The bcc Python module is not importable. probe uses Debian's python3-bpfcc "
            "(PyPI's 'bcc' is an unrelated package): run `make setup`, which installs it and "
            "a virtual environment made with --system-site-packages that can see it."
        )
    if not _headers_present():
        raise ProbeError(
            f"No kernel headers at {kernel_headers_dir()}: bcc compiles "
            "the BPF programs against them at run time. Run `make setup`, which installs "
            "linux-headers for this kernel (or the nearest packaged version) and links them."
        )
    return mount_tracing()


def findings() -> list[Finding]:
    """Everything `probe check` reports, required or not."""
    results = [Finding("kernel", True, f"{platform.release()} ({platform.machine()})", False)]
    results.append(Finding("btf", BTF.exists(), str(BTF), False))
    results.append(
        Finding(
            "tracefs",
            _mounted(TRACEFS),
            f"{TRACEFS} {'mounted' if _mounted(TRACEFS) else 'not mounted (probe mounts it)'}",
            False,
        )
    )
    events = TRACEFS / "events"
    if _mounted(TRACEFS) and not os.access(events, os.X_OK):
        results.append(Finding("tracepoints", False, f"{events} is not readable (needs root)"))
    elif _mounted(TRACEFS):
        missing = [tp for tp in REQUIRED_TRACEPOINTS if not (events / tp).is_dir()]
        detail = "all present" if not missing else "missing: " + ", ".join(missing)
        results.append(
            Finding("tracepoints", not missing, f"{len(REQUIRED_TRACEPOINTS)} needed, {detail}")
        )
        uprobes = (TRACEFS / "uprobe_events").exists()
        kprobes = (TRACEFS / "kprobe_events").exists()
        results.append(Finding("uprobes", uprobes, "for TLS libraries and Go", False))
        results.append(Finding("kprobes", kprobes, "not used: probe needs tracepoints only", False))
    results.append(
        Finding("ringbuf", kernel_version() >= (5, 8), "BPF ring buffer needs Linux 5.8+")
    )
    results.append(
        Finding(
            "task-storage",
            task_storage_available(),
            "per-thread syscall state (Linux 5.12+ with BTF); else an LRU hash",
            False,
        )
    )
    results.append(
        Finding(
            "cpu-pressure",
            PRESSURE_FILE.exists(),
            f"{PRESSURE_FILE}: while the CPU is short, fewer exchanges are traced",
            False,
        )
    )
    results.append(Finding("headers", _headers_present(), str(kernel_headers_dir())))
    bcc = _bcc_version()
    results.append(Finding("bcc", bcc is not None, bcc or "not importable (run make setup)"))
    caps = effective_capabilities()
    held = [name for bit, (name, _) in CAPABILITIES.items() if caps & (1 << bit)]
    can_load = os.geteuid() == 0 or bool(caps & (1 << 39))
    results.append(Finding("capabilities", can_load, ", ".join(held) or "none"))
    return results
