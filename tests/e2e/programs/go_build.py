"""Builds the Go programs of this folder for the tests: the system's Go,
standard library only, offline, with private caches (HOME may be unset)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def build(package: Path, output: Path, *ldflags: str) -> Path:
    """``go build`` the program in directory ``package`` into ``output``."""
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOCACHE": str(output.parent / "go-cache"),
        "GOPATH": str(output.parent / "gopath"),
        "GOFLAGS": "",
    }
    command = ["go", "build", "-o", str(output)]
    if ldflags:
        command.append(f"-ldflags={' '.join(ldflags)}")
    result = subprocess.run(
        command, cwd=package, env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"go build failed in {package}:\n{result.stdout}{result.stderr}")
    return output
