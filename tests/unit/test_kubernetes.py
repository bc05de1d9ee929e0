"""PodMetadata fed by watch events, ResourceDetector on Kubernetes cgroups, and
the list+watch loop against a small local server that speaks the API's protocol."""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from kubernetes.client import (
    ApiClient,
    Configuration,
    V1ContainerStatus,
    V1ObjectMeta,
    V1OwnerReference,
    V1Pod,
    V1PodStatus,
)

from probe.trace.kubernetes import PodContainer, PodMetadata
from probe.trace.resource import ResourceDetector

NODE = "node-1"
UID = "1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901"
OTHER_UID = "9f8e7d6c-5b4a-3928-1706-f5e4d3c2b1a0"
STATIC_HASH = "8b4ae5a5d6d8a4a1c0a2ffab5d2b7ad1"  # a static pod's UID in its cgroup
CID = "3f1c" * 16  # container ids: 64 hex digits
CID_2 = "a0b1" * 16
CID_3 = "c2d3" * 16


def make_pod(
    name: str,
    uid: str = UID,
    *,
    owner: tuple[str, str] | None = None,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    containers: dict[str, str | None] | None = None,
    init_containers: dict[str, str | None] | None = None,
    resource_version: str = "1",
) -> V1Pod:
    """A pod on NODE; ``owner`` is (kind, name); ``containers`` maps name -> container id."""
    owners = None
    if owner is not None:
        kind, owner_name = owner
        owners = [
            V1OwnerReference(
                api_version="apps/v1", kind=kind, name=owner_name, uid=OTHER_UID, controller=True
            )
        ]
    return V1Pod(
        api_version="v1",
        kind="Pod",
        metadata=V1ObjectMeta(
            name=name,
            namespace="shop",
            uid=uid,
            labels=labels,
            annotations=annotations,
            owner_references=owners,
            resource_version=resource_version,
        ),
        status=V1PodStatus(
            container_statuses=_statuses({"app": CID} if containers is None else containers),
            init_container_statuses=_statuses(init_containers or {}),
        ),
    )


def _statuses(containers: dict[str, str | None]) -> list[V1ContainerStatus]:
    return [
        V1ContainerStatus(
            name=name,
            container_id=f"containerd://{container_id}" if container_id else None,
            image="registry.example/app:1",
            image_id="",
            ready=container_id is not None,
            restart_count=0,
        )
        for name, container_id in containers.items()
    ]


def pod_attributes(name: str, uid: str = UID, **extra: str) -> dict[str, str]:
    return {
        "k8s.pod.name": name,
        "k8s.pod.uid": uid,
        "k8s.namespace.name": "shop",
        "k8s.node.name": NODE,
        **extra,
    }


@pytest.fixture
def pods() -> PodMetadata:
    return PodMetadata(NODE)


def test_deployment_pod(pods):
    pods.apply(
        "ADDED",
        make_pod(
            "checkout-7d9f8b6c5-x2x4q",
            owner=("ReplicaSet", "checkout-7d9f8b6c5"),
            labels={"pod-template-hash": "7d9f8b6c5", "app.kubernetes.io/name": "shop-ui"},
        ),
    )

    assert pods.lookup(UID, CID) == PodContainer(
        pod_attributes(
            "checkout-7d9f8b6c5-x2x4q",
            **{
                "k8s.replicaset.name": "checkout-7d9f8b6c5",
                "k8s.deployment.name": "checkout",
                "k8s.container.name": "app",
            },
        ),
        "checkout",
    )


def test_replicaset_without_template_hash_names_no_deployment(pods):
    pods.apply("ADDED", make_pod("cache-abcde", owner=("ReplicaSet", "cache")))

    assert pods.lookup(UID, CID) == PodContainer(
        pod_attributes(
            "cache-abcde", **{"k8s.replicaset.name": "cache", "k8s.container.name": "app"}
        ),
        "cache",
    )


@pytest.mark.parametrize(
    ("kind", "attribute"),
    [("StatefulSet", "k8s.statefulset.name"), ("DaemonSet", "k8s.daemonset.name")],
)
def test_statefulset_and_daemonset_pods(pods, kind, attribute):
    pods.apply(
        "ADDED",
        make_pod(
            "postgres-0",
            owner=(kind, "postgres"),
            containers={"postgres": CID, "exporter": CID_2},
            init_containers={"init-permissions": CID_3},
        ),
    )

    assert pods.lookup(UID, CID) == PodContainer(
        pod_attributes("postgres-0", **{attribute: "postgres", "k8s.container.name": "postgres"}),
        "postgres",
    )
    assert pods.lookup(UID, CID_2).attributes["k8s.container.name"] == "exporter"
    assert pods.lookup(UID, CID_3).attributes["k8s.container.name"] == "init-permissions"


@pytest.mark.parametrize(
    ("job", "expected", "service_name"),
    [
        ("db-migrate", {"k8s.job.name": "db-migrate"}, "db-migrate"),
        (
            "nightly-report-28735620",
            {"k8s.job.name": "nightly-report-28735620", "k8s.cronjob.name": "nightly-report"},
            "nightly-report",
        ),
    ],
)
def test_job_pods(pods, job, expected, service_name):
    pods.apply("ADDED", make_pod(f"{job}-6sl9k", owner=("Job", job)))

    assert pods.lookup(UID, CID) == PodContainer(
        pod_attributes(f"{job}-6sl9k", **expected, **{"k8s.container.name": "app"}), service_name
    )


@pytest.mark.parametrize(
    ("labels", "service_name"),
    [
        ({"app.kubernetes.io/name": "debug-shell", "app": "other"}, "debug-shell"),
        ({"app": "debug"}, "debug"),
        ({"app": ""}, "app"),  # an empty label names nothing: the container does
        (None, "app"),
    ],
)
def test_bare_pod(pods, labels, service_name):
    pods.apply("ADDED", make_pod("debug", labels=labels))

    assert pods.lookup(UID, CID) == PodContainer(
        pod_attributes("debug", **{"k8s.container.name": "app"}), service_name
    )


def test_lookup_by_container_id_or_pod_uid_alone(pods):
    pods.apply("ADDED", make_pod("web", owner=("StatefulSet", "web")))

    assert pods.lookup(None, CID) == pods.lookup(UID, CID)
    assert pods.lookup(UID, None) == PodContainer(
        pod_attributes("web", **{"k8s.statefulset.name": "web"}), "web"
    )
    assert pods.lookup(None, None) is None


def test_unknown_pod_or_container_is_none(pods):
    pods.apply("ADDED", make_pod("web", containers={"app": CID, "sidecar": None}))

    assert pods.lookup(OTHER_UID, CID_2) is None
    assert pods.lookup(UID, CID_2) is None  # the sidecar has no container id yet


def test_modified_and_deleted(pods):
    pods.apply("ADDED", make_pod("web", labels={"app": "web"}))
    # The container restarted under a new id and the label changed.
    pods.apply("MODIFIED", make_pod("web", labels={"app": "web-v2"}, containers={"app": CID_2}))

    assert pods.lookup(UID, CID) is None
    assert pods.lookup(None, CID) is None
    assert pods.lookup(UID, CID_2).service_name == "web-v2"

    pods.apply("DELETED", make_pod("web", containers={"app": CID_2}))

    assert pods.lookup(UID, CID_2) is None
    assert pods.lookup(None, CID_2) is None
    assert pods.lookup(UID, None) is None


def test_other_events_are_ignored(pods):
    pods.apply("ADDED", make_pod("web"))
    pods.apply("BOOKMARK", {"metadata": {"resourceVersion": "12"}})

    assert pods.lookup(UID, CID).attributes["k8s.pod.name"] == "web"


def test_static_pod_is_found_by_its_config_hash(pods):
    pods.apply(
        "ADDED",
        make_pod(
            "kube-apiserver-node-1",
            annotations={"kubernetes.io/config.mirror": STATIC_HASH},
            containers={"kube-apiserver": CID},
        ),
    )

    assert pods.lookup(STATIC_HASH, None).attributes["k8s.pod.uid"] == UID
    assert pods.lookup(STATIC_HASH, CID).service_name == "kube-apiserver"


# ResourceDetector on Kubernetes: a fake /proc holding what it reads.


def make_process(proc: Path, pid: int, cgroup: str, environ: bytes = b"PATH=/bin\0") -> None:
    base = proc / str(pid)
    base.mkdir(parents=True)
    os.symlink("/usr/local/bin/server", base / "exe")
    (base / "environ").write_bytes(environ)
    (base / "cgroup").write_text(cgroup)


SYSTEMD_CGROUP = (
    "0::/kubepods.slice/kubepods-burstable.slice/"
    f"kubepods-burstable-pod{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope\n"
)
CGROUPFS_CGROUP = (
    f"12:memory:/kubepods/besteffort/pod{UID}/{CID}\n4:pids:/kubepods/besteffort/pod{UID}/{CID}\n"
)


@pytest.mark.parametrize(
    "cgroup",
    [
        SYSTEMD_CGROUP,
        CGROUPFS_CGROUP,
        # Guaranteed QoS has no QoS slice.
        f"0::/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-{CID}.scope\n",
        # Seen from a probe in its own cgroup namespace.
        f"0::/../../kubepods-besteffort-pod{UID.replace('-', '_')}.slice/{CID}\n",
    ],
)
def test_pod_uid_and_container_id_from_cgroup(tmp_path, cgroup):
    make_process(tmp_path, 200, cgroup)

    attributes = ResourceDetector(tmp_path, hostname=NODE).detect(200).attributes

    assert (attributes["k8s.pod.uid"], attributes["container.id"]) == (UID, CID)


def test_static_pod_uid_from_cgroup(tmp_path):
    make_process(
        tmp_path, 201, f"0::/kubepods.slice/kubepods-burstable-pod{STATIC_HASH}.slice/{CID}\n"
    )

    assert ResourceDetector(tmp_path).detect(201).attributes["k8s.pod.uid"] == STATIC_HASH


def test_no_pod_uid_outside_kubernetes(tmp_path):
    make_process(tmp_path, 202, f"0::/system.slice/docker-{CID}.scope\n")

    assert "k8s.pod.uid" not in ResourceDetector(tmp_path).detect(202).attributes


def test_detector_adds_pod_metadata_and_names_the_service(tmp_path, pods):
    pods.apply("ADDED", make_pod("api-0", owner=("StatefulSet", "api")))
    make_process(tmp_path, 203, SYSTEMD_CGROUP)

    assert ResourceDetector(tmp_path, hostname=NODE, kubernetes=pods).detect(203).attributes == {
        "service.name": "api",
        "host.name": NODE,
        "process.pid": 203,
        "process.executable.name": "server",
        "process.executable.path": "/usr/local/bin/server",
        "container.id": CID,
        **pod_attributes("api-0", **{"k8s.statefulset.name": "api", "k8s.container.name": "app"}),
    }


def test_otel_service_name_wins_over_kubernetes(tmp_path, pods):
    pods.apply("ADDED", make_pod("api-0", owner=("StatefulSet", "api")))
    make_process(tmp_path, 204, SYSTEMD_CGROUP, environ=b"OTEL_SERVICE_NAME=orders\0")

    attributes = ResourceDetector(tmp_path, kubernetes=pods).detect(204).attributes

    assert (attributes["service.name"], attributes["k8s.pod.name"]) == ("orders", "api-0")


def test_process_in_an_unknown_pod_is_described_again(tmp_path, pods):
    make_process(tmp_path, 205, SYSTEMD_CGROUP)
    detector = ResourceDetector(tmp_path, kubernetes=pods)
    early = detector.detect(205)
    pods.apply("ADDED", make_pod("api-0", owner=("StatefulSet", "api")))
    later = detector.detect(205)

    assert early.attributes["service.name"] == "server"
    assert "k8s.pod.name" not in early.attributes
    assert early.attributes["k8s.pod.uid"] == UID
    assert later.attributes["service.name"] == "api"
    assert detector.detect(205) is later  # known now: cached


# The list+watch loop against a local server speaking the API's protocol.


class FakeApiServer:
    """Answers /api/v1/pods requests in order from a script and records their queries.

    Each answer is ("list", body), ("watch", [events]) streamed as JSON lines
    in chunks, or ("hold", None): a watch that stays open until `release`.
    """

    def __init__(self, script: list[tuple[str, object]]) -> None:
        self.script: queue.Queue = queue.Queue()
        for step in script:
            self.script.put(step)
        self.queries: list[dict[str, str]] = []
        self.holding = threading.Event()
        self.released = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                assert url.path == "/api/v1/pods"
                server.queries.append({k: v[0] for k, v in parse_qs(url.query).items()})
                kind, body = server.script.get_nowait()
                if kind == "list":
                    data = json.dumps(body).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for event in body or ():
                    self._chunk(json.dumps(event).encode() + b"\n")
                if kind == "hold":
                    server.holding.set()
                    server.released.wait(10)
                self._chunk(b"")

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"


def to_json(pod: V1Pod) -> dict:
    return ApiClient().sanitize_for_serialization(pod)


def pod_list(version: str, *items: V1Pod) -> dict:
    return {
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": version},
        "items": [to_json(pod) for pod in items],
    }


def test_watch_lists_then_watches_this_nodes_pods():
    uid_a, uid_b, uid_c, uid_d = (f"{n}b2c3d4e-5f60-7182-93a4-b5c6d7e8f901" for n in "abcd")
    cid_a, cid_b, cid_c, cid_d, cid_b2 = (n * 64 for n in "abcde")
    pod_a = make_pod("a", uid_a, labels={"app": "a"}, containers={"app": cid_a})
    pod_b = make_pod("b", uid_b, labels={"app": "b"}, containers={"app": cid_b})
    pod_c = make_pod(
        "c", uid_c, labels={"app": "c"}, containers={"app": cid_c}, resource_version="101"
    )
    pod_d = make_pod("d", uid_d, labels={"app": "d"}, containers={"app": cid_d})
    restarted_b = make_pod(
        "b", uid_b, labels={"app": "b2"}, containers={"app": cid_b2}, resource_version="201"
    )
    gone = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}
    bookmark = {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": "205"}}
    script = [
        ("list", pod_list("100", pod_a, pod_b)),
        ("watch", [
            {"type": "ADDED", "object": to_json(pod_c)},
            {"type": "DELETED", "object": to_json(make_pod("a", uid_a, resource_version="102"))},
            {"type": "ERROR", "object": gone},
        ]),
        # Listed again after 410 Gone: c went while nothing watched, d came.
        ("list", pod_list("200", pod_b, pod_d)),
        ("watch", [
            {"type": "MODIFIED", "object": to_json(restarted_b)},
            {"type": "BOOKMARK", "object": bookmark},
        ]),  # the server ends this watch (its timeout); the next resumes at the bookmark
        ("hold", None),
    ]  # fmt: skip

    with FakeApiServer(script) as server:
        pods = PodMetadata(NODE, ApiClient(Configuration(host=server.url)))
        pods.start()
        try:
            assert server.holding.wait(10)
            names = {
                cid: (found.service_name if (found := pods.lookup(None, cid)) else None)
                for cid in (cid_a, cid_b, cid_c, cid_d, cid_b2)
            }
        finally:
            pods.stop()
        # Stopped while the server still holds the watch open.
        assert not [t for t in threading.enumerate() if t.name == "probe-k8s-pods"]

    assert names == {cid_a: None, cid_b: None, cid_c: None, cid_d: "d", cid_b2: "b2"}
    assert [query.get("fieldSelector") for query in server.queries] == [f"spec.nodeName={NODE}"] * 5
    assert [(query.get("watch"), query.get("resourceVersion")) for query in server.queries] == [
        (None, None),
        ("true", "100"),
        (None, None),
        ("true", "200"),
        ("true", "205"),
    ]


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def kubernetes_log():
    # Its own handler: once logs.configure() ran, "probe" loggers stop at "probe".
    logger = logging.getLogger("probe.trace.kubernetes")
    lines, level = LogLines(), logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(lines)
    logger.setLevel(level)


def test_disabled_without_node_name(kubernetes_log):
    assert PodMetadata.from_environment({}) is None
    assert kubernetes_log.messages == ["kubernetes: K8S_NODE_NAME is not set: no pod metadata"]


def test_disabled_outside_a_cluster(kubernetes_log, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)

    assert PodMetadata.from_environment({"K8S_NODE_NAME": NODE}) is None
    assert kubernetes_log.messages == [
        "kubernetes: no in-cluster configuration (Service host/port is not set.): no pod metadata"
    ]
