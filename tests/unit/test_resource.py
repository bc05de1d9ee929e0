"""ResourceDetector against a fake /proc tree."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from probe.trace.resource import IMAGES_KEPT, ResourceDetector

HEX_ID = "3f1c" * 16  # 64 hex digits
OTHER_HEX_ID = "a0b1" * 16


def make_process(
    proc: Path,
    pid: int,
    *,
    exe: str | None = "/usr/sbin/nginx",
    comm: str = "nginx",
    cmdline: list[bytes] | None = None,
    environ: dict[bytes, bytes] | None = None,
    cgroup: str = "0::/user.slice/user-1000.slice/session-2.scope\n",
) -> Path:
    base = proc / str(pid)
    base.mkdir(parents=True)
    if exe is not None:
        os.symlink(exe, base / "exe")  # the target need not exist, as with readlink
    (base / "comm").write_text(comm + "\n")
    args = [b"nginx", b"-g", b"daemon off;"] if cmdline is None else cmdline
    (base / "cmdline").write_bytes(b"".join(arg + b"\0" for arg in args))
    env = {b"PATH": b"/usr/bin"} if environ is None else environ
    (base / "environ").write_bytes(b"".join(k + b"=" + v + b"\0" for k, v in env.items()))
    (base / "cgroup").write_text(cgroup)
    return base


@pytest.fixture
def detector(tmp_path) -> ResourceDetector:
    return ResourceDetector(tmp_path, hostname="node-1")


def test_plain_executable(tmp_path, detector):
    make_process(tmp_path, 100)

    assert detector.detect(100).attributes == {
        "service.name": "nginx",
        "host.name": "node-1",
        "process.pid": 100,
        "process.executable.name": "nginx",
        "process.executable.path": "/usr/sbin/nginx",
        "process.command_line": "nginx -g daemon off;",
    }


def test_otel_service_name_wins(tmp_path, detector):
    make_process(
        tmp_path,
        101,
        environ={
            b"OTEL_RESOURCE_ATTRIBUTES": b"service.name=from-attrs",
            b"OTEL_SERVICE_NAME": b"checkout",
        },
    )

    assert detector.detect(101).attributes["service.name"] == "checkout"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"deployment.environment=prod,service.name=billing", "billing"),
        (b" service.name = my%20api , team=core", "my api"),
        (b"team=core", "nginx"),
        (b"service.name=", "nginx"),
    ],
)
def test_service_name_from_resource_attributes(tmp_path, detector, value, expected):
    make_process(tmp_path, 102, environ={b"OTEL_RESOURCE_ATTRIBUTES": value})

    assert detector.detect(102).attributes["service.name"] == expected


def test_deleted_executable_and_comm_fallback(tmp_path, detector):
    make_process(tmp_path, 103, exe="/opt/app/server (deleted)")
    make_process(tmp_path, 104, exe=None, comm="kworker/0:1", cmdline=[])

    assert detector.detect(103).attributes["process.executable.name"] == "server"
    assert detector.detect(103).attributes["process.executable.path"] == "/opt/app/server"
    assert detector.detect(104).attributes == {
        "service.name": "kworker/0:1",
        "host.name": "node-1",
        "process.pid": 104,
        "process.executable.name": "kworker/0:1",
    }


def test_non_utf8_bytes_are_replaced(tmp_path, detector):
    make_process(
        tmp_path, 105, cmdline=[b"app", b"caf\xe9"], environ={b"OTEL_SERVICE_NAME": b"\xff"}
    )

    attributes = detector.detect(105).attributes
    assert attributes["process.command_line"] == "app caf\ufffd"
    assert attributes["service.name"] == "\ufffd"


@pytest.mark.parametrize(
    "cgroup",
    [
        # cgroup v1 under Docker
        f"12:memory:/docker/{HEX_ID}\n11:cpu,cpuacct:/docker/{HEX_ID}\n",
        # cgroup v2 under Docker with the systemd driver
        f"0::/system.slice/docker-{HEX_ID}.scope\n",
        # Kubernetes with containerd, systemd driver
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c3d4e_5f60_"
        f"7182_93a4_b5c6d7e8f901.slice/cri-containerd-{HEX_ID}.scope\n",
        # Kubernetes, cgroupfs driver
        f"4:pids:/kubepods/besteffort/pod1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901/{HEX_ID}\n",
        # CRI-O and Podman
        f"0::/kubepods.slice/crio-{HEX_ID}.scope\n",
        f"0::/machine.slice/libpod-{HEX_ID}.scope/container\n",
    ],
)
def test_container_id(tmp_path, detector, cgroup):
    make_process(tmp_path, 106, cgroup=cgroup)

    assert detector.detect(106).attributes["container.id"] == HEX_ID


def test_no_container_id_outside_containers(tmp_path, detector):
    make_process(tmp_path, 107, cgroup=f"0::/user.slice/app-{HEX_ID[:40]}.scope\n")

    assert "container.id" not in detector.detect(107).attributes


def test_vanished_process(detector):
    assert detector.detect(999).attributes == {
        "service.name": "unknown_service",
        "host.name": "node-1",
        "process.pid": 999,
    }


def test_vanished_process_named_by_the_kernel(detector):
    assert detector.detect(998, comm="curl").attributes == {
        "service.name": "curl",
        "host.name": "node-1",
        "process.pid": 998,
        "process.executable.name": "curl",
    }


def test_cached_after_process_exits_until_forgotten(tmp_path, detector):
    base = make_process(tmp_path, 108, environ={b"OTEL_SERVICE_NAME": b"cart"})
    first = detector.detect(108)
    for child in base.iterdir():
        child.unlink()
    base.rmdir()

    assert detector.detect(108) is first
    detector.forget(108)
    assert detector.detect(108).attributes["service.name"] == "unknown_service"


def test_vanished_process_is_not_cached(tmp_path, detector):
    detector.detect(109)
    make_process(tmp_path, 109)

    assert detector.detect(109).attributes["service.name"] == "nginx"


def test_cache_is_bounded_least_recently_used(tmp_path):
    detector = ResourceDetector(tmp_path, max_entries=2, hostname="node-1")
    for pid in (1, 2, 3):
        make_process(tmp_path, pid, environ={b"OTEL_SERVICE_NAME": f"svc-{pid}".encode()})
    one = detector.detect(1)
    detector.detect(2)
    detector.detect(1)  # 1 is now more recent than 2
    detector.detect(3)  # evicts 2
    for pid in (1, 2, 3):
        (tmp_path / str(pid) / "environ").write_bytes(b"OTEL_SERVICE_NAME=changed\0")

    assert detector.detect(1) is one
    assert detector.detect(3).attributes["service.name"] == "svc-3"
    assert detector.detect(2).attributes["service.name"] == "changed"


def test_cache_recency_follows_every_detection(tmp_path):
    detector = ResourceDetector(tmp_path, max_entries=2, hostname="node-1")
    for pid in (1, 2, 3):
        make_process(tmp_path, pid)
    for pid in (1, 2, 1):
        detector.detect(pid)
    two = detector.detect(2)
    detector.detect(2)  # 2 last asked for, twice: 1 is the older
    detector.detect(3)  # evicts 1
    for pid in (1, 2):
        (tmp_path / str(pid) / "environ").write_bytes(b"OTEL_SERVICE_NAME=changed\0")

    assert detector.detect(2) is two
    assert detector.detect(1).attributes["service.name"] == "changed"


def test_real_process_reads_as_expected():
    attributes = ResourceDetector(hostname="node-1").detect(os.getpid()).attributes

    assert attributes["process.pid"] == os.getpid()
    assert attributes["process.executable.path"] == os.path.realpath(sys.executable)
    assert attributes["process.executable.name"] == os.path.basename(
        os.path.realpath(sys.executable)
    )
    assert attributes["process.command_line"] == " ".join(sys.orig_argv)


def test_each_image_of_a_process_keeps_its_own_resource(tmp_path, detector):
    """A launcher makes a call, then exec()s the real program: the launcher's
    connections keep its resource, the program's get the program's."""
    base = make_process(tmp_path, 110, exe="/usr/bin/vault-env", comm="vault-env")
    launcher = detector.detect(110, image=0)
    (base / "exe").unlink()
    os.symlink("/usr/bin/shop", base / "exe")
    (base / "environ").write_bytes(b"OTEL_SERVICE_NAME=shop\0")

    assert detector.detect(110) is launcher  # not told of the exec yet
    detector.executed(110, 1)
    program = detector.detect(110)
    assert program.attributes["service.name"] == "shop"
    assert detector.detect(110, image=1) is program
    assert detector.detect(110, image=0) is launcher
    assert launcher.attributes["service.name"] == "vault-env"

    detector.forget(110)  # every image goes
    for child in base.iterdir():
        child.unlink()
    base.rmdir()
    for image in (0, 1):
        assert detector.detect(110, image=image).attributes["service.name"] == "unknown_service"


def test_a_process_keeps_a_few_images_described(tmp_path, detector):
    make_process(tmp_path, 111)
    first = [detector.detect(111, image=image) for image in range(IMAGES_KEPT)]
    assert all(detector.detect(111, image=i) is first[i] for i in range(IMAGES_KEPT))
    latest = detector.detect(111, image=IMAGES_KEPT)  # one more: the earliest goes
    assert detector.detect(111, image=1) is first[1]
    again = detector.detect(111, image=0)
    assert again is not first[0]
    assert detector.detect(111, image=0) is again  # described again, and kept
    assert detector.detect(111) is latest  # the latest image seen runs now
