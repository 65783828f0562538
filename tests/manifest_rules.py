"""The security model of the deployment, as rules over rendered Kubernetes objects.

Each rule returns the list of violations it finds (empty: the rule holds), so a test can show
both that the shipped manifests pass and that a broken manifest is caught.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from session_proxy.settings import Settings, parse_listen_address

Objects = list[dict[str, Any]]
SIDECAR = "session-proxy"
TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
ALLOWED_RULES = {
    ("", "pods"): {"get", "list", "watch"},
    ("", "pods/exec"): {"get", "create"},
    ("", "pods/log"): {"get"},
}
FILES_PATH = "/workspace"
# The networks the namespace layer keeps workspaces out of, besides the metadata address.
CLOSED_NETWORKS = ("pods", "services", "nodes", "api-server")


def pods(objects: Objects) -> Iterator[dict[str, Any]]:
    yield from (o for o in objects if o.get("kind") == "Pod")


def containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = pod["spec"]
    yield from spec.get("initContainers") or []
    yield from spec.get("containers") or []


def is_workspace(pod: dict[str, Any]) -> bool:
    return (pod["metadata"].get("labels") or {}).get("type") == "workspace"


def sidecar_of(pod: dict[str, Any]) -> dict[str, Any] | None:
    return next((c for c in pod["spec"].get("initContainers") or [] if c["name"] == SIDECAR), None)


def token_volumes(pod: dict[str, Any]) -> set[str]:
    names = set()
    for volume in pod["spec"].get("volumes") or []:
        sources = (volume.get("projected") or {}).get("sources") or []
        if any("serviceAccountToken" in source for source in sources):
            names.add(volume["name"])
        if "secret" in volume:
            names.add(volume["name"])  # a secret volume could hold a token: only the sidecar
    return names


def token_only_in_sidecar(objects: Objects) -> list[str]:
    problems = []
    for obj in objects:
        if obj.get("kind") == "Secret" and obj.get("type") == "kubernetes.io/service-account-token":
            problems.append(f"Secret {obj['metadata']['name']} is a service-account token")
    for pod in pods(objects):
        name = pod["metadata"]["name"]
        spec = pod["spec"]
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"pod {name}: automountServiceAccountToken is not false")
        if spec.get("shareProcessNamespace"):
            problems.append(f"pod {name}: shareProcessNamespace exposes the sidecar's token")
        tokens = token_volumes(pod)
        if is_workspace(pod) and tokens:
            problems.append(f"pod {name}: the workspace has a token volume {sorted(tokens)}")
        for container in containers(pod):
            mounted = {m["name"] for m in container.get("volumeMounts") or []} & tokens
            if mounted and container["name"] != SIDECAR:
                problems.append(
                    f"pod {name}: container {container['name']} mounts the token {sorted(mounted)}"
                )
        sidecar = sidecar_of(pod)
        if sidecar is not None:
            mounts = {m["name"]: m for m in sidecar.get("volumeMounts") or []}
            if not any(v in mounts and mounts[v]["mountPath"] == TOKEN_PATH for v in tokens):
                problems.append(f"pod {name}: the sidecar has no projected token at {TOKEN_PATH}")
    return problems


def role_is_least_privilege(objects: Objects) -> list[str]:
    problems = []
    roles = [o for o in objects if o.get("kind") in ("Role", "ClusterRole")]
    if not roles:
        return ["no Role for the proxy"]
    for role in roles:
        if role["kind"] == "ClusterRole":
            problems.append(f"ClusterRole {role['metadata']['name']}: the proxy needs a namespaced Role")
        granted: dict[tuple[str, str], set[str]] = {}
        for rule in role.get("rules") or []:
            for group in rule.get("apiGroups") or []:
                for resource in rule.get("resources") or []:
                    granted.setdefault((group, resource), set()).update(rule.get("verbs") or [])
        if granted != ALLOWED_RULES:
            problems.append(f"Role {role['metadata']['name']} grants {granted}, expected {ALLOWED_RULES}")
    return problems


def _session_of(obj: dict[str, Any]) -> str | None:
    return (obj["metadata"].get("labels") or {}).get("session")


def _workspace_of(objects: Objects, session: str | None) -> dict[str, Any] | None:
    return next((p for p in pods(objects) if is_workspace(p) and _session_of(p) == session), None)


def one_identity_per_session(objects: Objects) -> list[str]:
    """Each runner has a service account of its own, bound only to a Role whose every rule names
    its session's workspace pod (resourceNames), and the sidecar lists it by that name."""
    problems = []
    runners = [p for p in pods(objects) if sidecar_of(p) is not None]
    for pod in runners:
        name, account = pod["metadata"]["name"], pod["spec"].get("serviceAccountName", "default")
        workspace = _workspace_of(objects, _session_of(pod))
        if workspace is None:
            problems.append(f"pod {name}: no workspace pod of session {_session_of(pod)!r}")
            continue
        target = workspace["metadata"]["name"]
        sharing = [p["metadata"]["name"] for p in pods(objects) if p is not pod
                   and p["spec"].get("serviceAccountName", "default") == account]  # fmt: skip
        if sharing:
            problems.append(f"pod {name}: service account {account} is shared with {sharing}")
        subject = {"kind": "ServiceAccount", "name": account}
        bindings = [
            b for b in objects
            if b.get("kind") == "RoleBinding" and subject in (b.get("subjects") or [])
        ]  # fmt: skip
        if not bindings:
            problems.append(f"pod {name}: no RoleBinding for service account {account}")
        for binding in bindings:
            role = next((r for r in objects if r.get("kind") == binding["roleRef"]["kind"]
                         and r["metadata"]["name"] == binding["roleRef"]["name"]), None)  # fmt: skip
            if role is None:
                problems.append(f"RoleBinding {binding['metadata']['name']}: its Role does not exist")
                continue
            for rule in role.get("rules") or []:
                if rule.get("resourceNames") != [target]:
                    problems.append(
                        f"Role {role['metadata']['name']}: rule on {rule.get('resources')} is not "
                        f"pinned to {target} (resourceNames {rule.get('resourceNames')})"
                    )
        named = (_env(sidecar_of(pod) or {}).get("SESSION_PROXY_WORKSPACE_POD") or {}).get("value")
        if named != target:
            problems.append(f"pod {name}: SESSION_PROXY_WORKSPACE_POD is {named!r}, not {target!r}")
    return problems


def _mount_at(pod: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The volume mounted at ``path`` in the container, if it is mounted writable."""
    mount = next((m for m in container.get("volumeMounts") or [] if m["mountPath"] == path), None)
    if mount is None or mount.get("readOnly"):
        return None
    return next((v for v in pod["spec"].get("volumes") or [] if v["name"] == mount["name"]), None)


def _run_as(pod: dict[str, Any], container: dict[str, Any]) -> Any:
    return _effective(pod, container, "runAsUser")


def files_are_shared(objects: Objects) -> list[str]:
    """The agent and the workspace mount the session's one volume at /workspace, writable, as
    the same UID, each with a writable HOME; a ReadWriteOnce volume puts the workspace on the
    runner's node; the MCP default workdir is that mount."""
    problems = []
    claims = {o["metadata"]["name"]: o for o in objects if o.get("kind") == "PersistentVolumeClaim"}
    for runner in (p for p in pods(objects) if sidecar_of(p) is not None):
        workspace = _workspace_of(objects, _session_of(runner))
        if workspace is None:
            problems.append(f"pod {runner['metadata']['name']}: no workspace pod of its session")
            continue
        agent = next(c for c in runner["spec"]["containers"] if "SESSION_PROXY_URL" in _env(c))
        box = next((c for c in workspace["spec"]["containers"] if c["name"] == "workspace"), None)
        if box is None:
            continue  # workspace_is_isolated reports it
        found = {}
        for pod, container in ((runner, agent), (workspace, box)):
            where = f"pod {pod['metadata']['name']} container {container['name']}"
            volume = _mount_at(pod, container, FILES_PATH)
            claim = ((volume or {}).get("persistentVolumeClaim") or {}).get("claimName")
            if claim not in claims:
                problems.append(f"{where}: no writable session volume at {FILES_PATH}")
            found[pod["metadata"]["name"]] = claim
            home = (_env(container).get("HOME") or {}).get("value", "")
            if _mount_at(pod, container, home) is None:
                problems.append(f"{where}: HOME {home!r} is not a writable mount")
        if len(set(found.values())) != 1:
            problems.append(f"the agent and the workspace mount different volumes: {found}")
        if _run_as(runner, agent) != _run_as(workspace, box):
            problems.append("the agent and the workspace run as different UIDs (one's files not the other's)")
        claim = claims.get(next(iter(found.values())) or "")
        if claim and "ReadWriteMany" not in claim["spec"].get("accessModes", []):
            terms = ((workspace["spec"].get("affinity") or {}).get("podAffinity") or {}).get(
                "requiredDuringSchedulingIgnoredDuringExecution") or []  # fmt: skip
            if not any(t.get("topologyKey") == "kubernetes.io/hostname"
                       and _matches(t.get("labelSelector") or {}, runner["metadata"].get("labels") or {})
                       for t in terms):  # fmt: skip
                problems.append("a ReadWriteOnce volume, but the workspace is not put on the runner's node")
        workdir = (_env(sidecar_of(runner) or {}).get("SESSION_PROXY_MCP_WORKDIR") or {}).get("value")
        if workdir != FILES_PATH:
            problems.append(f"SESSION_PROXY_MCP_WORKDIR is {workdir!r}, not the session volume {FILES_PATH}")
    return problems


def _effective(pod: dict[str, Any], container: dict[str, Any], key: str) -> Any:
    value = (container.get("securityContext") or {}).get(key)
    return value if value is not None else (pod["spec"].get("securityContext") or {}).get(key)


def restricted_everywhere(objects: Objects) -> list[str]:
    """Pod Security Standards "restricted", container by container, plus a read-only sidecar."""
    problems = []
    for pod in pods(objects):
        spec = pod["spec"]
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(flag):
                problems.append(f"pod {pod['metadata']['name']}: {flag}")
        if any("hostPath" in v for v in spec.get("volumes") or []):
            problems.append(f"pod {pod['metadata']['name']}: hostPath volume")
        for container in containers(pod):
            where = f"pod {pod['metadata']['name']} container {container['name']}"
            context = container.get("securityContext") or {}
            if _effective(pod, container, "runAsNonRoot") is not True:
                problems.append(f"{where}: runAsNonRoot is not true")
            if _effective(pod, container, "runAsUser") == 0:
                problems.append(f"{where}: runs as UID 0")
            if context.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if context.get("privileged"):
                problems.append(f"{where}: privileged")
            capabilities = context.get("capabilities") or {}
            if "ALL" not in (capabilities.get("drop") or []):
                problems.append(f"{where}: capabilities do not drop ALL")
            if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
                problems.append(f"{where}: adds capabilities {capabilities['add']}")
            seccomp = (_effective(pod, container, "seccompProfile") or {}).get("type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{where}: seccompProfile is {seccomp}")
            if "resources" not in container or "limits" not in container["resources"]:
                problems.append(f"{where}: no resource limits")
        sidecar = sidecar_of(pod)
        if (
            sidecar is not None
            and (sidecar.get("securityContext") or {}).get("readOnlyRootFilesystem") is not True
        ):
            problems.append(f"pod {pod['metadata']['name']}: the sidecar's root filesystem is writable")
    return problems


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env") or []}


def proxy_wiring_matches_defaults(objects: Objects) -> list[str]:
    """The sidecar gets what it needs, and ports and probes match the proxy's own defaults."""
    defaults = Settings(backend="local")
    ops_port = parse_listen_address(defaults.ops_listen).port  # type: ignore[union-attr]
    exec_port = parse_listen_address(defaults.listen).port  # type: ignore[union-attr]
    problems = []
    runners = [p for p in pods(objects) if sidecar_of(p) is not None]
    if not runners:
        return ["no pod runs the session-proxy sidecar"]
    for pod in runners:
        name = pod["metadata"]["name"]
        sidecar = sidecar_of(pod)
        assert sidecar is not None
        if sidecar.get("restartPolicy") != "Always":
            problems.append(f"pod {name}: the sidecar is not a native sidecar (restartPolicy Always)")
        env = _env(sidecar)
        namespace = (env.get("POD_NAMESPACE") or {}).get("valueFrom", {}).get("fieldRef", {})
        if namespace.get("fieldPath") != "metadata.namespace":
            problems.append(f"pod {name}: POD_NAMESPACE does not come from metadata.namespace")
        if "SESSION_NAME" not in env and "SESSION_PROXY_WORKSPACE_SELECTOR" not in env:
            problems.append(f"pod {name}: neither SESSION_NAME nor a workspace selector is set")
        ports = {p.get("name"): p["containerPort"] for p in sidecar.get("ports") or []}
        for probe_kind, paths in (("startupProbe", {"/healthz"}), ("readinessProbe", {"/readyz"}),
                                  ("livenessProbe", {"/healthz"})):  # fmt: skip
            probe = (sidecar.get(probe_kind) or {}).get("httpGet")
            if probe is None:
                problems.append(f"pod {name}: the sidecar has no {probe_kind}")
                continue
            port = ports.get(probe["port"], probe["port"])
            if port != ops_port or probe["path"] not in paths:
                problems.append(
                    f"pod {name}: {probe_kind} {probe} does not hit the ops listener {ops_port}{paths}"
                )
        for container in pod["spec"].get("containers") or []:
            url = (_env(container).get("SESSION_PROXY_URL") or {}).get("value")
            if url is not None and url != f"http://127.0.0.1:{exec_port}":
                problems.append(f"pod {name}: {container['name']} has SESSION_PROXY_URL={url}")
        if not any("SESSION_PROXY_URL" in _env(c) for c in pod["spec"].get("containers") or []):
            problems.append(f"pod {name}: the agent is not told SESSION_PROXY_URL")
        problems += _shared_token_problems(pod, sidecar)
        annotations = pod["metadata"].get("annotations") or {}
        if annotations.get("prometheus.io/port") != str(ops_port):
            problems.append(f"pod {name}: Prometheus does not scrape port {ops_port}")
    return problems


def _shared_token_problems(pod: dict[str, Any], sidecar: dict[str, Any]) -> list[str]:
    """The sidecar's bearer-token file reaches each client container, read-only."""
    name = pod["metadata"]["name"]
    token_file = (_env(sidecar).get("SESSION_PROXY_AUTH_TOKEN_FILE") or {}).get("value")
    if not token_file:
        return [f"pod {name}: the sidecar does not require a bearer token (SESSION_PROXY_AUTH_TOKEN_FILE)"]
    directory = token_file.rsplit("/", 1)[0]
    problems = []
    for container in pod["spec"].get("containers") or []:
        if "SESSION_PROXY_URL" not in _env(container):
            continue
        if (_env(container).get("SESSION_PROXY_AUTH_TOKEN_FILE") or {}).get("value") != token_file:
            problems.append(f"pod {name}: {container['name']} is not told the token file {token_file}")
        mounts = [m for m in container.get("volumeMounts") or [] if m["mountPath"] == directory]
        if not mounts or not all(m.get("readOnly") for m in mounts):
            problems.append(f"pod {name}: {container['name']} does not mount {directory} read-only")
    return problems


def workspace_is_isolated(objects: Objects) -> list[str]:
    problems = []
    workspaces = [p for p in pods(objects) if is_workspace(p)]
    if not workspaces:
        return ["no workspace pod"]
    for pod in workspaces:
        if not any(c["name"] == "workspace" for c in pod["spec"]["containers"]):
            problems.append(f"pod {pod['metadata']['name']}: no container named workspace")
    policies = [o for o in objects if o.get("kind") == "NetworkPolicy"]
    isolating = [
        p for p in policies
        if (p["spec"]["podSelector"].get("matchLabels") or {}).get("type") == "workspace"
    ]  # fmt: skip
    if not isolating:
        return [*problems, "no NetworkPolicy selects the workspace"]
    for policy in isolating:
        spec = policy["spec"]
        if "Ingress" not in spec.get("policyTypes", []) or spec.get("ingress"):
            problems.append(f"NetworkPolicy {policy['metadata']['name']}: workspace ingress is not denied")
        if "Egress" not in spec.get("policyTypes", []):
            problems.append(f"NetworkPolicy {policy['metadata']['name']}: egress is not restricted")
        for rule in spec.get("egress") or []:
            for peer in rule.get("to") or [{}]:
                block = peer.get("ipBlock")
                ports = rule.get("ports") or []
                if (
                    block is None
                    and peer.get("podSelector")
                    and ports
                    and {p.get("port") for p in ports} == {53}
                ):
                    continue  # the cluster DNS, port 53 only
                closed = (block or {}).get("except") or []
                if "169.254.169.254/32" not in closed or len(closed) < 1 + len(CLOSED_NETWORKS):
                    problems.append(
                        f"NetworkPolicy {policy['metadata']['name']}: egress reaches the metadata address "
                        f"or a cluster network ({block})"
                    )
    return problems


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def monitoring_is_wired(objects: Objects) -> list[str]:
    """With the monitoring component: the PodMonitor scrapes every sidecar's ops port as
    job="session-proxy" (what the alerts select), the rules and the dashboard ConfigMap exist."""
    monitors = [o for o in objects if o.get("kind") == "PodMonitor"]
    rules = [o for o in objects if o.get("kind") == "PrometheusRule"]
    dashboards = [
        o for o in objects
        if o.get("kind") == "ConfigMap" and (o["metadata"].get("labels") or {}).get("grafana_dashboard")
    ]  # fmt: skip
    if not (monitors or rules or dashboards):
        return []  # the component is optional
    problems = []
    for obj in monitors + rules:
        if obj.get("apiVersion") != "monitoring.coreos.com/v1" or set(obj) - {
            "apiVersion",
            "kind",
            "metadata",
            "spec",
        }:
            problems.append(f"{obj['kind']} {obj['metadata']['name']}: not a monitoring.coreos.com/v1 object")
    if len(monitors) != 1 or not rules or len(dashboards) != 1:
        return [
            *problems,
            "the monitoring component needs one PodMonitor, a PrometheusRule and one dashboard",
        ]
    ops_port = parse_listen_address(Settings(backend="local").ops_listen).port  # type: ignore[union-attr]
    monitor = monitors[0]
    endpoints = monitor["spec"].get("podMetricsEndpoints") or []
    for pod in (p for p in pods(objects) if sidecar_of(p) is not None):
        name = pod["metadata"]["name"]
        if not _matches(monitor["spec"].get("selector") or {}, pod["metadata"].get("labels") or {}):
            problems.append(f"PodMonitor does not select the runner pod {name}")
        sidecar = sidecar_of(pod)
        assert sidecar is not None
        ports = {p.get("name"): p["containerPort"] for p in sidecar.get("ports") or []}
        if not any(
            ports.get(e.get("port")) == ops_port and e.get("path", "/metrics") == "/metrics"
            for e in endpoints
        ):
            problems.append(f"PodMonitor does not scrape {name}'s ops port {ops_port} by name at /metrics")
    for endpoint in endpoints:
        job = [r for r in endpoint.get("relabelings") or [] if r.get("targetLabel") == "job"]
        if [r.get("replacement") for r in job] != ["session-proxy"]:
            problems.append('PodMonitor targets do not get job="session-proxy", which the alerts select')
    if not all((r.get("spec") or {}).get("groups") for r in rules):
        problems.append("PrometheusRule without groups")
    dashboard = dashboards[0]
    documents = list((dashboard.get("data") or {}).values())
    if len(documents) != 1 or '"panels"' not in documents[0]:
        problems.append(f"ConfigMap {dashboard['metadata']['name']} does not hold one dashboard")
    return problems


RULES: dict[str, Callable[[Objects], list[str]]] = {
    "token_only_in_sidecar": token_only_in_sidecar,
    "role_is_least_privilege": role_is_least_privilege,
    "restricted_everywhere": restricted_everywhere,
    "proxy_wiring_matches_defaults": proxy_wiring_matches_defaults,
    "workspace_is_isolated": workspace_is_isolated,
    "one_identity_per_session": one_identity_per_session,
    "files_are_shared": files_are_shared,
    "monitoring_is_wired": monitoring_is_wired,
}
