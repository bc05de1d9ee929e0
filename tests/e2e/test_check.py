"""``probe check`` reports what this machine offers the probe, and passes here."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def check(probe) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*probe, "check"], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def report(check) -> str:
    return (check.stdout + check.stderr).lower()


def test_passes_on_this_machine(check):
    assert check.returncode == 0, f"probe check failed:\n{check.stdout}{check.stderr}"


def test_reports_kernel_release(report):
    assert os.uname().release.lower() in report, report


def test_reports_bcc_version(report):
    version = subprocess.run(
        [sys.executable, "-c", "import bcc; print(bcc.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert "bcc" in report and version in report, report


@pytest.mark.parametrize(
    "feature",
    ["btf", "tracepoint", "uprobe", "kprobe", "ring buffer", "header", "capabilit"],
)
def test_reports_feature(report, feature):
    assert feature in report, report
