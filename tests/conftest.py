"""Fixtures shared by every test folder: whether the tests that need root and
bcc can run, the Go programs built once, and a self-signed certificate."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import PROGRAMS, go_build, self_signed_certificate


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


@pytest.fixture(scope="session")
def go_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where Go programs are built; skips the test when there is no Go toolchain."""
    if shutil.which("go") is None:
        pytest.skip("no Go toolchain (run make setup)")
    return tmp_path_factory.mktemp("go")


@pytest.fixture(scope="session")
def go_relay(go_workdir: Path) -> Path:
    """programs/go_relay built: an HTTP(S) server, relay and client."""
    return go_build(PROGRAMS / "go_relay", go_workdir / "relay")


@pytest.fixture(scope="session")
def go_relay_stripped(go_workdir: Path) -> Path:
    """programs/go_relay built without its symbol table."""
    return go_build(PROGRAMS / "go_relay", go_workdir / "relay-stripped", "-s", "-w")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key: (cert, key)."""
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))
