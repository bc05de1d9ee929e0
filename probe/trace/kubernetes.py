"""Kubernetes metadata for the resources of traced processes.

`PodMetadata` owns a cache of this node's pods, kept current by a list-then-
watch on the API server in a daemon thread (read-only: list and watch pods,
``spec.nodeName=<K8S_NODE_NAME>`` only). `ResourceDetector` asks it, once per
new process, for the pod and container behind the pod UID and container id
that the process's cgroup names; that lookup is plain dict reads and never
waits for the API server.

The ``kubernetes`` client is optional and imported only when the cache is
enabled: outside a cluster the probe runs without it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from probe.trace.span import Attributes

if TYPE_CHECKING:
    from kubernetes.client import ApiClient, CoreV1Api, V1Pod

log = logging.getLogger(__name__)

NODE_NAME_VARIABLE = "K8S_NODE_NAME"  # set from the downward API (spec.nodeName)

# A watch ends after this long on the server, and is resumed from its last
# resourceVersion; the client gives up reading a little later, so that a
# connection that died silently is noticed.
_WATCH_TIMEOUT_S = 300
_READ_TIMEOUT_S = _WATCH_TIMEOUT_S + 30
_CONNECT_TIMEOUT_S = 10
_RETRY_MIN_S = 1.0
_RETRY_MAX_S = 60.0

# The kubelet runs a static pod under its config hash, which the API server's
# mirror of it carries here (its own metadata.uid differs).
_MIRROR_ANNOTATION = "kubernetes.io/config.mirror"

# A CronJob names its Jobs "<cronjob>-<scheduled time in minutes since the epoch>".
_CRONJOB_JOB = re.compile(r"(.+)-\d{8,}")

# Owner kinds named as they are; ReplicaSet and Job need more care (below).
_OWNER_ATTRIBUTES = {
    "StatefulSet": "k8s.statefulset.name",
    "DaemonSet": "k8s.daemonset.name",
}

# Which workload names the service, best first; then the labels, then the container.
_WORKLOAD_ATTRIBUTES = (
    "k8s.deployment.name",
    "k8s.statefulset.name",
    "k8s.daemonset.name",
    "k8s.cronjob.name",
    "k8s.job.name",
    "k8s.replicaset.name",
)
_NAME_LABELS = ("app.kubernetes.io/name", "app")


@dataclass(frozen=True, slots=True)
class PodContainer:
    """What the API server says about the container a process runs in."""

    attributes: Attributes  # k8s.pod.*, k8s.namespace.name, k8s.node.name, workload, container
    service_name: str | None  # the workload's name, else the pod's name label, else the container's


@dataclass(frozen=True, slots=True)
class _Pod:
    attributes: Attributes
    service_name: str | None
    containers: dict[str, str]  # container id (as in cgroups) -> container name


class PodMetadata:
    """This node's pods, by pod UID and by container id, updated from the API server."""

    def __init__(self, node_name: str, api_client: ApiClient | None = None) -> None:
        """``api_client``: where `start` watches from; without one, only `apply` feeds the cache."""
        self.node_name = node_name
        self._api_client = api_client
        # Written by the watch thread only; read by the pipeline without a lock,
        # which single dict reads and writes allow.
        self._pods: dict[str, _Pod] = {}  # pod UID as in cgroups -> pod
        self._pod_of_container: dict[str, str] = {}  # container id -> pod UID as in cgroups
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: Any = None  # the kubernetes.watch.Watch in progress, to interrupt it

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> PodMetadata | None:
        """A cache for this node's pods when running in a pod, else None (and one log line)."""
        node_name = environ.get(NODE_NAME_VARIABLE, "").strip()
        if not node_name:
            log.info("kubernetes: %s is not set: no pod metadata", NODE_NAME_VARIABLE)
            return None
        try:
            from kubernetes import client, config
        except ImportError:
            log.info("kubernetes: the kubernetes Python client is not installed: no pod metadata")
            return None
        configuration = client.Configuration()
        try:
            # The pod's service account, as KUBERNETES_SERVICE_HOST and its files say.
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException as error:
            log.info("kubernetes: no in-cluster configuration (%s): no pod metadata", error)
            return None
        return cls(node_name, client.ApiClient(configuration))

    def lookup(self, pod_uid: str | None, container_id: str | None) -> PodContainer | None:
        """The pod and container a process's cgroup names, once the API server has told.

        None while the pod, or the container within it, is not known yet (it
        just started): the caller keeps what the cgroup says and asks again later.
        """
        # By container id first: a cgroup layout may hide the pod UID, never the container.
        key = self._pod_of_container.get(container_id, pod_uid) if container_id else pod_uid
        pod = self._pods.get(key) if key else None
        if pod is None:
            return None
        if container_id is None:
            return PodContainer(pod.attributes, pod.service_name)
        name = pod.containers.get(container_id)
        if name is None:
            return None
        attributes = {**pod.attributes, "k8s.container.name": name}
        return PodContainer(attributes, pod.service_name or name)

    def apply(self, event_type: str, pod: V1Pod) -> None:
        """Apply one watch event: ADDED, MODIFIED or DELETED (others are ignored)."""
        if event_type not in ("ADDED", "MODIFIED", "DELETED"):
            return
        key = _cgroup_uid(pod)
        if event_type == "DELETED":
            old, new = self._pods.pop(key, None), None
        else:
            old, new = self._pods.get(key), self._describe(pod)
            self._pods[key] = new
            for container_id in new.containers:
                self._pod_of_container[container_id] = key
        if old is not None:
            kept = new.containers if new is not None else {}
            for container_id in old.containers.keys() - kept.keys():
                self._pod_of_container.pop(container_id, None)

    def start(self) -> None:
        """Watch this node's pods in a daemon thread until `stop`."""
        if self._api_client is None:
            raise ValueError("PodMetadata.start needs an api_client")
        log.info("kubernetes: watching the pods of node %s", self.node_name)
        self._thread = threading.Thread(target=self._run, name="probe-k8s-pods", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop watching; waits up to ``timeout`` seconds for the thread to end."""
        self._stopping.set()
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            # Watch.stop shuts the stream's socket down to end a blocked read;
            # again until it lands, as a watch still being opened has no socket yet.
            if (watch := self._watch) is not None:
                watch.stop()
            self._thread.join(0.05)

    def _run(self) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        api = client.CoreV1Api(self._api_client)
        resource_version: str | None = None
        delay = _RETRY_MIN_S
        while not self._stopping.is_set():
            try:
                if resource_version is None:
                    resource_version = self._list(api)
                resource_version = self._watch_from(api, resource_version)
                delay = _RETRY_MIN_S
            except ApiException as error:
                if error.status == 410:  # Gone: the version is too old to watch from
                    resource_version = None
                    continue
                delay = self._back_off(f"{error.status} {error.reason}", delay)
            except Exception as error:  # network, TLS, decoding: the watch must outlive them
                delay = self._back_off(str(error) or type(error).__name__, delay)

    def _list(self, api: CoreV1Api) -> str:
        pods = api.list_pod_for_all_namespaces(
            field_selector=self._field_selector(),
            _request_timeout=(_CONNECT_TIMEOUT_S, _READ_TIMEOUT_S),
        )
        self._replace(pods.items)
        return pods.metadata.resource_version

    def _watch_from(self, api: CoreV1Api, resource_version: str) -> str:
        """Apply events until the server ends the watch; returns the version reached."""
        from kubernetes import watch

        self._watch = watch.Watch()
        events = self._watch.stream(
            api.list_pod_for_all_namespaces,
            field_selector=self._field_selector(),
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=_WATCH_TIMEOUT_S,
            _request_timeout=(_CONNECT_TIMEOUT_S, _READ_TIMEOUT_S),
        )
        for event in events:
            self.apply(event["type"], event["object"])
        return self._watch.resource_version or resource_version

    def _back_off(self, reason: str, delay: float) -> float:
        if not self._stopping.is_set():
            log.warning(
                "kubernetes: cannot watch the pods of node %s (%s); retrying in %.0fs",
                self.node_name, reason, delay,
            )  # fmt: skip
            self._stopping.wait(delay)
        return min(delay * 2, _RETRY_MAX_S)

    def _field_selector(self) -> str:
        return f"spec.nodeName={self.node_name}"

    def _replace(self, pods: Iterable[V1Pod]) -> None:
        # A fresh list replaces everything: pods deleted while no watch ran go.
        described = {_cgroup_uid(pod): self._describe(pod) for pod in pods}
        self._pods = described
        self._pod_of_container = {
            container_id: key for key, pod in described.items() for container_id in pod.containers
        }

    def _describe(self, pod: V1Pod) -> _Pod:
        meta = pod.metadata
        labels = meta.labels or {}
        attributes: Attributes = {
            "k8s.pod.name": meta.name,
            "k8s.pod.uid": meta.uid,
            "k8s.namespace.name": meta.namespace,
            "k8s.node.name": self.node_name,
            **_workload(meta.owner_references or (), labels),
        }
        return _Pod(attributes, _service_name(attributes, labels), _containers(pod))


def _cgroup_uid(pod: V1Pod) -> str:
    return (pod.metadata.annotations or {}).get(_MIRROR_ANNOTATION) or pod.metadata.uid


def _workload(owners: Iterable[Any], labels: Mapping[str, str]) -> Attributes:
    """The attributes that name the pod's controller, from its owner references."""
    owner = next((owner for owner in owners if owner.controller), None)
    if owner is None:
        return {}
    if owner.kind == "ReplicaSet":
        attributes: Attributes = {"k8s.replicaset.name": owner.name}
        # A Deployment names its ReplicaSets "<deployment>-<pod-template-hash>".
        suffix = "-" + labels.get("pod-template-hash", "")
        if len(suffix) > 1 and owner.name.endswith(suffix):
            attributes["k8s.deployment.name"] = owner.name.removesuffix(suffix)
        return attributes
    if owner.kind == "Job":
        attributes = {"k8s.job.name": owner.name}
        if match := _CRONJOB_JOB.fullmatch(owner.name):
            attributes["k8s.cronjob.name"] = match.group(1)
        return attributes
    if attribute := _OWNER_ATTRIBUTES.get(owner.kind):
        return {attribute: owner.name}
    return {}


def _service_name(attributes: Attributes, labels: Mapping[str, str]) -> str | None:
    for key in _WORKLOAD_ATTRIBUTES:
        if name := attributes.get(key):
            return str(name)
    return next((labels[key] for key in _NAME_LABELS if labels.get(key)), None)


def _containers(pod: V1Pod) -> dict[str, str]:
    """Container id (the runtime's, as cgroups name it) -> container name."""
    status = pod.status
    if status is None:
        return {}
    statuses = [
        *(status.init_container_statuses or ()),
        *(status.container_statuses or ()),
        *(status.ephemeral_container_statuses or ()),
    ]
    # containerID is "<runtime>://<id>": "containerd://3f1c...", "cri-o://...".
    return {
        container.container_id.rpartition("://")[2]: container.name
        for container in statuses
        if container.container_id
    }
