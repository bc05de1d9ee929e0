"""The floor: every tracepoint the probe attaches to, each with a BPF
program that returns at once.

What a syscall-tracepoint design pays on this kernel before doing any work
of its own: with these attached, every syscall of every process takes the
tracing path. Run as ``python -m bench.floor``: it attaches, prints
``ready`` and holds the programs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

from probe.kernel import features


def program_name(index: int) -> str:
    return f"floor_{index}"


def floor_source(tracepoints: Sequence[str]) -> str:
    """One empty program per tracepoint, named by its index in ``tracepoints``."""
    return "".join(
        f"int {program_name(index)}(void *ctx) {{ return 0; }}\n"
        for index in range(len(tracepoints))
    )


def main() -> int:
    try:
        features.prepare()  # root, bcc, headers; mounts tracefs where missing
        from bcc import BPF  # noqa: PLC0415 - prepare() checked it is there
    except features.ProbeError as error:
        print(f"floor: {error}", file=sys.stderr)
        return 1
    # Those the probe attaches at start: the one it may attach later is off
    # in the benchmark's runs (its servers accept with an address buffer).
    tracepoints = features.ATTACHED_TRACEPOINTS
    bpf = BPF(text=floor_source(tracepoints).encode(), cflags=["-w"])
    # Block the stop signals before saying ready, so none is missed.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        for index, tracepoint in enumerate(tracepoints):
            bpf.attach_tracepoint(tp=tracepoint.replace("/", ":"), fn_name=program_name(index))
        print("ready", flush=True)
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
    finally:
        bpf.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
