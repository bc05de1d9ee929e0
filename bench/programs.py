"""Kernel time of the probe's BPF programs per request, program by program,
and the probe process's own CPU per request, for one or more builds side by
side.

``python -m bench.programs [TREE ...]`` starts the benchmark's servers and
sink once. Each round it runs ``probe run`` from each TREE in turn (a
checkout of this repository with its hot path compiled, ``python
scripts/compile.py`` in it; this one by default; the order reverses every
round), warms it up with a second of load, then drives the server with h2load
at a fixed rate, ``--readings`` times, with the kernel's BPF statistics on.
Each reading takes every program's run time and count from the probe's
fdinfo (by program id, named by bpftool), and the probe's CPU clock (all its
threads). It prints, per tree, the median over its readings of each
program's nanoseconds and runs per request, and of their total, and of the
probe's CPU per request with its range. This VM's timings move by tens of
per cent from one minute to the next: compare builds within one run of this
tool, never across runs.

``--exclude NAME`` keeps a process untraced, as the load generators are
unless ``--trace-load``: ``--trace-load --exclude nginx`` measures what
traced clients of a server on another host cost.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import harness, load, observe
from bench.workloads import Settings

TOTAL = "all programs"
WARM_UP_S = 1.0


@dataclass(frozen=True, slots=True)
class Counters:
    """A program's run time and run count, as the kernel's statistics keep them."""

    run_time_ns: int
    runs: int


@dataclass(frozen=True, slots=True)
class PerRequest:
    ns: float
    runs: float

    @property
    def ns_per_run(self) -> float:
        return self.ns / self.runs if self.runs else 0.0


def per_request(
    before: Mapping[str, Counters], after: Mapping[str, Counters], requests: int
) -> dict[str, PerRequest]:
    """Each program's share of ``requests``, from two readings; the programs
    that did not run are left out, and ``TOTAL`` sums the others."""
    if requests <= 0:
        raise ValueError(f"{requests} requests: the load generator got no answer")
    shares = {}
    for name, now in after.items():
        then = before.get(name, Counters(0, 0))
        runs = now.runs - then.runs
        if runs > 0:
            shares[name] = PerRequest(
                (now.run_time_ns - then.run_time_ns) / requests, runs / requests
            )
    shares[TOTAL] = PerRequest(
        sum(share.ns for share in shares.values()), sum(share.runs for share in shares.values())
    )
    return shares


def medians(readings: Sequence[Mapping[str, PerRequest]]) -> dict[str, PerRequest]:
    """Each program's median over ``readings``, counting a reading it is
    missing from as no time; most time first, ``TOTAL`` at the top."""
    names = {name for reading in readings for name in reading}
    summary = {
        name: PerRequest(
            statistics.median(r[name].ns if name in r else 0.0 for r in readings),
            statistics.median(r[name].runs if name in r else 0.0 for r in readings),
        )
        for name in names
    }
    return dict(sorted(summary.items(), key=lambda item: (item[0] != TOTAL, -item[1].ns)))


def format_summary(
    tree: str, summary: Mapping[str, PerRequest], readings: int, cpu_us: Sequence[float]
) -> str:
    """The tree's lines; ``cpu_us`` is the probe's CPU per request, a reading each."""
    lines = [
        f"{tree} (medians of {readings} readings):",
        f"  probe CPU {statistics.median(cpu_us):.2f} us/request "
        f"({min(cpu_us):.2f}-{max(cpu_us):.2f})",
    ]
    for name, share in summary.items():
        lines.append(
            f"  {share.ns:8.0f} ns/request {share.runs:6.2f} runs/request "
            f"{share.ns_per_run:6.0f} ns/run  {name}"
        )
    return "\n".join(lines)


def _program_names() -> dict[str, str]:
    """Program id -> name, for every program loaded (bpftool)."""
    shown = subprocess.run(
        ["bpftool", "--json", "prog", "show"], capture_output=True, text=True, check=True
    )
    return {str(program["id"]): program.get("name", "") for program in json.loads(shown.stdout)}


def read_programs(pid: int, names: dict[str, str]) -> dict[str, Counters]:
    """The counters of ``pid``'s programs by name (those of one name summed);
    ``names`` caches bpftool's answers by program id."""
    counters: dict[str, Counters] = {}
    for info in observe.bpf_programs(pid):
        program = info["prog_id"]
        if program not in names:
            names.update(_program_names())
        name = names.get(program) or f"program {program}"
        seen = counters.get(name, Counters(0, 0))
        counters[name] = Counters(
            seen.run_time_ns + int(info["run_time_ns"]), seen.runs + int(info["run_cnt"])
        )
    return counters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.programs", description=__doc__)
    parser.add_argument("trees", nargs="*", type=Path, default=[harness.REPO])
    parser.add_argument("--server", choices=("nginx", "python", "chain"), default="nginx")
    parser.add_argument("--rate", type=int, default=5_000, help="requests a second")
    parser.add_argument("--seconds", type=float, default=3.0, help="each reading's load")
    parser.add_argument("--new-connections", action="store_true", help="one per request")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--readings", type=int, default=3, help="per run of a tree")
    parser.add_argument("--trace-load", action="store_true", help="trace h2load too")
    parser.add_argument("--exclude", action="append", default=[], metavar="NAME")
    args = parser.parse_args(argv)
    settings = Settings(trace_load_generator=args.trace_load)
    trees = [tree.resolve() for tree in args.trees]
    readings: dict[Path, list[dict[str, PerRequest]]] = {tree: [] for tree in trees}
    cpu_us: dict[Path, list[float]] = {tree: [] for tree in trees}  # the probe's, a request
    names: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-programs-")))
        scratch.chmod(0o755)  # nginx's worker runs as nobody
        sink = harness.Sink()
        stack.enter_context(sink.child)
        url = harness.Servers(stack, scratch, sink, sdk=False).urls[args.server, False]
        log = str(scratch / "h2load.log")
        for round_ in range(args.rounds):
            for tree in trees if round_ % 2 == 0 else trees[::-1]:
                print(f"bench.programs: round {round_ + 1}, {tree}", file=sys.stderr)
                with harness.probe(sink, settings, tree, args.exclude) as traced:
                    pid = traced.child.pid
                    load.fixed_rate(url, args.rate, WARM_UP_S, args.new_connections, log)
                    time.sleep(0.5)
                    for _ in range(args.readings):
                        with observe.bpf_stats():
                            before = read_programs(pid, names)
                            cpu_before = observe.cpu_seconds(pid)
                            done = load.fixed_rate(
                                url, args.rate, args.seconds, args.new_connections, log
                            )
                            cpu_after = observe.cpu_seconds(pid)
                            after = read_programs(pid, names)
                        readings[tree].append(per_request(before, after, done.requests))
                        cpu_us[tree].append((cpu_after - cpu_before) * 1e6 / done.requests)
    for tree in trees:
        summary = medians(readings[tree])
        print(format_summary(str(tree), summary, len(readings[tree]), cpu_us[tree]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
