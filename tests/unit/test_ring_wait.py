"""RingWait: the wait for records, with a pipe standing in for the ring buffer's
map (any descriptor epoll can watch). Its wait on the real ring buffer, and a
signal ending it, are in tests/kernel/test_bpf_events.py."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from probe.kernel.loader import RingWait


@pytest.fixture
def ring() -> Iterator[tuple[int, int]]:
    """(read end, write end) of a pipe: readable, as the ring is, once written."""
    read_end, write_end = os.pipe()
    yield read_end, write_end
    os.close(read_end)
    os.close(write_end)


def test_returns_once_records_wait_and_at_once_while_they_do(ring) -> None:
    read_end, write_end = ring
    waiting = RingWait(read_end)
    try:
        threading.Timer(0.1, os.write, (write_end, b"x")).start()
        started = time.monotonic()
        waiting.wait(10)
        assert time.monotonic() - started < 5
        started = time.monotonic()
        waiting.wait(10)  # not read: still ready, as records left for the next poll
        assert time.monotonic() - started < 1
    finally:
        waiting.close()


def test_times_out_with_nothing_to_read(ring) -> None:
    waiting = RingWait(ring[0])
    try:
        started = time.monotonic()
        waiting.wait(0.2)
        assert time.monotonic() - started >= 0.15
    finally:
        waiting.close()


def test_another_wakeup_fd_is_left_alone(ring) -> None:
    theirs, other_end = socket.socketpair()
    theirs.setblocking(False)
    assert signal.set_wakeup_fd(theirs.fileno()) == -1
    try:
        waiting = RingWait(ring[0])
        assert signal.set_wakeup_fd(theirs.fileno()) == theirs.fileno()  # still theirs
        waiting.close()
        assert signal.set_wakeup_fd(-1) == theirs.fileno()
    finally:
        signal.set_wakeup_fd(-1)
        theirs.close()
        other_end.close()


def test_its_own_wakeup_fd_is_given_back_on_close(ring) -> None:
    waiting = RingWait(ring[0])
    ours = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(ours)  # looked at, left as it was
    assert ours != -1
    waiting.close()
    assert signal.set_wakeup_fd(-1) == -1
