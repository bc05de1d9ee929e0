"""The compiler flags that ProbeOptions hands to bcc."""

from __future__ import annotations

import pytest

from probe.kernel import features
from probe.kernel.loader import TASK_STORAGE_FLAG, ProbeOptions


@pytest.mark.parametrize("available", [True, False])
def test_task_storage_where_the_kernel_has_it(monkeypatch, available):
    monkeypatch.setattr(features, "task_storage_available", lambda: available)
    assert (TASK_STORAGE_FLAG in ProbeOptions().cflags()) is available


@pytest.mark.parametrize("available", [True, False])
def test_task_storage_asked_for_by_name(monkeypatch, available):
    monkeypatch.setattr(features, "task_storage_available", lambda: available)
    assert TASK_STORAGE_FLAG in ProbeOptions(task_storage=True).cflags()
    assert TASK_STORAGE_FLAG not in ProbeOptions(task_storage=False).cflags()


def test_task_storage_needs_linux_5_12_and_btf(monkeypatch):
    monkeypatch.setattr(features, "kernel_version", lambda: (5, 11))
    assert not features.task_storage_available()
    monkeypatch.setattr(features, "kernel_version", lambda: (6, 1))
    assert features.task_storage_available() is features.BTF.exists()


def test_the_exchange_rate_is_compiled_in_only_when_limited():
    assert not any("EXCHANGE_RATE" in flag for flag in ProbeOptions().cflags())
    assert "-DPROBE_EXCHANGE_RATE=2500" in ProbeOptions(exchange_rate=2500).cflags()
    with pytest.raises(features.ProbeError, match="exchange rate -1"):
        ProbeOptions(exchange_rate=-1).cflags()


@pytest.mark.parametrize(
    ("release", "version"),
    [
        ("6.18.44-fc-v657", (6, 18)),
        ("6.1-rc3", (6, 1)),
        ("5.4.0-150-generic", (5, 4)),
        ("x", (0, 0)),
    ],
)
def test_kernel_version(release, version):
    assert features.kernel_version(release) == version
