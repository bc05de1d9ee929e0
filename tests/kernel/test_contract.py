"""The kernel/user contract: layout pinned, decoding exact.

If bpf/probe.h changes a size or an offset, these fail: the change must be
deliberate, because the BPF side and the Python side read the same bytes.
"""

from __future__ import annotations

import socket

import pytest

from probe.kernel import decode as decode_module
from probe.kernel.contract import DATA_HEADER_SIZE, MAX_CAPTURE, ffi, flat_struct, lib
from probe.kernel.decode import AddressUpdate, RecordReader, decode
from probe.kernel.events import (
    ConnClose,
    ConnKey,
    ConnOpen,
    DataEvent,
    Direction,
    Endpoint,
    ProcessExec,
    ProcessExit,
    Role,
)


@pytest.mark.parametrize(
    ("struct", "size"),
    [
        ("struct probe_conn_id", 16),
        ("struct probe_endpoint", 24),
        ("struct probe_event_header", 32),
        ("struct probe_conn_event", 104),
        ("struct probe_conn_key", 8),
        ("struct probe_conn_state", 96),
        ("struct probe_comm", 16),
        ("struct probe_image_key", 128),
        ("struct probe_exec_event", 184),
        ("struct probe_data_event", 72 + 16384),
    ],
)
def test_struct_sizes(struct: str, size: int) -> None:
    assert ffi.sizeof(struct) == size


@pytest.mark.parametrize(
    ("struct", "field", "offset"),
    [
        ("struct probe_event_header", "type", 0),
        ("struct probe_event_header", "tid", 4),
        ("struct probe_event_header", "conn", 8),
        ("struct probe_event_header", "timestamp_ns", 24),
        ("struct probe_data_event", "exit_ns", 32),
        ("struct probe_data_event", "bytes", 40),
        ("struct probe_data_event", "goroutine", 48),
        ("struct probe_data_event", "captured", 56),
        ("struct probe_data_event", "direction", 60),
        ("struct probe_data_event", "role", 61),
        ("struct probe_data_event", "syscall", 62),
        ("struct probe_data_event", "flags", 63),
        ("struct probe_data_event", "exchange", 64),
        ("struct probe_data_event", "payload", 72),
        ("struct probe_conn_event", "local", 32),
        ("struct probe_conn_event", "peer", 56),
        ("struct probe_conn_event", "role", 80),
        ("struct probe_conn_event", "comm", 88),
        ("struct probe_exec_event", "image", 32),
        ("struct probe_exec_event", "comm", 160),
        ("struct probe_exec_event", "known", 176),
        ("struct probe_endpoint", "port", 16),
        ("struct probe_endpoint", "family", 18),
        ("struct probe_conn_state", "role", 8),
        ("struct probe_conn_state", "ignored", 9),
        ("struct probe_conn_state", "protocol", 10),
        ("struct probe_conn_state", "plaintext", 11),
        ("struct probe_conn_state", "exchanges", 64),
        ("struct probe_conn_state", "judged", 72),
        ("struct probe_conn_state", "partner", 80),
    ],
)
def test_field_offsets(struct: str, field: str, offset: int) -> None:
    assert ffi.offsetof(struct, field) == offset


def test_constants() -> None:
    assert MAX_CAPTURE == 16384
    assert DATA_HEADER_SIZE == 72
    assert (lib.PROBE_INGRESS, lib.PROBE_EGRESS) == (Direction.INGRESS, Direction.EGRESS)
    assert (lib.PROBE_ROLE_UNKNOWN, lib.PROBE_ROLE_CLIENT, lib.PROBE_ROLE_SERVER) == (
        Role.UNKNOWN,
        Role.CLIENT,
        Role.SERVER,
    )
    assert (lib.PROBE_AF_INET, lib.PROBE_AF_INET6) == (socket.AF_INET, socket.AF_INET6)


def test_flat_struct_unpacks_what_cffi_wrote() -> None:
    record = ffi.new("struct probe_conn_event *")
    record.header.conn.fd = -2
    record.header.conn.generation = 2**63 + 5
    record.peer.port = 443
    record.peer.addr = bytes(range(16))
    record.role = lib.PROBE_ROLE_SERVER
    record.comm = b"nginx"
    layout, names = flat_struct("struct probe_conn_event")
    values = dict(zip(names, layout.unpack(bytes(ffi.buffer(record))), strict=True))
    assert layout.size == ffi.sizeof("struct probe_conn_event")
    assert values["header.conn.fd"] == -2
    assert values["header.conn.generation"] == 2**63 + 5
    assert values["peer.port"] == 443
    assert values["peer.addr"] == bytes(range(16))
    assert values["role"] == lib.PROBE_ROLE_SERVER
    assert values["comm"] == b"nginx" + bytes(11)
    # a prefix: the data record's fixed part, without its payload
    layout, names = flat_struct("struct probe_data_event", DATA_HEADER_SIZE)
    assert layout.size == DATA_HEADER_SIZE
    assert names[-2:] == ("exchange", "_pad")


def _header(record, kind: int, pid: int = 7, fd: int = 3, generation: int = 99) -> None:
    """Fills a record's header, or a bare header (a CLOSE, an EXIT)."""
    header = getattr(record, "header", record)
    header.type = kind
    header.tid = 8
    header.conn.pid = pid
    header.conn.fd = fd
    header.conn.generation = generation
    header.timestamp_ns = 1_000


def _decode(record, size: int | None = None):
    size = ffi.sizeof(record[0]) if size is None else size
    return decode(bytes(ffi.buffer(record, size)))


def test_decode_data_event_takes_only_captured_bytes() -> None:
    record = ffi.new("struct probe_data_event *")
    _header(record, lib.PROBE_EVENT_DATA)
    record.exit_ns = 1_500
    record.bytes = 10_000
    record.captured = 5
    record.direction = lib.PROBE_EGRESS
    record.role = lib.PROBE_ROLE_CLIENT
    record.goroutine = 0xC000123456
    record.flags = lib.PROBE_DATA_TLS
    ffi.memmove(record.payload, b"GET / and more", 14)

    event = _decode(record, DATA_HEADER_SIZE + 5)

    assert event == DataEvent(
        key=ConnKey(7, 3, 99),
        tid=8,
        enter_ns=1_000,
        exit_ns=1_500,
        direction=Direction.EGRESS,
        size=10_000,
        payload=b"GET /",
        role=Role.CLIENT,
        goroutine=0xC000123456,
        tls=True,
    )


def test_decode_reads_a_calls_last_bytes_as_such() -> None:
    record = ffi.new("struct probe_data_event *")
    _header(record, lib.PROBE_EVENT_DATA)
    record.bytes = 9_000
    record.captured = lib.PROBE_TAIL_BYTES
    record.flags = lib.PROBE_DATA_TAIL | lib.PROBE_DATA_TLS
    ffi.memmove(record.payload, b"a\r\n0\r\n\r\n", 8)
    event = _decode(record, DATA_HEADER_SIZE + 8)
    assert (event.payload, event.size) == (b"a\r\n0\r\n\r\n", 9_000)
    assert event.tail and event.tls
    record.flags = 0
    assert not _decode(record, DATA_HEADER_SIZE + 8).tail


def test_decode_never_reads_past_the_record() -> None:
    record = ffi.new("struct probe_data_event *")
    _header(record, lib.PROBE_EVENT_DATA)
    record.bytes = 100
    record.captured = 100  # claims more than the record holds
    event = _decode(record, DATA_HEADER_SIZE + 4)
    assert len(event.payload) == 4


def test_decode_refuses_an_unknown_direction() -> None:
    record = ffi.new("struct probe_data_event *")
    _header(record, lib.PROBE_EVENT_DATA)
    record.direction = 7
    assert _decode(record, DATA_HEADER_SIZE) is None


def test_decode_reads_a_records_whole_type_word() -> None:
    """The type is read from the record's first four bytes: a word whose low
    byte alone names a known type is no such record, nor is a record cut
    short inside its type."""
    record = ffi.new("struct probe_data_event *")
    _header(record, lib.PROBE_EVENT_DATA)
    record.direction = lib.PROBE_INGRESS
    assert type(_decode(record, DATA_HEADER_SIZE)) is DataEvent
    for high_byte in range(1, 4):
        _header(record, lib.PROBE_EVENT_DATA | 1 << (8 * high_byte))
        assert _decode(record, DATA_HEADER_SIZE) is None
    _header(record, lib.PROBE_EVENT_DATA)
    assert _decode(record, 3) is None


def _endpoint(raw, family: int, address: str, port: int) -> None:
    packed = socket.inet_pton(family, address)
    ffi.memmove(raw.addr, packed, len(packed))
    raw.family = family
    raw.port = port


def test_decode_open_ipv4_and_ipv6() -> None:
    record = ffi.new("struct probe_conn_event *")
    _header(record, lib.PROBE_EVENT_OPEN)
    record.role = lib.PROBE_ROLE_SERVER
    _endpoint(record.local, socket.AF_INET, "127.0.0.1", 8080)
    _endpoint(record.peer, socket.AF_INET6, "::ffff:10.1.2.3", 50000)
    record.comm = b"nginx"

    event = _decode(record)

    assert type(event) is ConnOpen
    assert event.role == Role.SERVER
    assert event.local == Endpoint("127.0.0.1", 8080)
    assert event.peer == Endpoint("10.1.2.3", 50000)  # v4-mapped, unwrapped
    assert event.comm == "nginx"


def test_decode_converts_each_address_and_name_apart(monkeypatch) -> None:
    """Addresses and names are converted once and remembered, boundedly: a
    remembered one never answers for another (IPv4 against IPv6 bytes, a
    name against a longer one)."""
    monkeypatch.setattr(decode_module, "MAX_REMEMBERED", 4)
    seen = [
        ("10.0.0.1", "a00:1::5", "nginx"),  # an IPv6 address starting with 10.0.0.1's bytes
        ("10.0.0.2", "::ffff:10.0.0.1", "nginx-worker"),
        ("127.0.0.1", "fe80::1", "ng"),
    ]
    record = ffi.new("struct probe_conn_event *")
    _header(record, lib.PROBE_EVENT_OPEN)
    for _ in range(3):  # converted, then remembered, and past the bound again
        for local, peer, comm in seen:
            _endpoint(record.local, socket.AF_INET, local, 80)
            _endpoint(record.peer, socket.AF_INET6, peer, 5000)
            record.comm = comm.encode().ljust(16, b"\0")
            event = _decode(record)
            assert isinstance(event, ConnOpen)
            assert event.local == Endpoint(local, 80)
            assert event.peer == Endpoint(peer.removeprefix("::ffff:"), 5000)
            assert event.comm == comm
        assert len(decode_module._ipv4_addresses) <= 4
        assert len(decode_module._ipv6_addresses) <= 4
        assert len(decode_module._comms) <= 4


def test_decode_remembers_keys_boundedly_until_close(monkeypatch) -> None:
    """A connection's key is built once and reused; a key remembered for a
    generation never answers for another connection of the same generation;
    a CLOSE forgets its own; the memory is bounded."""
    monkeypatch.setattr(decode_module, "MAX_REMEMBERED", 4)
    decode_module._keys.clear()  # compiled, the module holds this dict for good
    data = ffi.new("struct probe_data_event *")
    close = ffi.new("struct probe_event_header *")

    def key_of(record, kind: int, pid: int, fd: int, generation: int) -> ConnKey:
        _header(record, kind, pid=pid, fd=fd, generation=generation)
        event = _decode(record, DATA_HEADER_SIZE if kind == lib.PROBE_EVENT_DATA else None)
        assert event is not None and event.key == ConnKey(pid, fd, generation)
        return event.key

    first = key_of(data, lib.PROBE_EVENT_DATA, 7, 3, 99)
    assert key_of(data, lib.PROBE_EVENT_DATA, 7, 3, 99) is first  # built once
    assert key_of(data, lib.PROBE_EVENT_DATA, 8, 3, 99) != first  # same generation, not it
    assert key_of(data, lib.PROBE_EVENT_DATA, 8, 4, 99) != first
    key_of(close, lib.PROBE_EVENT_CLOSE, 8, 4, 99)
    assert 99 not in decode_module._keys  # a CLOSE forgets its connection
    for generation in range(100, 110):
        key_of(data, lib.PROBE_EVENT_DATA, 7, 3, generation)
        assert len(decode_module._keys) <= 4


def test_decode_unknown_family_is_no_address() -> None:
    record = ffi.new("struct probe_conn_event *")
    _header(record, lib.PROBE_EVENT_ADDR)
    _endpoint(record.peer, socket.AF_INET6, "::1", 443)
    event = _decode(record)
    assert isinstance(event, AddressUpdate)
    assert event.local is None
    assert event.peer == Endpoint("::1", 443)


def test_decode_close_exit_and_garbage() -> None:
    """A CLOSE and an EXIT are a header alone; one cut short is malformed."""
    record = ffi.new("struct probe_event_header *")
    _header(record, lib.PROBE_EVENT_CLOSE)
    assert _decode(record) == ConnClose(ConnKey(7, 3, 99), 8, 1_000)
    assert _decode(record, ffi.sizeof(record[0]) - 1) is None
    _header(record, lib.PROBE_EVENT_EXIT, fd=-1)
    assert _decode(record) == ProcessExit(7, 1_000)
    assert _decode(record, ffi.sizeof(record[0]) - 1) is None
    _header(record, 12345)
    assert _decode(record) is None
    assert _decode(record, 10) is None  # shorter than any header


def test_decode_exec_gives_back_the_image_key_it_names() -> None:
    record = ffi.new("struct probe_exec_event *")
    _header(record, lib.PROBE_EVENT_EXEC, fd=-1)
    record.comm = b"node"
    assert _decode(record) == ProcessExec(7, 1_000, "node")  # no path: no key
    record.image.cgroup_id = 4242
    record.image.path = b"/usr/bin/node"
    record.known = 1
    event = _decode(record)
    assert isinstance(event, ProcessExec) and event.image_known
    key = ffi.new("struct probe_image_key *")
    ffi.memmove(key, event.image_key, len(event.image_key))
    assert len(event.image_key) == ffi.sizeof(key[0])
    assert (key.cgroup_id, ffi.string(key.path)) == (4242, b"/usr/bin/node")
    assert _decode(record, ffi.offsetof("struct probe_exec_event", "known")) is None  # cut short


def test_flat_struct_skips_what_it_is_not_asked_for() -> None:
    record = ffi.new("struct probe_data_event *")
    record.header.conn.pid = 42
    record.bytes = -1
    record.flags = lib.PROBE_DATA_TLS
    layout, names = flat_struct(
        "struct probe_data_event", DATA_HEADER_SIZE, only=("header.conn.pid", "bytes", "flags")
    )
    assert names == ("header.conn.pid", "bytes", "flags")
    assert layout.unpack_from(bytes(ffi.buffer(record))) == (42, -1, lib.PROBE_DATA_TLS)
    # Positional unpacking relies on the order: a wrong one is refused.
    with pytest.raises(ValueError, match="not, in this order"):
        flat_struct("struct probe_data_event", DATA_HEADER_SIZE, only=("bytes", "header.tid"))
    with pytest.raises(ValueError, match="not, in this order"):
        flat_struct("struct probe_data_event", DATA_HEADER_SIZE, only=("no_such_field",))


def _data_record(pid: int) -> bytes:
    record = ffi.new("struct probe_data_event *")
    _header(record, lib.PROBE_EVENT_DATA, pid=pid)
    record.bytes = record.captured = 2
    ffi.memmove(record.payload, b"hi", 2)
    return bytes(ffi.buffer(record, DATA_HEADER_SIZE + 2))


def test_the_record_reader_batches_data_and_hands_on_the_rest() -> None:
    ignored = {ConnKey(6, 3, 99): None}
    awaiting: dict = {}
    settled: list = []
    reader = RecordReader(3, ignored, awaiting, lambda event, batch: settled.append(event))
    close = ffi.new("struct probe_event_header *")
    _header(close, lib.PROBE_EVENT_CLOSE)
    records = [_data_record(7), _data_record(6), bytes(ffi.buffer(close)), b"\x01"]
    assert [reader(None, raw, len(raw)) for raw in records] == [0, 0, 0, 0]
    assert [event.key.pid for event in reader.batch] == [7]  # pid 6 is ignored
    assert [type(event) for event in settled] == [ConnClose]
    assert (reader.records, reader.malformed) == (4, 1)
    # While a connection awaits its address, data is settled in order, not batched.
    awaiting[ConnKey(5, 3, 99)] = None
    assert reader(None, _data_record(7), DATA_HEADER_SIZE + 2) == 0
    assert len(reader.batch) == 1 and type(settled[-1]) is DataEvent
    # A full batch ends this read of the ring buffer.
    reader.batch += [settled[-1]]
    awaiting.clear()
    assert reader(None, _data_record(7), DATA_HEADER_SIZE + 2) == -1
