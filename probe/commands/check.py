"""`probe check`: what this kernel and machine offer the probe."""

from __future__ import annotations

import argparse
import sys

from probe.kernel import features


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check",
        help="report what this kernel and machine offer; non-zero exit if probe cannot run",
    )
    parser.set_defaults(command=run)


def run(_args: argparse.Namespace) -> int:
    results = features.findings()
    for finding in results:
        mark = "ok" if finding.ok else ("MISSING" if finding.required else "no")
        print(f"{finding.name:<13} {mark:<8} {finding.detail}")
    blocking = [f.name for f in results if f.required and not f.ok]
    if blocking:
        print(
            f"\nprobe cannot run here: {', '.join(blocking)}. `make setup` installs bcc and "
            "kernel headers; run as root.",
            file=sys.stderr,
        )
        return 1
    print("\nprobe can run here.")
    return 0
