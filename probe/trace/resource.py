"""Describes each traced process as an OpenTelemetry resource, read from /proc.

A process keeps its resource until it exec()s another program, so detection
runs once per pid and image and is cached (bounded, least recently used
first out) until the process exits and the caller calls
`ResourceDetector.forget`. Images are numbered by the caller
(`probe.kernel.events.ConnOpen.image`): a launcher that makes a call and then
exec()s the real program keeps its own resource for its call, and the
program gets its own. On Kubernetes, the pod's
names come from `probe.trace.kubernetes.PodMetadata`.
"""

from __future__ import annotations

import os
import re
import socket
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote

from probe.trace.span import Attributes, Resource

if TYPE_CHECKING:  # imported by the daemon only: it loads the kubernetes client
    from probe.trace.kubernetes import PodMetadata

UNKNOWN_SERVICE: Final = "unknown_service"
# Images of one process kept described: an earlier image's connections mostly
# end at the exec (close-on-exec), and a process rarely execs more than once.
IMAGES_KEPT: Final = 4


class _Process:
    """What is cached of one pid: each image's resource, and the image it runs now."""

    def __init__(self, current: int) -> None:
        self.current = current
        self.resources: dict[int, Resource] = {}

    def remember(self, image: int, resource: Resource) -> None:
        self.resources[image] = resource
        if len(self.resources) > IMAGES_KEPT:  # the earliest other image goes
            del self.resources[min(i for i in self.resources if i != image)]


# A container runtime names the process's cgroup after the container's 64-hex
# id: "/docker/<id>", "docker-<id>.scope", "cri-containerd-<id>.scope",
# "crio-<id>.scope", "libpod-<id>.scope", "/kubepods/.../pod<uid>/<id>".
_CONTAINER_SEGMENT: Final = re.compile(r"(?:[\w.-]*?[-:])?([0-9a-f]{64})(?:\.scope)?")

# The kubelet names a pod's cgroup after the pod's UID: "pod<uid>" with the
# cgroupfs driver, "kubepods[-<qos>]-pod<uid>.slice" with the systemd one,
# which turns the UID's dashes into underscores. A static pod's UID is a hash
# without dashes.
_POD_SEGMENT: Final = re.compile(
    r"(?:kubepods(?:-[a-z]+)?-)?pod([0-9a-f]{8}(?:[-_]?[0-9a-f]{4}){3}[-_]?[0-9a-f]{12})(?:\.slice)?"
)


class ResourceDetector:
    """Builds and caches one `Resource` per pid; never raises for a vanished process."""

    def __init__(
        self,
        proc_root: str | os.PathLike[str] = "/proc",
        *,
        max_entries: int = 4096,
        hostname: str | None = None,
        extra_attributes: Mapping[str, str] | None = None,
        kubernetes: PodMetadata | None = None,
    ) -> None:
        self._proc = Path(proc_root)
        # The probe's own OTEL_RESOURCE_ATTRIBUTES (deployment.environment,
        # k8s.cluster.name...): under what is detected per process, so that
        # they never overwrite a process's own service.name.
        self._extra: Attributes = dict(extra_attributes or {})
        self._kubernetes = kubernetes
        self._max_entries = max_entries
        self._hostname = socket.gethostname() if hostname is None else hostname
        self._cache: OrderedDict[int, _Process] = OrderedDict()
        self._recent = -1  # the pid last moved or added to the end, if still there

    def detect(self, pid: int, comm: str = "", image: int | None = None) -> Resource:
        """The resource of ``pid`` as image number ``image`` (None: the image
        it runs now); ``comm``, the name the kernel saw, stands in for the
        executable's name when /proc no longer has the process.

        An earlier image is described from /proc only if it was not cached
        before the exec: /proc then shows the later one."""
        process = self._cache.get(pid)
        if process is not None:
            if image is None:
                image = process.current
            elif image > process.current:
                process.current = image
            resource = process.resources.get(image)
            if resource is not None:
                if pid != self._recent:  # every span asks: most ask for the last pid again
                    self._cache.move_to_end(pid)
                    self._recent = pid
                return resource
        attributes = self._read(pid, comm)
        resource = Resource(attributes)
        # Only a process still there to read is worth remembering; an exited
        # one is cheap to describe again and its pid may be reused. Nor one in
        # a pod the API server has not reported yet: it just started, and will
        # be described with its pod's names shortly.
        pod_pending = "k8s.pod.uid" in attributes and "k8s.pod.name" not in attributes
        if "process.executable.name" in attributes and not (self._kubernetes and pod_pending):
            if process is None:
                process = self._cache[pid] = _Process(image or 0)
                self._recent = pid
                if len(self._cache) > self._max_entries:
                    self._cache.popitem(last=False)
            process.remember(process.current if image is None else image, resource)
        return resource

    def executed(self, pid: int, image: int) -> None:
        """``pid`` exec()'d its image number ``image``: described afresh from now."""
        process = self._cache.get(pid)
        if process is not None:
            process.current = image

    def forget(self, pid: int) -> None:
        """Drop what is cached for ``pid``: the process exited and its pid may be reused."""
        self._cache.pop(pid, None)

    def _read(self, pid: int, comm: str = "") -> Attributes:
        base = self._proc / str(pid)
        exe_path = _read_link(base / "exe")
        exe_name = os.path.basename(exe_path) if exe_path else _read_text(base / "comm").strip()
        exe_name = exe_name or comm
        environ = _parse_environ(_read_bytes(base / "environ"))
        cmdline = _read_bytes(base / "cmdline").rstrip(b"\0")
        cgroup = _read_text(base / "cgroup")
        container_id = _container_id(cgroup)
        pod_uid = _pod_uid(cgroup)
        pod = self._kubernetes.lookup(pod_uid, container_id) if self._kubernetes else None
        service_name = _service_name(environ) or (pod and pod.service_name) or exe_name

        attributes: Attributes = {
            **self._extra,
            "service.name": service_name or UNKNOWN_SERVICE,
            "host.name": self._hostname,
            "process.pid": pid,
        }
        if exe_name:
            attributes["process.executable.name"] = exe_name
        if exe_path:
            attributes["process.executable.path"] = exe_path
        if cmdline:
            args = cmdline.split(b"\0")
            attributes["process.command_line"] = " ".join(_decode(arg) for arg in args)
        if container_id:
            attributes["container.id"] = container_id
        if pod_uid:
            attributes["k8s.pod.uid"] = pod_uid
        if pod:
            attributes.update(pod.attributes)
        return attributes


def _service_name(environ: dict[str, str]) -> str | None:
    """The name the process gave itself the OpenTelemetry way, if it did."""
    if name := environ.get("OTEL_SERVICE_NAME", "").strip():
        return name
    # OTEL_RESOURCE_ATTRIBUTES is "key=value,..." with percent-encoded values.
    for pair in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = pair.partition("=")
        if sep and key.strip() == "service.name" and (name := unquote(value.strip())):
            return name
    return None


def _container_id(cgroup: str) -> str | None:
    return _find_segment(cgroup, _CONTAINER_SEGMENT)


def _pod_uid(cgroup: str) -> str | None:
    uid = _find_segment(cgroup, _POD_SEGMENT)
    return uid.replace("_", "-") if uid else None


def _find_segment(cgroup: str, pattern: re.Pattern[str]) -> str | None:
    """The group of the deepest path segment that ``pattern`` matches."""
    # Lines are "hierarchy-id:controllers:path"; the id is usually the last segment.
    for line in cgroup.splitlines():
        path = line.split(":", 2)[-1]
        for segment in reversed(path.split("/")):
            if match := pattern.fullmatch(segment):
                return match.group(1)
    return None


def _parse_environ(data: bytes) -> dict[str, str]:
    environ: dict[str, str] = {}
    for entry in data.split(b"\0"):
        key, sep, value = entry.partition(b"=")
        if sep:
            environ[_decode(key)] = _decode(value)
    return environ


def _decode(data: bytes) -> str:
    # Exporters must be able to encode every attribute, so no surrogates.
    return data.decode("utf-8", errors="replace")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # gone, a kernel thread, or not ours to read
        return b""


def _read_text(path: Path) -> str:
    return _decode(_read_bytes(path))


def _read_link(path: Path) -> str:
    try:
        target = os.readlink(path)
    except OSError:
        return ""
    # The binary was replaced or removed since the process started it.
    return target.removesuffix(" (deleted)")
