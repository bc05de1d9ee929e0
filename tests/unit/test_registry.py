"""The kernel stage's books on connections (probe.kernel.registry), fed events
as the reader hands them over, with a kernel side that records what it is asked."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from probe.kernel import sockets
from probe.kernel.decode import AddressUpdate
from probe.kernel.events import (
    ConnClose,
    ConnKey,
    ConnOpen,
    DataEvent,
    Direction,
    Endpoint,
    KernelEvent,
    ProcessExec,
    ProcessExit,
    Role,
)
from probe.kernel.registry import ConnectionRegistry
from probe.stats import Stats

SERVER = Endpoint("127.0.0.1", 8080)
CLIENT = Endpoint("127.0.0.1", 40000)


class RecordingKernel:
    def __init__(self) -> None:
        self.asked: list[tuple[str, object]] = []

    def scan_process(self, pid: int) -> None:
        self.asked.append(("scan", pid))

    def scan_executable(self, event: ProcessExec) -> None:
        self.asked.append(("scan exe", event.pid))

    def read_addresses_at_reads(self) -> None:
        self.asked.append(("read addresses at reads", 0))

    def rescan_soon(self, pid: int) -> None:
        self.asked.append(("rescan", pid))

    def forget_process(self, pid: int) -> None:
        self.asked.append(("forget", pid))

    def ignore_in_kernel(self, key: ConnKey) -> None:
        self.asked.append(("ignore", key))

    def delete_in_kernel(self, keys: Iterable[ConnKey]) -> None:
        self.asked.append(("delete", sorted(keys)))


def data(key: ConnKey) -> DataEvent:
    return DataEvent(key, key.pid, 1, 2, Direction.EGRESS, 5, b"GET /")


def settle_all(registry: ConnectionRegistry, *events: KernelEvent) -> list[KernelEvent]:
    batch: list[KernelEvent] = []
    for event in events:
        registry.settle(event, batch)
    return batch


def test_a_client_waits_for_its_address_then_opens_before_its_data() -> None:
    kernel, stats = RecordingKernel(), Stats()
    registry = ConnectionRegistry(kernel, stats)
    key = ConnKey(7, 3, 100)
    opened = ConnOpen(key, 7, 1, Role.CLIENT, None, SERVER)
    assert settle_all(registry, opened) == []  # held
    assert key in registry.awaiting_address
    update = AddressUpdate(key=key, tid=7, timestamp_ns=2, role=Role.CLIENT, local=CLIENT,
                           peer=SERVER)  # fmt: skip
    sent = data(key)
    assert settle_all(registry, update, sent) == [opened, sent]
    assert (opened.local, opened.peer) == (CLIENT, SERVER)
    assert kernel.asked == [("scan", 7)]  # the process's first connection
    assert stats["connections_traced"] == 1
    assert stats["addresses_looked_up"] == 0  # the kernel sent both


def test_data_or_a_close_before_the_address_lets_the_connection_go_without_it() -> None:
    stats = Stats()
    registry = ConnectionRegistry(RecordingKernel(), stats)
    key = ConnKey(7, 3, 100)
    opened = ConnOpen(key, 7, 1, Role.CLIENT, None, SERVER)
    closed = ConnClose(key, 7, 3)
    assert settle_all(registry, opened, closed) == [opened, closed]
    assert not registry.awaiting_address
    assert stats["addresses_looked_up"] == 1  # in /proc, where pid 7 is no such socket


def test_a_connection_accepted_without_addresses_asks_the_kernel_for_the_next_ones() -> None:
    kernel = RecordingKernel()
    registry = ConnectionRegistry(kernel, Stats())
    with_addresses = ConnOpen(ConnKey(7, 3, 100), 7, 1, Role.SERVER, SERVER, CLIENT)
    client = ConnOpen(ConnKey(7, 4, 101), 7, 1, Role.CLIENT, None, SERVER)
    lost_address = ConnClose(client.key, 7, 2)  # before its ADDR: looked up
    picked_up = ConnOpen(ConnKey(7, 5, 102), 7, 1, Role.UNKNOWN, None, None)  # open before
    # accept() gave the peer; the local address's slot was taken by another
    lost_slot = ConnOpen(ConnKey(7, 7, 104), 7, 1, Role.SERVER, None, CLIENT)
    settle_all(registry, with_addresses, client, lost_address, picked_up, lost_slot)
    assert ("read addresses at reads", 0) not in kernel.asked
    settle_all(registry, ConnOpen(ConnKey(7, 6, 103), 7, 1, Role.SERVER, None, None))
    assert ("read addresses at reads", 0) in kernel.asked


@pytest.mark.parametrize("last", ["data", "close"])
def test_a_held_connection_refused_as_it_goes_takes_its_last_record_along(last) -> None:
    registry = ConnectionRegistry(RecordingKernel(), Stats(), on_open=lambda event: False)
    key = ConnKey(7, 3, 100)
    opened = ConnOpen(key, 7, 1, Role.CLIENT, None, SERVER)
    after = data(key) if last == "data" else ConnClose(key, 7, 3)
    assert settle_all(registry, opened, after) == []


def test_a_refused_connection_is_ignored_here_and_in_the_kernel() -> None:
    kernel, stats = RecordingKernel(), Stats()
    registry = ConnectionRegistry(kernel, stats, on_open=lambda event: event.key.fd != 4)
    kept, refused = ConnKey(7, 3, 100), ConnKey(7, 4, 101)
    events = [ConnOpen(key, 7, 1, Role.SERVER, SERVER, CLIENT) for key in (kept, refused)]
    late = [data(refused), ConnClose(refused, 7, 5), ConnClose(kept, 7, 5)]
    batch = settle_all(registry, *events, *late)
    assert batch == [events[0], late[2]]
    assert ("ignore", refused) in kernel.asked
    assert refused in registry.ignored
    assert stats["connections_ignored"] == 1


@pytest.mark.parametrize(("ports", "traced"), [((8080,), True), ((9999,), False)])
def test_only_connections_with_a_wanted_port_are_traced(ports, traced) -> None:
    registry = ConnectionRegistry(RecordingKernel(), Stats(), ports=ports)
    opened = ConnOpen(ConnKey(7, 3, 100), 7, 1, Role.SERVER, SERVER, CLIENT)
    assert settle_all(registry, opened) == ([opened] if traced else [])


def test_a_gone_connection_with_an_end_unknown_is_not_judged_by_the_other_port(
    monkeypatch,
) -> None:
    """An accepted connection whose local address the kernel lost, and which
    closed before /proc was read: its peer's port is not the wanted one, but
    its unknown local end may be. It is kept, as the kernel let it through."""
    monkeypatch.setattr(sockets, "lookup", lambda pid, fd: sockets.SocketInfo(False, gone=True))
    registry = ConnectionRegistry(RecordingKernel(), Stats(), ports=(8080,))
    opened = ConnOpen(ConnKey(7, 3, 100), 7, 1, Role.SERVER, None, CLIENT)
    assert settle_all(registry, opened) == [opened]


def test_an_exit_deletes_its_open_connections_in_the_kernel() -> None:
    kernel = RecordingKernel()
    registry = ConnectionRegistry(kernel, Stats())
    first, second, other = ConnKey(7, 3, 100), ConnKey(7, 4, 101), ConnKey(8, 3, 102)
    held = ConnKey(7, 5, 103)
    events: list[KernelEvent] = [
        ConnOpen(key, key.pid, 1, Role.SERVER, SERVER, CLIENT) for key in (first, second, other)
    ]
    events += [ConnClose(second, 7, 2), ConnOpen(held, 7, 1, Role.CLIENT, None, SERVER)]
    exited = ProcessExit(7, 9)
    batch = settle_all(registry, *events, exited)
    assert batch[-1] is exited
    assert kernel.asked[-2:] == [("forget", 7), ("delete", [first])]
    assert held not in registry.awaiting_address


def test_an_exec_ends_the_connections_it_closed_and_numbers_the_image(monkeypatch) -> None:
    kernel = RecordingKernel()
    registry = ConnectionRegistry(kernel, Stats())
    kept, closed = ConnKey(7, 3, 100), ConnKey(7, 4, 101)
    monkeypatch.setattr(sockets, "is_socket", lambda pid, fd: fd == kept.fd)
    opens = [ConnOpen(key, 7, 1, Role.SERVER, SERVER, CLIENT) for key in (kept, closed)]
    execed = ProcessExec(7, 9)
    after = ConnOpen(ConnKey(7, 6, 200), 7, 10, Role.SERVER, SERVER, CLIENT)
    batch = settle_all(registry, *opens, execed, data(closed), after)
    assert batch[2:] == [ConnClose(closed, 7, 9), execed, after]
    assert (execed.image, after.image, opens[0].image) == (1, 1, 0)
    assert ("delete", [closed]) in kernel.asked
    # the new image alone at once, its libraries once ld.so has mapped them, and
    # everything it maps by its first connection after the exec
    assert kernel.asked[-3:] == [("scan exe", 7), ("rescan", 7), ("scan", 7)]
