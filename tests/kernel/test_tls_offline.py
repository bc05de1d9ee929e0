"""TLS without the kernel: which files are OpenSSL, discovery's once-per-file
bookkeeping, and the https scheme of spans. Needs no privileges."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from probe.kernel.discovery import BinaryDiscovery
from probe.kernel.events import ConnKey, Endpoint, Role
from probe.kernel.tls import PROGRAMS, ssl_functions, system_libraries
from probe.protocol.model import ConnectionInfo, HttpExchange, HttpRequest, HttpResponse
from probe.stats import Stats
from probe.trace.builder import SpanBuilder
from probe.trace.clock import MonotonicClock
from probe.trace.resource import ResourceDetector

LIBSSL = Path("/lib/x86_64-linux-gnu/libssl.so.3")
NSS_LIBSSL = Path("/usr/lib/x86_64-linux-gnu/libssl3.so")


def _needs(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is not on this machine")


def test_libssl_defines_all_four_functions() -> None:
    _needs(LIBSSL)
    assert ssl_functions(LIBSSL) == set(PROGRAMS)


def test_node_exports_its_static_openssl() -> None:
    node = Path(shutil.which("node") or "/usr/bin/node")
    _needs(node)
    assert ssl_functions(node) == set(PROGRAMS)


def test_importers_and_other_libraries_are_not_openssl(tmp_path: Path) -> None:
    curl = Path(shutil.which("curl") or "/usr/bin/curl")
    _needs(curl)
    assert ssl_functions(curl) == set()  # imports SSL_write: not a definition
    not_elf = tmp_path / "libssl.so.3"
    not_elf.write_bytes(b"not an ELF file")
    assert ssl_functions(not_elf) == set()
    assert ssl_functions(tmp_path / "missing") == set()
    if NSS_LIBSSL.exists():  # NSS's libssl has other functions altogether
        assert ssl_functions(NSS_LIBSSL) == set()


def test_system_libraries_come_from_the_linker_cache() -> None:
    _needs(LIBSSL)
    if shutil.which("ldconfig") is None:
        pytest.skip("no ldconfig")
    found = {os.path.realpath(path) for path in system_libraries()}
    assert os.path.realpath(LIBSSL) in found
    assert os.path.realpath(NSS_LIBSSL) not in found


class Recorder:
    """A handler that wants files by name and records what it was offered."""

    def __init__(self, name: str, wanted: str, fail: bool = False) -> None:
        self.name = name
        self.wanted = wanted
        self.fail = fail
        self.offered: list[str] = []
        self.attached: list[str] = []

    def wants(self, path: str) -> bool:
        self.offered.append(path)
        return Path(path).name.startswith(self.wanted)

    def attach(self, path: str) -> list[str]:
        if self.fail:
            raise RuntimeError("no such symbol")
        self.attached.append(path)
        return ["SSL_read", "SSL_write"]


def _discovery(*handlers: Recorder) -> tuple[BinaryDiscovery, Stats]:
    stats = Stats()
    discovery = BinaryDiscovery(None, stats, logging.getLogger("test"))
    for handler in handlers:
        discovery.add_handler(handler)
    return discovery, stats


def test_each_file_is_offered_once_per_handler(tmp_path: Path) -> None:
    target = tmp_path / "libthing.so.1"
    target.write_bytes(b"x")
    alias = tmp_path / "alias.so"
    alias.symlink_to(target)
    first, second = Recorder("first", "libthing"), Recorder("second", "nothing")
    discovery, stats = _discovery(first, second)

    discovery.scan_files([str(target), str(alias), str(target), str(tmp_path / "gone")])
    discovery.scan_process(os.getpid())
    discovery.scan_process(os.getpid())

    assert first.attached == [str(target)]  # the alias is the same inode
    assert first.offered.count(str(target)) == 1
    assert str(alias) not in first.offered
    assert len(first.offered) == len(set(first.offered))
    assert second.offered == first.offered  # each handler sees each file once
    assert second.attached == []
    assert discovery.found() == {"first": [str(target)]}
    assert stats["uprobes_attached"] == 2


def test_an_exec_is_scanned_for_its_executable_alone() -> None:
    """Right after an exec the libraries are not mapped yet: /proc/PID/maps,
    the costly read, waits for the rescan."""
    recorder = Recorder("any", "python")
    discovery, _ = _discovery(recorder)
    assert discovery.scan_executable(os.getpid())  # examined, by every handler
    assert recorder.offered == [os.readlink("/proc/self/exe")]
    assert discovery.scan_executable(os.getpid())  # the next exec of the same file
    assert not discovery.scan_executable(2**22 + 1)  # above pid_max: never a process
    assert recorder.offered == [os.readlink("/proc/self/exe")]
    discovery.scan_process(os.getpid())  # the libraries, the executable not again
    assert recorder.offered[0] == os.readlink("/proc/self/exe")
    assert os.readlink("/proc/self/exe") not in recorder.offered[1:]
    assert any("libc" in Path(path).name for path in recorder.offered[1:])


def test_a_failing_handler_is_logged_and_counted(tmp_path: Path, caplog) -> None:
    target = tmp_path / "libthing.so"
    target.write_bytes(b"x")
    discovery, stats = _discovery(Recorder("broken", "libthing", fail=True))
    with caplog.at_level(logging.WARNING):
        discovery.scan_files([str(target)])
    assert stats["uprobe_attach_errors"] == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"broken: could not probe {target}: no such symbol"
    ]
    assert discovery.found() == {}


def test_gone_processes_and_rescans(tmp_path: Path) -> None:
    recorder = Recorder("any", "python")
    discovery, _ = _discovery(recorder)
    discovery.scan_process(2**22 + 1)  # above pid_max: never a process
    assert recorder.offered == []

    assert discovery.next_due_s() is None
    discovery.schedule(os.getpid(), 3600)
    discovery.schedule(1, 1800)  # the poll loop wakes for the first one due
    assert 1700 < discovery.next_due_s() <= 1800
    discovery.tick()
    assert recorder.offered == []  # not due yet
    discovery.forget(os.getpid())
    discovery.forget(1)
    discovery.schedule(os.getpid(), 0)
    assert discovery.next_due_s() == 0
    discovery.tick()
    assert os.path.realpath(f"/proc/{os.getpid()}/exe") in map(os.path.realpath, recorder.offered)


@pytest.mark.parametrize(
    ("tls", "host", "port", "full"),
    [
        (True, "example.test", 443, "https://example.test/a?b=REDACTED"),
        (True, "example.test:443", 443, "https://example.test/a?b=REDACTED"),
        (True, "example.test:8443", 8443, "https://example.test:8443/a?b=REDACTED"),
        (False, "example.test:443", 443, "http://example.test:443/a?b=REDACTED"),
        (False, "example.test", 80, "http://example.test/a?b=REDACTED"),
    ],
)
def test_spans_of_tls_connections_are_https(tls: bool, host: str, port: int, full: str) -> None:
    info = ConnectionInfo(
        ConnKey(1, 3, 1), Role.CLIENT, Endpoint("10.0.0.1", 40000), Endpoint("10.0.0.2", port)
    )
    info.tls = tls
    request = HttpRequest("1.1", [("host", host)], 1_000, 2_000, 1, method="GET", target="/a?b=c")
    response = HttpResponse("1.1", [], 3_000, 4_000, 1, status_code=200)
    span = SpanBuilder(ResourceDetector(), MonotonicClock()).build(
        HttpExchange(info, request, response)
    )
    assert span.all_attributes()["url.scheme"] == ("https" if tls else "http")
    assert span.all_attributes()["url.full"] == full
    assert span.all_attributes()["server.port"] == port
