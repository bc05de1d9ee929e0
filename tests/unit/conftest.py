"""Shared helpers for unit tests: a fake clock and the events of one connection.

Tests get them through fixtures, never by importing this module: several
test folders have a conftest.py, so the name "conftest" is not unique.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from probe.kernel.events import (
    ConnClose,
    ConnKey,
    ConnOpen,
    DataEvent,
    Direction,
    Endpoint,
    KernelEvent,
    ProcessExit,
    Role,
)
from probe.protocol.model import HttpExchange
from probe.protocol.tracker import ConnectionTracker
from probe.stats import Stats

SYSCALL_NS = 400  # every fake syscall takes this long
STEP_NS = 1_000  # and the clock moves this far between the starts of two


class Clock:
    """A monotonic clock that only moves when a test says so."""

    def __init__(self, now: int = 1_000_000) -> None:
        self.now = now

    def syscall(self) -> tuple[int, int]:
        """Entry and exit times of the next syscall."""
        enter = self.now
        self.now += STEP_NS
        return enter, enter + SYSCALL_NS


class Wire:
    """The kernel events one connection of a traced process causes.

    ``read`` and ``write`` are from the traced process's side: with role
    SERVER it reads requests and writes responses.
    """

    def __init__(
        self,
        clock: Clock | None = None,
        key: ConnKey | None = None,
        role: Role = Role.SERVER,
        capture: int = 4096,
        tid: int = 0,
    ) -> None:
        self.clock = clock or Clock()
        self.key = key or ConnKey(pid=100, fd=7, generation=1)
        self.role = role
        self.capture = capture
        self.tid = tid or self.key.pid

    def open(self, local: Endpoint | None = None, peer: Endpoint | None = None) -> ConnOpen:
        return ConnOpen(self.key, self.tid, self.clock.now, self.role, local, peer)

    def read(
        self, data: bytes, sizes: Iterable[int] = (), tid: int | None = None
    ) -> list[DataEvent]:
        return self.syscalls(Direction.INGRESS, data, sizes, tid)

    def write(
        self, data: bytes, sizes: Iterable[int] = (), tid: int | None = None
    ) -> list[DataEvent]:
        return self.syscalls(Direction.EGRESS, data, sizes, tid)

    def syscalls(
        self, direction: Direction, data: bytes, sizes: Iterable[int] = (), tid: int | None = None
    ) -> list[DataEvent]:
        """``data`` moved by syscalls of ``sizes`` bytes (the rest in one last syscall)."""
        events = []
        for chunk in split(data, sizes):
            enter, exit_ = self.clock.syscall()
            payload = chunk[: self.capture]
            events.append(
                DataEvent(
                    self.key,
                    tid or self.tid,
                    enter,
                    exit_,
                    direction,
                    len(chunk),
                    payload,
                    self.role,
                )
            )
        return events

    def close(self) -> ConnClose:
        return ConnClose(self.key, self.tid, self.clock.now)

    def exit(self) -> ProcessExit:
        return ProcessExit(self.key.pid, self.clock.now)


def split(data: bytes, sizes: Iterable[int]) -> list[bytes]:
    """``data`` cut into pieces of ``sizes``; what is left is one more piece."""
    pieces, pos = [], 0
    for size in sizes:
        pieces.append(data[pos : pos + size])
        pos += size
    if pos < len(data):
        pieces.append(data[pos:])
    return pieces


class Recorder:
    """A tracker with its output: the exchanges it emitted, and its counters."""

    def __init__(self, **kwargs: object) -> None:
        self.exchanges: list[HttpExchange] = []
        self.stats = Stats()
        self.tracker = ConnectionTracker(self.exchanges.append, self.stats, **kwargs)

    def feed(self, *events: KernelEvent | list[DataEvent]) -> Recorder:
        for item in events:
            for event in item if isinstance(item, list) else [item]:
                self.tracker.handle(event)
        return self


@pytest.fixture(scope="session")
def make_wire() -> type[Wire]:
    """Builds a Wire; session-scoped so hypothesis tests may use it too."""
    return Wire


@pytest.fixture(scope="session")
def make_recorder() -> type[Recorder]:
    return Recorder


@pytest.fixture
def wire() -> Wire:
    """A server's connection (it reads requests), on a fresh clock."""
    return Wire()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()
