"""The `probe` command line."""

from __future__ import annotations

import argparse
import sys

from probe import __version__
from probe.commands import capture, check, run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="probe",
        description="Trace HTTP requests of unmodified programs with eBPF.",
    )
    parser.add_argument("--version", action="version", version=f"probe {__version__}")
    subparsers = parser.add_subparsers(title="commands", required=True)
    capture.add_parser(subparsers)
    check.add_parser(subparsers)
    run.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.command(args)


if __name__ == "__main__":
    sys.exit(main())
