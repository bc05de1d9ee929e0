"""The daemon's log rate limit and formats, the user-space process filter, and what of
the probe's own exports is never traced: its endpoints, and requests that are exports."""

from __future__ import annotations

import io
import json
import logging

import pytest

from probe import pipeline
from probe.kernel.events import Endpoint
from probe.logs import RateLimitFilter, configure
from probe.pipeline import MAX_FILTER_RESOURCES, ProcessFilter, exporter_endpoints, is_own_export
from probe.protocol.model import HttpRequest
from probe.trace.span import Resource


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("probe", logging.WARNING, __file__, 1, message, (), None)


def test_rate_limit_lets_one_per_interval_and_counts_the_rest() -> None:
    clock = FakeClock()
    limit = RateLimitFilter(interval=60, clock=clock)
    assert limit.filter(_record("collector down: %s"))
    assert not limit.filter(_record("collector down: %s"))
    assert not limit.filter(_record("collector down: %s"))
    assert limit.filter(_record("another problem"))  # other messages are not held back
    clock.now = 61
    passed = _record("collector down: %s")
    assert limit.filter(passed)
    assert passed.suppressed == 2


def test_text_and_json_lines() -> None:
    text = io.StringIO()
    configure("text", text).warning("queue full: dropped %d spans", 3)
    assert text.getvalue() == "probe: warning: queue full: dropped 3 spans\n"

    lines = io.StringIO()
    configure("json", lines).error("export failed: %s", "UNAVAILABLE")
    entry = json.loads(lines.getvalue())
    assert (entry["level"], entry["logger"], entry["message"]) == (
        "error",
        "probe",
        "export failed: UNAVAILABLE",
    )
    assert entry["time"].endswith("Z")


def _process(name: str, path: str, container: str | None = None) -> Resource:
    attributes = {"process.executable.name": name, "process.executable.path": path}
    if container:
        attributes["container.id"] = container
    return Resource(attributes)


def test_process_filter() -> None:
    nginx = _process("nginx", "/usr/sbin/nginx", "ab" * 32)
    curl = _process("curl", "/usr/bin/curl")
    assert not ProcessFilter()  # empty: everything, and the pipeline skips it
    assert ProcessFilter(comm_patterns=("ng*",)).wants(nginx)
    assert not ProcessFilter(comm_patterns=("ng*",)).wants(curl)
    assert ProcessFilter(exe_patterns=("/usr/bin/*",)).wants(curl)
    assert not ProcessFilter(exe_patterns=("/usr/bin/*",)).wants(nginx)
    assert ProcessFilter(container_ids=("abab",)).wants(nginx)
    assert not ProcessFilter(container_ids=("abab",)).wants(curl)
    assert not ProcessFilter(comm_patterns=("nginx",), exe_patterns=("/usr/bin/*",)).wants(nginx)
    assert ProcessFilter(exclude_comm_patterns=("cu*",))  # not empty
    assert not ProcessFilter(exclude_comm_patterns=("cu*",)).wants(curl)
    assert ProcessFilter(exclude_comm_patterns=("cu*",)).wants(nginx)
    # an exclusion wins over an inclusion
    assert not ProcessFilter(comm_patterns=("*",), exclude_comm_patterns=("nginx",)).wants(nginx)


def test_process_filter_keeps_each_verdict_to_its_process(monkeypatch) -> None:
    monkeypatch.setattr(pipeline, "MAX_FILTER_VERDICTS", 3)
    wanted = ProcessFilter(comm_patterns=("ng*",), container_ids=("abab",))
    nginx = _process("nginx", "/usr/sbin/nginx", "ab" * 32)
    bare_nginx = _process("nginx", "/usr/sbin/nginx")  # no container: not wanted
    for _ in range(2):  # asked again: the kept verdicts answer the same
        assert wanted.wants(nginx)
        assert not wanted.wants(bare_nginx)
        assert not wanted.wants(_process("curl", "/usr/bin/curl"))
    for number in range(10):
        assert wanted.wants(_process(f"ng{number}", "/opt/ng", "abab"))
    assert len(wanted._verdicts) <= 3
    assert wanted.wants(nginx)
    assert not wanted.wants(bare_nginx)


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("http://127.0.0.1:4318/v1/traces", {Endpoint("127.0.0.1", 4318)}),
        ("http://[::1]:4317", {Endpoint("::1", 4317)}),
        ("127.0.0.1:4317", {Endpoint("127.0.0.1", 4317)}),  # gRPC's bare host:port
        ("https://127.0.0.1/v1/traces", {Endpoint("127.0.0.1", 443)}),
        ("http://127.0.0.1/v1/traces", {Endpoint("127.0.0.1", 80)}),
        ("http://collector.invalid:4318/v1/traces", set()),  # does not resolve: nothing
    ],
)
def test_exporter_endpoints(endpoint: str, expected: set[Endpoint]) -> None:
    assert exporter_endpoints(endpoint) == expected


@pytest.mark.parametrize(
    ("method", "agent", "expected"),
    [
        ("POST", "probe/0.1.0", True),
        ("POST", "probe/9.9.9", True),  # another node's probe, another version
        ("GET", "probe/0.1.0", False),  # exports are POSTs
        ("POST", "probe-e2e/1", False),
        ("POST", "OTel-OTLP-Exporter-Python/1.27.0", False),
        ("POST", None, False),
    ],
)
def test_own_exports_are_known_by_method_and_user_agent(
    method: str, agent: str | None, expected: bool
) -> None:
    headers = [("host", "collector:4318")] + ([("user-agent", agent)] if agent else [])
    request = HttpRequest("1.1", headers, 1, 2, 3, method=method, target="/v1/traces")
    assert is_own_export(request) is expected


def test_process_filter_remembers_verdicts_boundedly() -> None:
    """Asked at every connection: a process's resource answers from memory,
    which stays bounded and never answers for another resource."""
    only_nginx = ProcessFilter(comm_patterns=("ng*",))
    nginx, curl = _process("nginx", "/usr/sbin/nginx"), _process("curl", "/usr/bin/curl")
    for _ in range(3):
        assert only_nginx.wants(nginx)
        assert not only_nginx.wants(curl)
    many = [
        _process(f"ng{n}" if n % 2 else f"x{n}", "/bin/x") for n in range(MAX_FILTER_RESOURCES + 5)
    ]
    assert [only_nginx.wants(r) for r in many] == [n % 2 == 1 for n in range(len(many))]
    assert len(only_nginx._by_resource) <= MAX_FILTER_RESOURCES
    assert only_nginx.wants(nginx) and not only_nginx.wants(curl)
