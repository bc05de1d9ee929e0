"""The deployment files under deploy/ and scripts/install.sh.

Checks that every file parses, that the Kubernetes objects are ones the API
knows (through the official client's models) and give probe what it needs
(host PIDs, the host mounts, the node name, read-only RBAC, the same
capabilities as the systemd unit), that the example config documents the
loader's real defaults, and that the installer installs and uninstalls under
a DESTDIR. Tools that may be missing (systemd-analyze, helm) are skipped with
the reason.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from probe.config import ProbeConfig, load

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "probe.service"
EXAMPLE_CONFIG = DEPLOY / "probe.yaml"
MANIFEST = DEPLOY / "kubernetes" / "daemonset.yaml"
CHART = DEPLOY / "helm" / "probe"
INSTALL = REPO / "scripts" / "install.sh"

CAPABILITIES = {
    "CAP_BPF",
    "CAP_PERFMON",
    "CAP_SYS_PTRACE",
    "CAP_DAC_READ_SEARCH",
    "CAP_SYS_RESOURCE",
}
# Host path -> mounted read-only; each is mounted at its own path in the pod.
HOST_MOUNTS = {
    "/lib/modules": True,
    "/usr/src": True,
    "/sys/kernel/tracing": False,  # bcc may write kprobe/uprobe events
    "/sys/kernel/debug": False,
    "/sys/kernel/btf": True,
    "/sys/fs/cgroup": True,
}


def load_yaml_config(text: str, tmp_path: Path) -> ProbeConfig:
    """Load probe.yaml text the way `probe run --config` does, without the environment."""
    path = tmp_path / "probe.yaml"
    path.write_text(text)
    return load(environ={}, config_path=str(path))


# -- every YAML file ----


def plain_yaml_files() -> list[Path]:
    """YAML files that are YAML before rendering (Helm templates are not)."""
    templates = CHART / "templates"
    return sorted(p for p in DEPLOY.rglob("*.yaml") if templates not in p.parents)


def test_the_deploy_folder_has_its_yaml_files():
    names = {str(p.relative_to(DEPLOY)) for p in plain_yaml_files()}
    assert names == {
        "probe.yaml",
        "kubernetes/daemonset.yaml",
        "helm/probe/Chart.yaml",
        "helm/probe/values.yaml",
    }


@pytest.mark.parametrize("path", plain_yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_file_parses(path: Path):
    list(yaml.safe_load_all(path.read_text()))


# -- the example config ----


def uncomment(text: str) -> str:
    """Turn on every commented-out setting (`# key: value`); drop `##` documentation."""
    lines = []
    for line in text.splitlines(keepends=True):
        if line.startswith("##") or not line.strip():
            continue
        lines.append(line[2:] if line.startswith("# ") else line)
    return "".join(lines)


def test_example_config_is_all_comments():
    assert yaml.safe_load(EXAMPLE_CONFIG.read_text()) is None


def test_example_config_documents_the_loaders_defaults(tmp_path):
    assert load_yaml_config(uncomment(EXAMPLE_CONFIG.read_text()), tmp_path) == ProbeConfig()


def test_example_config_sections():
    sections = set(yaml.safe_load(uncomment(EXAMPLE_CONFIG.read_text())))
    assert sections == {
        "exporter",
        "resource_attributes",
        "batch",
        "metrics",
        "log_format",
        "nice",
        "capture",
        "filters",
    }


# -- Kubernetes objects, from the manifest and from the Helm chart ----


def to_models(documents: list[dict]) -> dict[str, list]:
    """Deserialize into the official client's models, by kind.

    The client keeps only the fields its models know, so a round trip back to
    plain data must give the document again: a misspelled field fails here.
    """
    client = pytest.importorskip(
        "kubernetes.client", reason="the kubernetes package (a test dependency) is not installed"
    )
    api = client.ApiClient()
    objects: dict[str, list] = {}
    for document in documents:
        model = api._ApiClient__deserialize(document, f"V1{document['kind']}")
        assert api.sanitize_for_serialization(model) == document
        objects.setdefault(document["kind"], []).append(model)
    return objects


def check_probe_objects(objects: dict[str, list], namespace: str, tmp_path: Path) -> None:
    """What every Kubernetes deployment of probe must hold, however it was made."""
    [account] = objects["ServiceAccount"]
    [role] = objects["ClusterRole"]
    [binding] = objects["ClusterRoleBinding"]
    [config_map] = objects["ConfigMap"]
    [daemon_set] = objects["DaemonSet"]
    for namespaced in (account, config_map, daemon_set):
        assert namespaced.metadata.namespace == namespace

    # RBAC: reading pods, nothing else.
    assert [(r.api_groups, r.resources, r.verbs) for r in role.rules] == [
        ([""], ["pods"], ["get", "list", "watch"])
    ]
    assert binding.role_ref.kind == "ClusterRole"
    assert binding.role_ref.name == role.metadata.name
    assert [(s.kind, s.name, s.namespace) for s in binding.subjects] == [
        ("ServiceAccount", account.metadata.name, namespace)
    ]

    pod = daemon_set.spec.template.spec
    assert (
        daemon_set.spec.selector.match_labels.items()
        <= daemon_set.spec.template.metadata.labels.items()
    )
    assert pod.service_account_name == account.metadata.name
    assert pod.host_pid is True
    assert pod.host_network is False
    assert [(t.key, t.operator, t.effect) for t in pod.tolerations] == [(None, "Exists", None)]
    [container] = pod.containers
    assert container.args == ["run", "--config", "/etc/probe/probe.yaml"]

    # Host mounts, each at its host path.
    host_paths = {v.name: v.host_path.path for v in pod.volumes if v.host_path}
    mounts = {
        host_paths[m.name]: (m.mount_path, bool(m.read_only))
        for m in container.volume_mounts
        if m.name in host_paths
    }
    assert mounts == {path: (path, read_only) for path, read_only in HOST_MOUNTS.items()}
    [config_volume] = [v for v in pod.volumes if v.config_map]
    assert config_volume.config_map.name == config_map.metadata.name
    assert [
        (m.mount_path, m.read_only) for m in container.volume_mounts if m.name == config_volume.name
    ] == [("/etc/probe", True)]

    env = {e.name: e for e in container.env}
    assert env["K8S_NODE_NAME"].value_from.field_ref.field_path == "spec.nodeName"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].value == (
        "http://otel-collector.observability.svc.cluster.local:4318"
    )
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"].value == "http/protobuf"
    assert env["OTEL_RESOURCE_ATTRIBUTES"].value == "k8s.node.name=$(K8S_NODE_NAME)"

    # The same capabilities as the systemd unit, nothing more.
    security = container.security_context
    assert security.privileged is False
    assert security.allow_privilege_escalation is False
    assert security.capabilities.drop == ["ALL"]
    assert {f"CAP_{c}" for c in security.capabilities.add} == CAPABILITIES

    assert container.resources.requests == {"cpu": "100m", "memory": "256Mi"}
    assert container.resources.limits == {"cpu": "1", "memory": "512Mi"}

    # The kubelet probes /healthz on the pod address, so the config binds
    # metrics to 0.0.0.0 on the port the probes name.
    config = load_yaml_config(config_map.data["probe.yaml"], tmp_path)
    assert config.metrics_address == ("0.0.0.0", 9464)
    ports = {p.name: p.container_port for p in container.ports}
    assert ports == {"metrics": 9464}
    for check in (container.startup_probe, container.readiness_probe):
        assert (check.http_get.path, check.http_get.port) == ("/healthz", "metrics")


def test_manifest_objects(tmp_path):
    objects = to_models(list(yaml.safe_load_all(MANIFEST.read_text())))
    [namespace] = objects["Namespace"]
    assert namespace.metadata.name == "probe"
    check_probe_objects(objects, "probe", tmp_path)


def test_a_misspelled_field_does_not_survive_the_models():
    documents = list(yaml.safe_load_all(MANIFEST.read_text()))
    [pod] = [d["spec"]["template"]["spec"] for d in documents if d["kind"] == "DaemonSet"]
    pod["hostPid"] = pod.pop("hostPID")
    with pytest.raises(AssertionError):
        to_models(documents)


# -- the Helm chart ----


def test_chart_metadata():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert (chart["apiVersion"], chart["name"], chart["type"]) == ("v2", "probe", "application")
    assert chart["appVersion"] == "0.1.0"


def value_paths(values: dict, prefix: str = "") -> set[str]:
    """Every dotted path into values.yaml: a.b.c gives a, a.b and a.b.c."""
    paths = set()
    for key, value in values.items():
        path = prefix + key
        paths.add(path)
        if isinstance(value, dict):
            paths |= value_paths(value, path + ".")
    return paths


def test_chart_templates_use_exactly_the_values_that_exist():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    used = set()
    for template in (CHART / "templates").iterdir():
        used |= set(re.findall(r"\.Values\.([A-Za-z0-9_.]+)", template.read_text()))
    assert used <= value_paths(values)
    assert {path.split(".")[0] for path in used} == set(values)


def test_chart_template_actions_are_balanced():
    for template in (CHART / "templates").iterdir():
        text = template.read_text()
        assert text.count("{{") == text.count("}}"), template.name
        opened = len(re.findall(r"\{\{-?\s*(?:if|with|range|define)\b", text))
        closed = len(re.findall(r"\{\{-?\s*end\b", text))
        assert opened == closed, template.name


def test_chart_renders_the_same_objects(tmp_path):
    helm = shutil.which("helm")
    if helm is None:
        pytest.skip("helm is not on PATH: the chart was not rendered (its values were checked)")
    result = subprocess.run(
        [helm, "template", "probe", str(CHART), "--namespace", "probe"],
        capture_output=True,
        text=True,
        check=True,
    )
    documents = [d for d in yaml.safe_load_all(result.stdout) if d]
    check_probe_objects(to_models(documents), "probe", tmp_path)


# -- the systemd unit ----


@dataclass
class UnitEntry:
    key: str
    value: str
    comment: str  # the comment lines right above it, joined


def parse_unit(text: str) -> dict[str, list[UnitEntry]]:
    """A unit file as systemd reads it: [Section], then Key=Value lines."""
    sections: dict[str, list[UnitEntry]] = {}
    section = None
    comment: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith(("#", ";")):
            comment.append(line.lstrip("#; "))
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            assert section not in sections, f"line {number}: [{section}] again"
            sections[section] = []
        elif line:
            key, sep, value = line.partition("=")
            assert sep and section, f"line {number} is not Key=Value in a section: {raw!r}"
            sections[section].append(UnitEntry(key.strip(), value.strip(), " ".join(comment)))
        comment = []
    return sections


def unit_settings(section: list[UnitEntry]) -> dict[str, str]:
    """The last value of each key, which is what systemd uses for single-valued keys."""
    return {entry.key: entry.value for entry in section}


def test_unit_sections_and_command():
    unit = parse_unit(UNIT.read_text())
    assert list(unit) == ["Unit", "Service", "Install"]
    service = unit_settings(unit["Service"])
    assert service["ExecStart"] == "/opt/probe/venv/bin/probe run --config /etc/probe/probe.yaml"
    assert unit_settings(unit["Install"]) == {"WantedBy": "multi-user.target"}


def test_unit_stops_and_restarts():
    service = unit_settings(parse_unit(UNIT.read_text())["Service"])
    assert service["KillSignal"] == "SIGTERM"
    assert service["TimeoutStopSec"] == "30s"
    assert service["Restart"] == "on-failure"


def test_unit_capabilities_each_with_a_reason():
    entries = [
        e for e in parse_unit(UNIT.read_text())["Service"] if e.key == "CapabilityBoundingSet"
    ]
    assert {e.value for e in entries} == CAPABILITIES
    for entry in entries:
        assert entry.comment.startswith(f"{entry.value}: "), entry.value
    assert not any(e.key == "AmbientCapabilities" for e in parse_unit(UNIT.read_text())["Service"])


def test_unit_weighs_the_probe_below_the_services_it_traces():
    service = unit_settings(parse_unit(UNIT.read_text())["Service"])
    assert int(service["CPUWeight"]) < 100  # systemd's default for every other service


def test_unit_hardening_keeps_what_probe_needs():
    service = unit_settings(parse_unit(UNIT.read_text())["Service"])
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"  # /sys and /proc stay as they are
    assert service["ProtectHome"] == "read-only"
    assert service["PrivateTmp"] == "yes"
    assert service["LimitMEMLOCK"] == "infinity"
    # These would hide /lib/modules, freeze tracefs, or hide the traced processes.
    for breaking in ("ProtectKernelModules", "ProtectKernelTunables", "ProtectProc", "ProcSubset"):
        assert breaking not in service


# -- the Dockerfile ----


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        name, _, arguments = pending.partition(" ")
        instructions.append((name.upper(), " ".join(arguments.split())))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def test_dockerfile_builds_the_venv_and_runs_probe():
    instructions = dockerfile_instructions((DEPLOY / "Dockerfile").read_text())
    assert instructions[0] == ("FROM", "debian:bookworm-slim")
    runs = [arguments for name, arguments in instructions if name == "RUN"]
    assert "python3-bpfcc python3-venv" in runs[0]
    assert runs[1] == "/usr/bin/python3 -m venv --system-site-packages /opt/probe/venv"
    assert ("COPY", ". /opt/probe/src") in instructions
    assert runs[2].startswith("pip install --no-cache-dir -e '/opt/probe/src[compile]'")
    assert "python /opt/probe/src/scripts/compile.py" in runs[2]
    assert runs[2].endswith("probe check | grep -q 'hot path *ok'")
    env = [arguments for name, arguments in instructions if name == "ENV"]
    assert env[0].startswith("PATH=/opt/probe/venv/bin:$PATH")
    assert instructions[-2:] == [("ENTRYPOINT", '["probe"]'), ("CMD", '["run"]')]
    assert json.loads(instructions[-2][1]) == ["probe"]


def test_dockerignore_leaves_out_the_local_venv():
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)


# -- scripts/install.sh ----


@pytest.fixture
def installer(tmp_path):
    """Runs install.sh into tmp_path/root, with apt, dpkg and systemctl replaced by tripwires."""
    tripwires = tmp_path / "tripwires"
    tripwires.mkdir()
    calls = tmp_path / "calls"
    for tool in ("apt-get", "dpkg-query", "systemctl", "pip"):
        stub = tripwires / tool
        stub.write_text(f'#!/bin/sh\necho {tool} "$@" >> {calls}\nexit 1\n')
        stub.chmod(0o755)
    env = {
        "PATH": f"{tripwires}:/usr/bin:/bin",
        "DESTDIR": str(tmp_path / "root"),
        "PREFIX": str(tmp_path / "prefix"),
    }

    def run(*args: str, **settings: str) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["bash", str(INSTALL), *args],
            env=env | settings,
            capture_output=True,
            text=True,
            check=False,
        )
        assert not calls.exists(), calls.read_text()
        return result

    return run


def installed_paths(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "root"
    return root / "etc/systemd/system/probe.service", root / "etc/probe/probe.yaml"


def test_install_places_unit_and_config(installer, tmp_path):
    assert installer().returncode == 0
    unit, config = installed_paths(tmp_path)
    assert unit.read_text() == UNIT.read_text().replace("/opt/probe/", f"{tmp_path}/prefix/")
    assert config.read_bytes() == EXAMPLE_CONFIG.read_bytes()
    assert config.stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / "prefix").exists()  # no venv under a DESTDIR


def test_install_rewrites_the_config_path(installer, tmp_path):
    assert installer(SYSCONFDIR="/usr/local/etc").returncode == 0
    unit = tmp_path / "root/etc/systemd/system/probe.service"
    service = unit_settings(parse_unit(unit.read_text())["Service"])
    config = "/usr/local/etc/probe/probe.yaml"
    assert service["ExecStart"] == f"{tmp_path}/prefix/venv/bin/probe run --config {config}"
    assert service["EnvironmentFile"] == "-/usr/local/etc/probe/probe.env"
    assert (tmp_path / "root" / config.lstrip("/")).read_bytes() == EXAMPLE_CONFIG.read_bytes()


def test_reinstall_keeps_an_edited_config(installer, tmp_path):
    installer()
    _, config = installed_paths(tmp_path)
    config.write_text("filters:\n  ports: [80]\n")
    assert installer().returncode == 0
    assert config.read_text() == "filters:\n  ports: [80]\n"


def test_uninstall_removes_unit_and_config(installer, tmp_path):
    installer()
    assert installer("--uninstall").returncode == 0
    unit, config = installed_paths(tmp_path)
    assert not unit.exists()
    assert not config.parent.exists()


def test_uninstall_keeps_an_edited_config(installer, tmp_path):
    installer()
    unit, config = installed_paths(tmp_path)
    config.write_text("log_format: json\n")
    result = installer("--uninstall")
    assert result.returncode == 0
    assert not unit.exists()
    assert config.read_text() == "log_format: json\n"
    assert f"keeping {config}: it was edited" in result.stderr


def test_install_rejects_an_unknown_argument(installer):
    result = installer("--purge")
    assert result.returncode == 2
    assert "unknown argument: --purge" in result.stderr


def test_installed_unit_passes_systemd_analyze_verify(installer, tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: the unit was parsed but not verified")
    installer()
    # verify checks that ExecStart's binary exists: stand one in for the venv's.
    probe = tmp_path / "prefix/venv/bin/probe"
    probe.parent.mkdir(parents=True)
    probe.write_text("#!/bin/sh\n")
    probe.chmod(0o755)
    unit, _ = installed_paths(tmp_path)
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
