"""Every reason the probe cannot run is one clear paragraph, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from probe.kernel import features, loader
from probe.kernel.features import ProbeError
from probe.kernel.loader import EventSource, ProbeOptions
from probe.stats import Stats

REPO = Path(__file__).resolve().parents[2]
AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]


def _probe(*args: str, prefix: list[str] = (), **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "probe", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **env},
        timeout=120,
    )


def _one_clear_paragraph(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("probe: ")
    return message


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges to nobody")
def test_not_root() -> None:
    message = _one_clear_paragraph(_probe("capture", "-d", "1", prefix=AS_NOBODY))
    assert "needs root" in message and "sudo" in message
    check = _probe("check", prefix=AS_NOBODY)
    assert check.returncode == 1 and "Traceback" not in check.stderr
    assert "probe cannot run here" in check.stderr


@pytest.mark.usefixtures("tracing_ready")
def test_no_kernel_headers(tmp_path: Path) -> None:
    message = _one_clear_paragraph(_probe("capture", "-d", "1", BCC_KERNEL_SOURCE=str(tmp_path)))
    assert "No kernel headers" in message and "make setup" in message


def test_no_bcc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(features.os, "geteuid", lambda: 0)
    monkeypatch.setattr(features, "_bcc_version", lambda: None)
    with pytest.raises(ProbeError, match="python3-bpfcc.*make setup"):
        features.prepare()


@pytest.mark.usefixtures("tracing_ready")
def test_kernel_refuses_the_programs() -> None:
    # A ring buffer that is not a power-of-two number of pages: the kernel
    # refuses the map, as it would refuse a program its verifier rejects.
    source = EventSource(ProbeOptions(ringbuf_pages=3), Stats())
    with pytest.raises(ProbeError, match="did not accept"):
        source.start()
    source.close()


def test_capture_size_out_of_range() -> None:
    with pytest.raises(ProbeError, match="capture size"):
        ProbeOptions(capture_bytes=1 << 20).cflags()


@pytest.mark.usefixtures("tracing_ready")
def test_task_storage_refused_falls_back_to_the_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    # This kernel has task storage; an older one refuses the programs that use
    # it, which is played here by refusing any build with the flag.
    real_load = loader._load
    builds: list[bool] = []

    def refuse_task_storage(bpf_class: object, cflags: list[str]) -> object:
        builds.append(loader.TASK_STORAGE_FLAG in cflags)
        if builds[-1]:
            raise ProbeError("The kernel did not accept probe's BPF programs (task storage).")
        return real_load(bpf_class, cflags)

    monkeypatch.setattr(loader, "_load", refuse_task_storage)
    with EventSource(ProbeOptions(), Stats()) as source:
        assert builds == [True, False]
        assert any("task storage refused" in note for note in source.notes)
    # Asked for by name, it is not quietly replaced.
    builds.clear()
    with pytest.raises(ProbeError, match="task storage"):
        EventSource(ProbeOptions(task_storage=True), Stats()).start()
    assert builds == [True]
