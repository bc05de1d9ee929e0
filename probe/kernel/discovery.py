"""Finding the executables and libraries to place uprobes in, once each.

`BinaryDiscovery` looks at what processes run and map (``/proc/PID/exe``
and the executable mappings of ``/proc/PID/maps``) and offers each file to
the registered `BinaryHandler`s (OpenSSL, Go, ...). A file is examined and
attached at most once per handler, keyed by device and inode, so a library
seen through many processes, paths or containers (``/proc/PID/root/...``)
is probed once. Uprobes belong to files, not processes: they stay attached,
harmlessly, after the processes that led to them exit.

`EventSource` drives it: `scan_all()` at start, `scan_executable()` when a
process execs, `schedule()` + `tick()` for the rescan that catches the
libraries ld.so maps just after, from the poll loop rather than from a
thread per exec, and `scan_process()` on a process's first connection.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from typing import Protocol

from probe.stats import Stats


class BinaryHandler(Protocol):
    """Probes one kind of binary."""

    name: str  # e.g. "openssl", "go"

    def wants(self, path: str) -> bool:
        """Should ``path`` (an executable or a mapped file) be probed?"""
        ...

    def attach(self, path: str) -> list[str]:
        """Attach the uprobes to ``path``; what was attached, one entry per probe."""
        ...


FileId = tuple[int, int]  # (st_dev, st_ino)


def _mapped_files(pid: int) -> list[str]:
    """The files ``pid`` runs code from: its executable, then the executable
    mappings of /proc/PID/maps, as paths inside the process's root."""
    paths = [os.readlink(f"/proc/{pid}/exe")]
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and "x" in fields[1] and fields[5].startswith("/"):
                paths.append(fields[5].rstrip("\n"))
    return [path for path in dict.fromkeys(paths) if not _replaced(path)]


def _replaced(path: str) -> bool:
    """Replaced on disk since it was mapped: the path names another file now."""
    return path.endswith(" (deleted)")


class BinaryDiscovery:
    """Offers every file that processes run to each handler, once."""

    def __init__(self, bpf: object, stats: Stats, log: logging.Logger) -> None:
        self.bpf = bpf  # the bcc BPF object the handlers attach to
        self._stats = stats
        self._log = log
        self._handlers: list[BinaryHandler] = []
        self._examined: set[tuple[str, FileId]] = set()  # (handler name, file)
        self._found: dict[str, list[str]] = {}
        self._due: dict[int, float] = {}  # pid -> monotonic time of its rescan
        self._own_root = self._root_id("/")

    def add_handler(self, handler: BinaryHandler) -> None:
        self._handlers.append(handler)

    def found(self) -> dict[str, list[str]]:
        """Handler name -> the files it attached to, in order."""
        return {name: list(paths) for name, paths in self._found.items()}

    def scan_all(self) -> None:
        """Every running process (the probe's own included: its files are
        everyone's files, and the kernel programs skip its pid anyway)."""
        for pid in self._pids():
            self.scan_process(pid)

    def scan_process(self, pid: int) -> None:
        """Offer ``pid``'s executable and mapped files; a gone process is no error."""
        try:
            paths = _mapped_files(pid)
        except OSError:  # exited, or a kernel thread (no exe)
            return
        root = self._root(pid)
        self.scan_files(root + path for path in paths)

    def scan_executable(self, pid: int) -> bool:
        """Offer ``pid``'s executable alone: all a process maps at its exec but
        ld.so, which maps its libraries a moment later (`schedule` a rescan
        for them). Reading /proc/PID/maps is most of what a short-lived
        command costs the probe (50-200 us a read here), and most commands
        a node runs are gone before their rescan, so they never pay it.
        True if every handler has examined the executable by now; False if
        the process is gone, or its file could not be offered."""
        exe = f"/proc/{pid}/exe"
        try:
            # The file itself, through the link: most execs run a file examined
            # already, and its path costs a readlink and the process's root.
            file_id = self._file_id(os.stat(exe))
            if self._examined_by_all(file_id):
                return True
            path = os.readlink(exe)
        except OSError:
            return False
        if _replaced(path):
            return False
        self.scan_files([self._root(pid) + path])
        return self._examined_by_all(file_id)

    def scan_files(self, paths: Iterable[str]) -> None:
        """Offer files by path, e.g. the libraries on disk before anyone maps them."""
        for path in paths:
            try:
                stat = os.stat(path)
            except OSError:
                continue
            file_id = self._file_id(stat)
            for handler in self._handlers:
                if (handler.name, file_id) not in self._examined:
                    self._examined.add((handler.name, file_id))
                    self._offer(handler, path)

    def schedule(self, pid: int, delay_s: float) -> None:
        """Rescan ``pid`` once, ``delay_s`` from now, at the first `tick()` after."""
        self._due[pid] = time.monotonic() + delay_s

    def next_due_s(self) -> float | None:
        """Seconds until the first rescan is due (0 if overdue); None if none is."""
        if not self._due:
            return None
        return max(0.0, min(self._due.values()) - time.monotonic())

    def forget(self, pid: int) -> None:
        """``pid`` exited: drop its pending rescan."""
        self._due.pop(pid, None)

    def tick(self) -> None:
        """Run the rescans that are due; called from the poll loop."""
        if not self._due:
            return
        now = time.monotonic()
        for pid in [pid for pid, due in self._due.items() if due <= now]:
            del self._due[pid]
            self.scan_process(pid)

    def _offer(self, handler: BinaryHandler, path: str) -> None:
        # A handler's failure must never stop the probe: one line, counted.
        try:
            if not handler.wants(path):
                return
            probes = handler.attach(path)
        except Exception as error:  # noqa: BLE001 - bcc raises plain Exception
            self._stats["uprobe_attach_errors"] += 1
            self._log.warning("%s: could not probe %s: %s", handler.name, path, error)
            return
        self._found.setdefault(handler.name, []).append(path)
        self._stats["uprobes_attached"] += len(probes)
        self._log.info("%s: probing %s (%s)", handler.name, path, ", ".join(probes))

    def _examined_by_all(self, file_id: FileId) -> bool:
        return all((handler.name, file_id) in self._examined for handler in self._handlers)

    @staticmethod
    def _file_id(stat: os.stat_result) -> FileId:
        return (stat.st_dev, stat.st_ino)

    def _root(self, pid: int) -> str:
        """What ``pid``'s paths are prefixed with to name its files from here."""
        return "" if self._root_id(f"/proc/{pid}/root") == self._own_root else f"/proc/{pid}/root"

    @staticmethod
    def _pids() -> list[int]:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]

    @staticmethod
    def _root_id(path: str) -> FileId | None:
        try:
            return BinaryDiscovery._file_id(os.stat(path))
        except OSError:
            return None
