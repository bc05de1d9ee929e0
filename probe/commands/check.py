"""`probe check`: what this kernel and machine offer the probe."""

from __future__ import annotations

import argparse
import sys

from probe import compiled
from probe.kernel import features, tls


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
    # HTTPS is traced where OpenSSL is found: say where that would be.
    files = tls.openssl_files()
    first = files[0] if files else "no libssl, and no running program with OpenSSL linked in"
    print(f"{'openssl':<13} {'ok' if files else 'no':<8} {first}")
    for path in files[1:]:
        print(f"{'':<22} {path}")
    # Not required: from source the probe runs, at about twice the CPU.
    hot_path = compiled.running_status()
    print(f"{'hot path':<13} {'ok' if hot_path.compiled else 'no':<8} {hot_path}")
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
