"""Whole traces across real services, each in a network namespace of its own.

Every test builds a chain of namespaces joined by veth pairs (addresses in
10.77.0.0/16, inside those namespaces only), starts one service per namespace
(the chain programs: Python threads or asyncio, Go net/http, Node.js http; a
database-like one answers after a delay) and sends requests from curl in the
first namespace. Every service passes the request's path on unchanged and each
test's paths are unique per request, so a span in the wrong trace shows. The
namespaces are deleted even when a test fails.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from probe.export.tree import MARK, render_trace
from probe.trace.span import Resource, Span, SpanKind
from probe.trace.traceparent import parse_traceparent
from tests.helpers import go_build, run_client

PROGRAMS = Path(__file__).parent / "programs"
PORT = 18080  # every service listens on it, in its own namespace; the probe filters on it
DB_DELAY_MS = 300
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
RULES = ("thread", "goroutine", "traceparent", "same_host", "inferred", "none")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextmanager
def namespaces(count: int) -> Iterator[list[str]]:
    """``count`` namespaces in a row; namespace i reaches i+1 at ``address_of(i + 1)``."""
    token = secrets.token_hex(3)
    names = [f"probe-{token}-{i}" for i in range(count)]
    created: list[str] = []
    try:
        for name in names:
            ip("netns", "add", name)
            created.append(name)
            ip("-n", name, "link", "set", "lo", "up")
        for i in range(count - 1):
            left, right = f"pv{token}{i}a", f"pv{token}{i}b"
            ip("link", "add", left, "netns", names[i], "type", "veth",
               "peer", "name", right, "netns", names[i + 1])  # fmt: skip
            for name, device, host in ((names[i], left, 1), (names[i + 1], right, 2)):
                ip("-n", name, "addr", "add", f"10.77.{i}.{host}/24", "dev", device)
                ip("-n", name, "link", "set", device, "up")
        yield names
    finally:
        for name in created:  # deleting a namespace deletes its veth ends too
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def address_of(position: int) -> str:
    """Where the service at ``position`` (>= 1) is reached from the namespace before it."""
    return f"10.77.{position - 1}.2"


@dataclass
class Service:
    name: str  # its service.name
    process: subprocess.Popen[str]

    @property
    def pid(self) -> int:
        return self.process.pid


def commands(kind: str, downstream: str, delay_ms: int) -> list[str]:
    """The command line of one kind of chain service."""
    if kind in ("thread", "asyncio", "db"):
        command = [sys.executable, str(PROGRAMS / "chain_py.py"), "--port", str(PORT)]
        command += ["--mode", "asyncio" if kind == "asyncio" else "thread"]
        command += ["--delay-ms", str(delay_ms)]
    elif kind == "node":
        command = ["node", str(PROGRAMS / "chain_node.js"), "--port", str(PORT)]
    else:
        command = [kind, "-listen", f"0.0.0.0:{PORT}"]  # a Go binary
    if downstream:
        command += ["-downstream" if kind.startswith("/") else "--downstream", downstream]
    return command


@contextmanager
def chain(kinds: Sequence[tuple[str, str]]) -> Iterator[tuple[str, list[Service]]]:
    """Services (name, kind) in a row after curl's namespace: (curl's namespace, services).

    The last one is the database: it answers after ``DB_DELAY_MS``.
    """
    with ExitStack() as stack:
        names = stack.enter_context(namespaces(len(kinds) + 1))
        services: list[Service] = []
        for position in range(len(kinds), 0, -1):  # the database first
            name, kind = kinds[position - 1]
            last = position == len(kinds)
            downstream = "" if last else f"http://{address_of(position + 1)}:{PORT}"
            command = commands(kind, downstream, DB_DELAY_MS if last else 0)
            process = subprocess.Popen(
                ["ip", "netns", "exec", names[position], *command],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "OTEL_SERVICE_NAME": name},
            )
            stack.callback(stop, process)  # before the namespaces go
            assert process.stdout is not None
            if process.stdout.readline().strip() != str(PORT):
                pytest.fail(f"{name} ({command}) did not start: {process.stderr.read()}")
            services.insert(0, Service(name, process))
        yield names[0], services


def stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def curl(namespace: str, path: str, *headers: str) -> int:
    """One GET by curl in ``namespace`` to the first service; curl's pid."""
    command = ["ip", "netns", "exec", namespace, "curl", "-sS", "--max-time", "60"]
    command += ["-o", "/dev/null", "-w", "%{http_code}"]
    for header in headers:
        command += ["-H", header]
    pid, stdout = run_client([*command, f"http://{address_of(1)}:{PORT}{path}"], timeout=90)
    assert stdout == "200"
    return pid


@pytest.fixture(scope="module")
def go_binary(tmp_path_factory: pytest.TempPathFactory) -> str:
    """programs/chain_go built with the system's Go."""
    return str(go_build(PROGRAMS / "chain_go", tmp_path_factory.mktemp("chain_go") / "chain_go"))


# --- reading the spans back --------------------------------------------------


def by_trace(spans: list[dict]) -> dict[str, list[dict]]:
    traces: dict[str, list[dict]] = defaultdict(list)
    for span in spans:
        traces[span["trace_id"]].append(span)
    return dict(traces)


def chain_of(trace: list[dict]) -> list[tuple[str, str]]:
    """(service, kind) from the root down, requiring one child per span."""
    children: dict[str, list[dict]] = defaultdict(list)
    for span in trace:
        children[span["parent_span_id"]].append(span)
    [node] = children[""]
    path = []
    while True:
        path.append((node["resource"]["service.name"], node["kind"]))
        below = children.get(node["span_id"], [])
        assert len(below) <= 1, f"{node['span_id']} has {len(below)} children"
        if not below:
            return path
        node = below[0]


def link_counts(stderr: str) -> dict[str, int]:
    """The ``links:`` line of the probe's summary."""
    match = re.search(r"^links: (.*)$", stderr, re.MULTILINE)
    assert match, stderr
    line = match.group(1).replace(" malformed)", "").replace(" (", ", malformed ")
    return {
        name.replace(" ", "_"): int(value)
        for name, value in (part.rsplit(" ", 1) for part in line.split(", "))
    }


def rules_of(spans: list[dict]) -> dict[str, int]:
    found = Counter(span["attributes"]["probe.link.rule"] for span in spans)
    return {rule: found[rule] for rule in RULES}


def to_span(data: dict) -> Span:
    return Span(
        data["name"],
        SpanKind[data["kind"]],
        data["start_time_unix_nano"],
        data["end_time_unix_nano"],
        Resource(data["resource"]),
        trace_id=bytes.fromhex(data["trace_id"]),
        span_id=bytes.fromhex(data["span_id"]),
        parent_span_id=bytes.fromhex(data["parent_span_id"]) or None,
        attributes=data["attributes"],
    )


SEED_CHAIN = [
    ("curl", "CLIENT"),
    ("frontend", "SERVER"),
    ("frontend", "CLIENT"),
    ("orders", "SERVER"),
    ("orders", "CLIENT"),
    ("inventory", "SERVER"),
    ("inventory", "CLIENT"),
    ("db", "SERVER"),
]


# --- the tests ----------------------------------------------------------------


def test_seed_scenario_is_one_trace_with_the_database_marked(probe_capture, go_binary) -> None:
    kinds = [("frontend", "thread"), ("orders", go_binary), ("inventory", "node"), ("db", "db")]
    with chain(kinds) as (client_ns, services), probe_capture("-P", str(PORT)) as probe:
        curl_pid = curl(client_ns, "/checkout/1")
    spans = probe.spans
    assert len(spans) == 8, probe.describe() + probe.stderr
    assert list(by_trace(spans)) == [spans[0]["trace_id"]], probe.describe() + probe.stderr
    assert chain_of(spans) == SEED_CHAIN
    pids = {(s["resource"]["service.name"], s["resource"]["process.pid"]) for s in spans}
    assert pids == {("curl", curl_pid), *((s.name, s.pid) for s in services)}
    assert {s["attributes"]["url.path"] for s in spans} == {"/checkout/1"}
    assert rules_of(spans) == {
        "thread": 2,  # frontend's and inventory's calls, on their request's thread
        "goroutine": 1,  # orders' call, on its request's goroutine
        "traceparent": 0,
        "same_host": 4,  # each server below its client, across namespaces
        "inferred": 0,
        "none": 1,  # curl: the root
    }
    assert {rule: link_counts(probe.stderr)[rule] for rule in RULES} == rules_of(spans)
    # the database's span has the most self time, and the tree marks it
    lines = render_trace([to_span(s) for s in spans])
    [marked] = [line for line in lines[2:-1] if line.startswith(MARK)]
    assert marked.split()[1:3] == ["db", "SRV"], "\n".join(lines)


def test_50_concurrent_requests_are_50_whole_traces(probe_capture, go_binary) -> None:
    kinds = [("frontend", "thread"), ("orders", go_binary), ("db", "db")]
    paths = [f"/item/{i}" for i in range(50)]
    with (
        chain(kinds) as (client_ns, _),
        probe_capture("-P", str(PORT)) as probe,
        ThreadPoolExecutor(50) as pool,
    ):
        curl_pids = list(pool.map(lambda path: curl(client_ns, path), paths))
    traces = by_trace(probe.spans)
    assert len(probe.spans) == 300, probe.describe() + probe.stderr
    assert len(traces) == 50, sorted(Counter(map(len, traces.values())).items())
    roots = {}
    for trace in traces.values():
        assert chain_of(trace) == [*SEED_CHAIN[:5], ("db", "SERVER")]
        [path] = {span["attributes"]["url.path"] for span in trace}  # none in a wrong trace
        [root] = [span for span in trace if not span["parent_span_id"]]
        roots[path] = root["resource"]["process.pid"]
    assert roots == dict(zip(paths, curl_pids, strict=True))
    assert rules_of(probe.spans) == {
        "thread": 50,
        "goroutine": 50,
        "traceparent": 0,
        "same_host": 150,
        "inferred": 0,
        "none": 50,
    }


def test_a_client_that_sends_traceparent_brings_the_whole_chain_into_its_trace(
    probe_capture,
) -> None:
    kinds = [("frontend", "thread"), ("inventory", "node"), ("db", "db")]
    header = f"traceparent: 00-{TRACE}-{PARENT}-01"
    with chain(kinds) as (client_ns, _), probe_capture("-P", str(PORT)) as probe:
        curl(client_ns, "/traced", header, "tracestate: congo=t61rcWkgMzE")
    spans = probe.spans
    assert len(spans) == 6, probe.describe() + probe.stderr
    assert {span["trace_id"] for span in spans} == {TRACE}
    by_id = {span["span_id"]: span for span in spans}
    parents = [
        (span["resource"]["service.name"], span["kind"], by_id[span["parent_span_id"]]["kind"])
        if span["parent_span_id"] in by_id
        else (span["resource"]["service.name"], span["kind"], span["parent_span_id"])
        for span in spans
    ]
    # curl and frontend both name the application's span (the header) as parent
    assert sorted(parents) == sorted(
        [
            ("curl", "CLIENT", PARENT),
            ("frontend", "SERVER", PARENT),
            ("frontend", "CLIENT", "SERVER"),
            ("inventory", "SERVER", "CLIENT"),
            ("inventory", "CLIENT", "SERVER"),
            ("db", "SERVER", "CLIENT"),
        ]
    )
    assert rules_of(spans) == {
        "thread": 2,
        "goroutine": 0,
        "traceparent": 2,
        "same_host": 2,
        "inferred": 0,
        "none": 0,
    }


@pytest.mark.parametrize("loop", ["node", "asyncio"])
def test_an_event_loop_in_the_chain_never_gets_a_wrong_parent(probe_capture, loop) -> None:
    kinds = [("frontend", "thread"), ("loop", loop), ("db", "db")]
    paths = [f"/loop/{i}" for i in range(10)]
    with (
        chain(kinds) as (client_ns, services),
        probe_capture("-P", str(PORT)) as probe,
        ThreadPoolExecutor(10) as pool,
    ):
        list(pool.map(lambda path: curl(client_ns, path), paths))
    spans = probe.spans
    assert len(spans) == 60, probe.describe() + probe.stderr
    by_id = {span["span_id"]: span for span in spans}
    for span in spans:  # every parent is of the same request: no wrong parent
        parent = by_id.get(span["parent_span_id"])
        assert span["parent_span_id"] == "" or parent is not None, span
        if parent is not None:
            assert parent["attributes"]["url.path"] == span["attributes"]["url.path"]
    for trace in by_trace(spans).values():
        assert len({span["attributes"]["url.path"] for span in trace}) == 1
    # the loop's calls: a child when one request was in progress, else an inferred link
    calls = [s for s in spans if s["resource"]["service.name"] == "loop" and s["kind"] == "CLIENT"]
    assert len(calls) == 10
    inferred = [s for s in calls if s["attributes"]["probe.link.rule"] == "inferred"]
    assert len(inferred) >= 1  # ten requests overlap for the database's 300 ms
    for span in calls:
        if span in inferred:
            [link] = span["links"]
            assert (span["parent_span_id"], link["attributes"]) == (
                "",
                {"probe.link.inferred": True},
            )
            assert by_id[link["span_id"]]["resource"]["service.name"] == "loop"
        else:
            assert span["attributes"]["probe.link.rule"] == "thread"
            assert span["links"] == []
    loop_pid = services[1].pid
    assert {s["resource"]["process.pid"] for s in calls} == {loop_pid}
    assert rules_of(spans) == {
        "thread": 20 - len(inferred),  # frontend's ten, and the loop's
        "goroutine": 0,
        "traceparent": 0,
        "same_host": 30,
        "inferred": len(inferred),
        "none": 10,
    }
    assert {rule: link_counts(probe.stderr)[rule] for rule in RULES} == rules_of(spans)


def malformed_traceparents() -> list[str]:
    """Fixed bad values, and valid ones with one character changed (seeded, so repeatable)."""
    valid = f"00-{TRACE}-{PARENT}-01"
    values = [
        f"00-{'0' * 32}-{PARENT}-01",
        f"00-{TRACE}-{'0' * 16}-01",
        f"00-{TRACE.upper()}-{PARENT}-01",
        f"ff-{TRACE}-{PARENT}-01",
        f"00-{TRACE}-{PARENT}-01-extra",
        f"00-{TRACE}-{PARENT}",
        "garbage",
        "00-\u00e9\u00e9-x",
    ]
    rng = random.Random(4)
    while len(values) < 20:
        where = rng.randrange(len(valid))
        value = valid[:where] + rng.choice("gz-_G.:~ xX") + valid[where + 1 :]
        if parse_traceparent(value) is None:
            values.append(value)
    return values


def test_malformed_traceparent_values_are_counted_and_ignored(probe_capture) -> None:
    kinds = [("frontend", "thread"), ("db", "db")]
    values = malformed_traceparents()
    paths = [f"/bad/{i}" for i in range(len(values))]
    with (
        chain(kinds) as (client_ns, _),
        probe_capture("-P", str(PORT)) as probe,
        ThreadPoolExecutor(5) as pool,
    ):
        # each header once; and a valid one twice, which makes neither trustworthy
        requests = [(path, [f"traceparent: {v}"]) for path, v in zip(paths, values, strict=True)]
        requests.append(("/bad/twice", [f"traceparent: 00-{TRACE}-{PARENT}-01"] * 2))
        list(pool.map(lambda request: curl(client_ns, request[0], *request[1]), requests))
    spans = probe.spans
    traces = by_trace(spans)
    shown = probe.describe() + probe.stderr
    assert (len(spans), len(traces)) == (4 * len(requests), len(requests)), shown
    for trace in traces.values():  # each request its own trace, started by curl as root
        assert chain_of(trace) == [*SEED_CHAIN[:3], ("db", "SERVER")]
        assert len({span["attributes"]["url.path"] for span in trace}) == 1
    assert TRACE not in traces and "0" * 32 not in traces
    assert not {span["parent_span_id"] for span in spans} & {PARENT, "0" * 16}
    # curl's request and frontend's both carried the header
    assert link_counts(probe.stderr)["malformed"] == 2 * len(requests)
    assert rules_of(spans)["traceparent"] == 0


def test_over_the_rate_limit_each_request_is_traced_at_both_ends_or_neither(
    probe_capture,
) -> None:
    """Far over a rate limit of 4 exchanges a second: the kernel sheds most, but
    both ends of each connection share their verdicts and number exchanges
    alike, so every span traced is linked to its other end: no server span is
    left a root, no client span traced without its server's."""
    kinds = [("frontend", "thread"), ("db", "db")]
    paths = [f"/shed/{i}" for i in range(40)]
    with (
        chain(kinds) as (client_ns, _),
        probe_capture("-P", str(PORT), "--max-exchange-rate", "4") as probe,
        ThreadPoolExecutor(20) as pool,
    ):
        list(pool.map(lambda path: curl(client_ns, path), paths))
    spans = probe.spans
    shed = int(re.search(r"exchanges shed: (\d+)", probe.stderr).group(1))
    assert spans and shed > 0, probe.describe() + probe.stderr
    servers = [span for span in spans if span["kind"] == "SERVER"]
    clients = {span["span_id"]: span for span in spans if span["kind"] == "CLIENT"}
    for server in servers:
        assert server["attributes"]["probe.link.rule"] == "same_host", server
        client = clients.pop(server["parent_span_id"])
        assert client["attributes"]["url.path"] == server["attributes"]["url.path"]
    assert clients == {}, list(clients.values())  # each client span's server was traced
