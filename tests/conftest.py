"""Shared test settings: which tests need root and bcc."""

from __future__ import annotations

import os
import subprocess

import pytest


def bcc_importable() -> bool:
    try:
        import bcc  # noqa: F401
    except ImportError:
        return False
    return True


def root_skip_reason() -> str | None:
    """Why the tests that load BPF cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root to load BPF programs"
    if not bcc_importable():
        return "bcc is not importable (run make setup)"
    return None


@pytest.fixture(scope="session")
def tracing_ready() -> None:
    """Skip with the reason printed when the kernel tests cannot run."""
    reason = root_skip_reason()
    if reason:
        pytest.skip(reason)
    # tracefs is unmounted on a fresh boot; the probe mounts it itself, but
    # tests that read tracepoint formats before starting a probe need it too.
    if not os.path.ismount("/sys/kernel/tracing"):
        subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"], check=False)
