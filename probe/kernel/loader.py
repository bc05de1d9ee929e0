"""Compile, attach and read the BPF programs of ``bpf/``.

`EventSource` is the kernel stage's one entry point: `start()` compiles the
programs with bcc and attaches them, `poll()` returns the decoded events of
one ring-buffer batch. Its books on connections are a `ConnectionRegistry`
(compiled with the hot path); it does for them what touches the kernel's maps
(marks connections to ignore, deletes those of exited processes) and the
binaries to probe (`KernelSide`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import select
import signal
import socket
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from probe.kernel import features, golang, memory, tls
from probe.kernel.contract import BPF_DIR, MAX_CAPTURE, lib
from probe.kernel.decode import RecordReader
from probe.kernel.discovery import BinaryDiscovery
from probe.kernel.events import (
    ConnKey,
    ConnOpen,
    DataEvent,
    KernelEvent,
    ProcessExec,
)
from probe.kernel.registry import ConnectionRegistry
from probe.stats import Stats

log = logging.getLogger(__name__)

# bcc rewrites map calls (`events.ringbuf_output(...)`) and generates
# tracepoint argument structs only in the main source text, not in included
# files; so the programs and the map-using helpers are joined into one text.
# probe.h, which has no maps, stays an ordinary include.
SOURCES = ("common.h", "socket_conn.bpf.c", "socket_data.bpf.c", "go.bpf.c", "tls.bpf.c")

# enum probe_counter slots -> the Stats names they are reported under.
KERNEL_COUNTERS = {
    lib.PROBE_COUNTER_LOST: "events_lost",
    lib.PROBE_COUNTER_TRUNCATED: "iovec_walks_truncated",
    lib.PROBE_COUNTER_TLS_CIPHERTEXT: "tls_ciphertext_dropped",
    lib.PROBE_COUNTER_TLS_NO_SOCKET: "tls_plaintext_without_socket",
    lib.PROBE_COUNTER_NOT_HTTP: "not_http_withheld",
    lib.PROBE_COUNTER_SHED: "exchanges_shed",
    lib.PROBE_COUNTER_BARE_ACCEPTS: "accepts_without_address",
}

# libbcc's ring-buffer callback: (context, record address, record size) -> 0.
# Called through libbcc directly rather than bcc's Python wrapper, which adds a
# frame and an exception guard to every record. The record comes as a char
# pointer, whose slice copies it into bytes in C: ctypes.string_at is a Python
# function around a foreign call, 180 ns more a record.
_RECORD_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_char), ctypes.c_int
)
# libbcc's bpf_consume_ringbuf, called with the interpreter lock held. Called
# through bcc's CDLL, it lets the lock go, and each record's callback takes it
# back and lets it go again; the export thread, when it waits for the lock,
# takes its turn between two records. Waiting for records is what must not
# hold the lock: poll() does that apart, in `RingWait`.
_CONSUME_HOLDING_LOCK = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_void_p)


class RingWait:
    """Waits, without the interpreter lock, until the ring buffer holds records
    or a signal comes.

    It waits on what libbpf's own poll does, the ring buffer's map in epoll,
    readable while records wait (level-triggered: a read cut short at
    MAX_BATCH is ready again at once). Python resumes a wait that a signal
    interrupted (PEP 475), so that a SIGTERM or SIGINT to stop would wait out
    the poll's timeout: the wait also watches Python's signal wakeup fd, made
    here when it can be (in the main thread, none set already).
    """

    def __init__(self, ring_fd: int) -> None:
        self._epoll = select.epoll()
        self._epoll.register(ring_fd, select.EPOLLIN)
        self._signals: socket.socket | None = None  # what the wakeup fd writes to
        self._wakeup: socket.socket | None = None
        if threading.current_thread() is not threading.main_thread():
            return
        signals, wakeup = socket.socketpair()
        signals.setblocking(False)
        wakeup.setblocking(False)
        previous = signal.set_wakeup_fd(wakeup.fileno(), warn_on_full_buffer=False)
        if previous != -1:  # someone else's (an event loop): left as it was
            signal.set_wakeup_fd(previous)
            signals.close()
            wakeup.close()
            return
        self._signals, self._wakeup = signals, wakeup
        self._epoll.register(signals.fileno(), select.EPOLLIN)

    def wait(self, timeout_s: float) -> None:
        """Return once records wait, a signal came, or ``timeout_s`` passed."""
        if self._epoll.poll(timeout_s) and self._signals is not None:
            with contextlib.suppress(BlockingIOError):
                self._signals.recv(4096)  # the signals' numbers: their handlers ran

    def close(self) -> None:
        self._epoll.close()
        if self._wakeup is None or self._signals is None:
            return
        try:
            previous = signal.set_wakeup_fd(-1)
        except ValueError:  # not in the main thread: both stay open, Python's to write to
            return
        if previous != self._wakeup.fileno():  # someone else's since: theirs again
            signal.set_wakeup_fd(previous)
        self._wakeup.close()
        self._signals.close()
        self._wakeup = self._signals = None


# ld.so maps a new image's libraries just after exec: look again a moment later.
_RESCAN_AFTER_EXEC_S = 0.1
# Records decoded per poll at most: a backlog (the ring buffer holds tens of
# thousands) is handed on in slices, so it is never all in memory as objects.
MAX_BATCH = 1024
TASK_STORAGE_FLAG = "-DPROBE_TASK_STORAGE"
DATA_EXIT = b"data_syscall_exit"  # the program of features.DATA_SYSCALLS' exits
# The program that reads a connection's addresses at a read of its bytes,
# attached once a process accepts without them (see read_addresses_at_reads).
ADDRESSES_AT_READS_TRACEPOINT = b"tcp:tcp_rcv_space_adjust"
ADDRESSES_AT_READS = b"tracepoint__tcp__tcp_rcv_space_adjust"
# Tracepoints and uprobes detached side by side when stopping (see _detach_all).
_DETACH_THREADS = 32
NS_PER_S = 1_000_000_000


@dataclass(slots=True)
class ProbeOptions:
    capture_bytes: int = 4096
    pids: tuple[int, ...] = ()
    ports: tuple[int, ...] = ()
    comm: str | None = None
    # Process names never traced, decided in the kernel as a connection opens.
    excluded_comms: tuple[str, ...] = ()
    # Exchanges sent to user space per second at most, host-wide; those over
    # it are shed whole in the kernel and counted. 0: no limit.
    exchange_rate: int = 0
    ringbuf_pages: int = 1024  # 4 MiB with 4 KiB pages; must be a power of two
    # Syscalls in flight kept in task storage; None: where the kernel has it.
    task_storage: bool | None = None
    extra_cflags: list[str] = field(default_factory=list)

    def cflags(self) -> list[str]:
        if not 0 < self.capture_bytes <= MAX_CAPTURE:
            raise features.ProbeError(
                f"capture size {self.capture_bytes} is out of range: 1 to {MAX_CAPTURE} bytes."
            )
        flags = [
            "-w",  # the headers are a neighbouring kernel's: their warnings are noise
            f"-I{BPF_DIR}",
            f"-DPROBE_SELF_PID={os.getpid()}",
            f"-DPROBE_CAPTURE_BYTES={self.capture_bytes}",
            f"-DPROBE_RINGBUF_PAGES={self.ringbuf_pages}",
            f"-DPROBE_NR_CPUS={os.cpu_count() or 1}",
        ]
        if self.exchange_rate < 0:
            raise features.ProbeError(f"exchange rate {self.exchange_rate}: 0 or more, please.")
        if self.exchange_rate:
            flags.append(f"-DPROBE_EXCHANGE_RATE={self.exchange_rate}")
        if self.pids:
            flags.append("-DPROBE_FILTER_PIDS")
        if self.ports:
            flags.append("-DPROBE_FILTER_PORTS")
        if self.comm:
            if not self.comm.isprintable() or '"' in self.comm or "\\" in self.comm:
                raise features.ProbeError(f"--comm {self.comm!r}: not a plain process name.")
            flags.append(f'-DPROBE_FILTER_COMM="{self.comm[:15]}"')
        if self.excluded_comms:
            flags.append("-DPROBE_EXCLUDE_COMMS")
        task_storage = self.task_storage
        if task_storage is None:
            task_storage = features.task_storage_available()
        if task_storage:
            flags.append(TASK_STORAGE_FLAG)
        return flags + self.extra_cflags


def program_source() -> str:
    return "\n".join((BPF_DIR / name).read_text() for name in SOURCES)


class EventSource:
    """Kernel events of the traced connections, in batches."""

    def __init__(
        self,
        options: ProbeOptions,
        stats: Stats,
        on_open: Callable[[ConnOpen], bool] | None = None,
    ) -> None:
        """``on_open`` is told of each connection as it is settled, and may
        refuse it (see ConnectionRegistry)."""
        self.options = options
        self.stats = stats
        self.notes: list[str] = []  # things done on the user's behalf, to print
        # Exchanges traced per second at most now (0: no limit); see set_exchange_rate.
        self.exchange_rate = options.exchange_rate
        self._bpf: Any = None  # bcc's BPF object (bcc has no type information)
        self._registry = ConnectionRegistry(self, stats, options.ports, on_open)
        # The per-record callback: batches data records, hands the rest to the registry.
        self._reader = RecordReader(
            MAX_BATCH,
            self._registry.ignored,
            self._registry.awaiting_address,
            self._registry.settle,
        )
        self._callback: Any = None  # kept referenced while libbcc may call it
        self._ring: Any = None  # libbcc's ring-buffer reader
        self._consume: Any = None  # its bpf_consume_ringbuf, holding the interpreter lock
        self._ring_wait: RingWait | None = None
        self._libbcc: Any = None  # bcc's ctypes view of libbcc, once bcc is imported
        # Finds the TLS libraries and Go programs to probe; exists once started.
        self.discovery: BinaryDiscovery | None = None
        self._reading_addresses_at_reads = False

    @property
    def on_open(self) -> Callable[[ConnOpen], bool] | None:
        return self._registry.on_open

    @on_open.setter
    def on_open(self, callback: Callable[[ConnOpen], bool] | None) -> None:
        self._registry.on_open = callback

    # -- life cycle -------------------------------------------------------

    def start(self) -> None:
        """Compile and attach every program; raise ProbeError if impossible."""
        self.notes += features.prepare()
        self.stats["exchange_rate_limit"] = self.exchange_rate
        cflags = self.options.cflags()
        try:
            from bcc import BPF  # noqa: PLC0415 - checked by features.prepare()
            from bcc.libbcc import lib as libbcc  # noqa: PLC0415
        except ImportError as error:  # pragma: no cover - prepare() checked it
            raise features.ProbeError(str(error)) from error
        try:
            self._bpf = _load(BPF, cflags)
        except features.ProbeError:
            if TASK_STORAGE_FLAG not in cflags or self.options.task_storage:
                raise
            # A kernel or bcc that refuses task storage to tracepoints: the hash
            # works everywhere, a little slower.
            self.notes.append("task storage refused: syscalls in flight are kept in a hash")
            self._bpf = _load(BPF, [flag for flag in cflags if flag != TASK_STORAGE_FLAG])
        # bcc attached it with the others: it waits for read_addresses_at_reads.
        # Its perf event is closed on another thread: a close waits for RCU
        # grace periods (about 100 ms of the start here). Until then it runs,
        # and can only fill in addresses, as it would once attached.
        closing = self._bpf.tracepoint_fds.pop(ADDRESSES_AT_READS_TRACEPOINT)
        threading.Thread(
            target=libbcc.bpf_close_perf_event_fd, args=(closing,), name="detach", daemon=True
        ).start()
        if self.options.pids:
            table = self._bpf[b"traced_pids"]
            for pid in self.options.pids:
                table[ctypes.c_uint32(pid)] = ctypes.c_uint8(1)
        if self.options.ports:
            table = self._bpf[b"traced_ports"]
            for port in self.options.ports:
                table[ctypes.c_uint16(port)] = ctypes.c_uint8(1)
        if self.options.excluded_comms:
            table = self._bpf[b"excluded_comms"]
            for name in self.options.excluded_comms:
                # The kernel keeps 15 bytes of a name and a NUL.
                table[table.Key(name.encode()[:15])] = ctypes.c_uint8(1)
        self._callback = _RECORD_CALLBACK(self._reader)
        self._libbcc = libbcc
        self._ring = libbcc.bpf_new_ringbuf(
            self._bpf[b"events"].map_fd,
            ctypes.cast(self._callback, libbcc.bpf_new_ringbuf.argtypes[1]),  # same C signature
            None,
        )
        if not self._ring:
            raise features.ProbeError("Could not read the kernel's ring buffer (bpf_new_ringbuf).")
        self._consume = _CONSUME_HOLDING_LOCK(("bpf_consume_ringbuf", libbcc))
        self._ring_wait = RingWait(self._bpf[b"events"].map_fd)
        self.discovery = BinaryDiscovery(self._bpf, self.stats, log)
        self.discovery.add_handler(tls.OpenSslHandler(self._bpf))
        self.discovery.add_handler(golang.GoHandler(self._bpf))
        tls.attach_thread_exit(self._bpf)
        self.discovery.scan_files(tls.system_libraries())
        self.discovery.scan_all()
        log.debug("released %d mappings of the compiler", memory.release_compiler_memory())

    def close(self) -> None:
        if self._ring_wait is not None:
            self._ring_wait.close()
            self._ring_wait = None
        if self._ring is not None:
            self._libbcc.bpf_free_ringbuf(self._ring)
            self._ring = None
            self._consume = None
        if self._bpf is not None:
            _detach_all(self._bpf, self._libbcc)
            self._bpf.cleanup()
            self._bpf = None
            self.discovery = None

    def __enter__(self) -> EventSource:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ----------------------------------------------------------

    def poll(self, timeout_ms: int = 100) -> list[KernelEvent]:
        """Wait up to ``timeout_ms`` for records; return one batch of events.

        A CPU wakes the reader only once it has written a share of the ring
        buffer, or an urgent record (bpf/common.h, emit_record()), so a
        timeout also reads what is waiting: unless records arrive fast enough
        to fill that share first, they are read every ``timeout_ms``, and
        none waits longer. A rescan of a new image that falls due sooner
        (discovery) shortens the wait."""
        assert self._bpf is not None and self.discovery is not None, "start() first"
        due = self.discovery.next_due_s()
        if due is not None:
            timeout_ms = min(timeout_ms, math.ceil(due * 1000))
        assert self._ring_wait is not None
        self._ring_wait.wait(timeout_ms / 1000)  # the lock let go while waiting
        self._consume(self._ring)  # also what a timeout leaves waiting
        reader = self._reader
        self.stats["events"] += reader.records  # counted here, not per record
        if reader.malformed:
            self.stats["events_malformed"] += reader.malformed
        reader.records = reader.malformed = 0
        self.discovery.tick()
        batch, reader.batch = reader.batch, []
        return batch

    def set_exchange_rate(self, rate: int) -> None:
        """Trace at most ``rate`` exchanges a second from now on, host-wide
        (probe/kernel/governor.py moves it under CPU pressure). Only a limit
        compiled in (`ProbeOptions.exchange_rate`) can be moved."""
        assert self._bpf is not None, "start() first"
        if not self.options.exchange_rate:
            raise ValueError("no exchange rate limit was compiled in: nothing to move")
        if rate <= 0:
            raise ValueError(f"exchange rate {rate}: 1 or more, please")
        table = self._bpf[b"exchange_cost"]
        table[ctypes.c_int(0)] = ctypes.c_int64(NS_PER_S // rate)
        self.exchange_rate = self.stats["exchange_rate_limit"] = rate

    def kernel_counter(self, counter: int) -> int:
        """Sum over CPUs of one `enum probe_counter` slot."""
        if self._bpf is None:
            return 0
        values = self._bpf[b"counters"][ctypes.c_int(counter)]
        return int(sum(values))

    def lost_events(self) -> int:
        return self.kernel_counter(lib.PROBE_COUNTER_LOST)

    def kernel_counters(self) -> dict[str, int]:
        """Every `enum probe_counter`, by the name it is reported under. Each
        is a map read per CPU: read them now and then, not per poll. Accepts
        without an address buffer among them attach the program that reads
        addresses at reads."""
        counters = {name: self.kernel_counter(slot) for slot, name in KERNEL_COUNTERS.items()}
        if counters["accepts_without_address"]:
            self.read_addresses_at_reads()
        return counters

    # -- KernelSide: what the registry asks of the kernel and of discovery --

    def scan_process(self, pid: int) -> None:
        if self.discovery is not None:  # exists once started, before any record
            self.discovery.scan_process(pid)

    def scan_executable(self, event: ProcessExec) -> None:
        if self.discovery is None:
            return
        examined = self.discovery.scan_executable(event.pid)
        if event.image_known:
            self.stats["execs_of_known_images"] += 1
        elif examined and event.image_key and self._bpf is not None:
            # Its next exec need not wake this thread: see sched_process_exec.
            table = self._bpf[b"known_images"]
            table[table.Key.from_buffer_copy(event.image_key)] = table.Leaf(1)

    def read_addresses_at_reads(self) -> None:
        """Attach the program that reads a connection's addresses at a read of
        its bytes (bpf/socket_data.bpf.c, tcp_rcv_space_adjust), once: when a
        process accepts without an address buffer (libuv's way), seen in its
        connection's OPEN or, once a second, in the kernel's count of such
        accepts (`kernel_counters`: Node's cluster primary hands each connection
        to a worker, which the probe only picks up from its bytes). It runs
        for every TCP read on the host, so only where a server needs it."""
        if self._reading_addresses_at_reads or self._bpf is None:
            return
        self._reading_addresses_at_reads = True
        tracepoint = ADDRESSES_AT_READS_TRACEPOINT.decode()
        try:
            self._bpf.attach_tracepoint(
                tp=ADDRESSES_AT_READS_TRACEPOINT, fn_name=ADDRESSES_AT_READS
            )
        except Exception as error:  # noqa: BLE001 - bcc raises plain Exception
            log.warning(
                "could not attach to %s (%s): the addresses of connections accepted "
                "without them are read from /proc",
                tracepoint,
                error,
            )
            return
        self._bpf[b"reading_ends"][ctypes.c_int(0)] = ctypes.c_uint8(1)
        log.info(
            "a process accepts connections without their addresses (libuv does): "
            "the kernel reads them at their reads from now on (%s)",
            tracepoint,
        )

    def rescan_soon(self, pid: int) -> None:
        if self.discovery is not None:
            self.discovery.schedule(pid, _RESCAN_AFTER_EXEC_S)

    def forget_process(self, pid: int) -> None:
        if self.discovery is not None:
            self.discovery.forget(pid)

    def ignore_in_kernel(self, key: ConnKey) -> None:
        if self._bpf is None:
            return
        conns = self._bpf[b"conns"]
        conn_key = conns.Key(key.pid, key.fd)
        try:
            state = conns[conn_key]
        except KeyError:
            return
        if state.generation == key.generation:
            state.ignored = 1
            conns[conn_key] = state

    def delete_in_kernel(self, keys: Iterable[ConnKey]) -> None:
        """Only the entries still of these connections: a descriptor's number
        may already be a new connection's."""
        if self._bpf is None:
            return
        conns = self._bpf[b"conns"]
        for key in keys:
            conn_key = conns.Key(key.pid, key.fd)
            with contextlib.suppress(KeyError):
                if conns[conn_key].generation == key.generation:
                    del conns[conn_key]


def _load(bpf_class: Any, cflags: list[str]) -> Any:
    """bcc's BPF object, compiled, loaded and attached; ProbeError if the
    kernel refuses. bcc attaches each `TRACEPOINT_PROBE` as it loads them; the
    one program of every data syscall's exit is attached here."""
    try:
        bpf = bpf_class(text=program_source().encode(), cflags=cflags)
        for call in features.DATA_SYSCALLS:
            bpf.attach_tracepoint(tp=f"syscalls:sys_exit_{call}".encode(), fn_name=DATA_EXIT)
        return bpf
    except Exception as error:
        raise features.ProbeError(
            f"The kernel did not accept probe's BPF programs ({error}). The compiler "
            "or verifier output is above. Check `probe check`: the kernel headers must "
            "match closely enough, and the kernel must allow BPF tracepoint programs "
            "(Linux 5.8 or later)."
        ) from error


def _detach_all(bpf: Any, libbcc: Any) -> None:
    """Close every tracepoint and uprobe at once, before bcc's cleanup.

    Each close makes the kernel wait for RCU grace periods: 70-110 ms apiece
    on this machine, so closing them one after another (bcc's cleanup) made
    stopping take 5 s. Closes that wait side by side share the waits. What is
    closed is taken off bcc's books as its own detach would (the uprobes'
    share of its global count of open probes included).
    """
    if libbcc is None:
        return
    perf_events = [*bpf.uprobe_fds.values(), *bpf.tracepoint_fds.values()]
    with ThreadPoolExecutor(max_workers=_DETACH_THREADS) as pool:
        closing = [pool.submit(libbcc.bpf_close_perf_event_fd, fd) for fd in perf_events]
        closing += [pool.submit(os.close, fd) for fd in bpf.raw_tracepoint_fds.values()]
        for done in closing:
            done.result()
    for name in list(bpf.uprobe_fds):
        libbcc.bpf_detach_uprobe(name)  # an event made through tracefs, if any
        bpf._del_uprobe_fd(name)
    bpf.tracepoint_fds.clear()  # bcc's detach does nothing more for these two
    bpf.raw_tracepoint_fds.clear()


__all__ = ["EventSource", "ProbeOptions", "DataEvent"]
