"""A Kubernetes API test server that speaks the real wire protocol and runs real processes.

What it serves, as a real API server does (see the protocol notes this project keeps):
- discovery enough for kubectl (/version, /api, /apis, /api/v1), pods list (label selectors
  and metadata.name or metadata.namespace field selectors), get, log, and exec over WebSocket
  (GET) with the channel framing, the first empty frame, status JSON on channel 3 and v5's
  CLOSE; Status errors (401, 403, 404, 400, 500);
- two modes: ``modern`` (v5 and v4: v5 is handled by the API server's translator, so container
  errors come after the upgrade, on channel 3) and ``old`` (v4 only: container errors are a
  plain-text HTTP 500 before the upgrade);
- RBAC for a user bound to Roles (``bind_role``): a request is allowed only by a rule naming
  its verb and resource and, when the rule has ``resourceNames``, the object's name; a list or
  a watch has a name only through a ``metadata.name=<name>`` field selector, as the API
  server's request-info resolver derives it. Users bound to nothing may do anything;
- like a container runtime, it does not kill an exec'd process when the client goes away: it
  closes the process's stdin and output pipes and lets it run;
- the stream ends when the process has exited *and* its output pipes are closed, so a
  background child holding them keeps the stream open, as in a real container.
Each pod gets its own directory as the processes' working directory; every process it starts
carries ``FAKE_POD_UID`` in its environment, so "deleting the pod" can kill the lot.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import trustme
from aiohttp import WSMsgType, web

V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
READ_SIZE = 32 * 1024
FAKE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
USER = web.RequestKey("user", str)
DROP_AFTER = web.RequestKey("drop_after_bytes", int)


def status_body(
    code: int, reason: str, message: str, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    }  # fmt: skip
    if details:
        body["details"] = details
    return body


def status_response(code: int, reason: str, message: str, **details: Any) -> web.Response:
    return web.json_response(status_body(code, reason, message, details or None), status=code)


@dataclass
class FakePod:
    name: str
    root: Path
    labels: dict[str, str] = field(default_factory=dict)
    namespace: str = "default"
    containers: list[str] = field(default_factory=lambda: ["workspace"])
    phase: str = "Running"
    ready: bool = True
    container_running: bool = True
    # The kubelet has lost the container although the pod still reports it running (a race).
    container_gone: bool = False
    waiting_reason: str | None = None
    deleting: bool = False
    owner_references: list[dict[str, Any]] = field(default_factory=list)
    image: str = "example.com/user/tools:1.0"
    restarts: int = 0
    log_lines: list[str] = field(default_factory=list)
    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    shell: str | None = None  # a /bin/sh replacement (dash, busybox) for this "image"
    path: str = FAKE_PATH  # the image's PATH: what programs it has

    def manifest(self) -> dict[str, Any]:
        state: dict[str, Any]
        if self.container_running:
            state = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
        else:
            state = {"waiting": {"reason": self.waiting_reason or "ContainerCreating"}}
        metadata: dict[str, Any] = {
            "name": self.name, "namespace": self.namespace, "uid": self.uid,
            "labels": self.labels, "ownerReferences": self.owner_references,
            "creationTimestamp": "2026-01-01T00:00:00Z", "resourceVersion": "1",
        }  # fmt: skip
        if self.deleting:
            metadata["deletionTimestamp"] = "2026-01-01T00:10:00Z"
        ready = "True" if self.ready else "False"
        return {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": metadata,
            "spec": {
                "nodeName": "node-1",
                "containers": [{"name": c, "image": self.image} for c in self.containers],
            },
            "status": {
                "phase": self.phase,
                "conditions": [
                    {"type": "Ready", "status": ready},
                    {"type": "ContainersReady", "status": ready},
                ],
                "containerStatuses": [
                    {
                        "name": c,
                        "image": self.image,
                        "ready": self.ready and self.container_running,
                        "restartCount": self.restarts,
                        "state": state,
                    }
                    for c in self.containers
                ],
            },
        }


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    raw_path: str


@dataclass
class Fault:
    """Fault injection, matched by path substring (and method); ``times`` < 0 means for ever.

    Exec faults: ``idle_cut`` closes the connection once no frame went either way for that many
    seconds (as a load balancer's idle timer does); ``ignore_pings`` stops answering pings (a
    peer gone silent); ``frame_bytes`` sends one stdout frame that large first; ``stall`` upgrades
    and then never sends anything; ``no_status`` drops the connection instead of sending the
    final status.
    """

    path: str
    status: int | None = None
    delay: float = 0.0
    drop_after_bytes: int | None = None
    times: int = 1
    method: str | None = None
    idle_cut: float | None = None
    ignore_pings: bool = False
    frame_bytes: int | None = None
    stall: bool = False
    no_status: bool = False
    user_agent: str | None = None  # substring of the User-Agent, e.g. "-kill" for kill execs
    close_stdin_after_frames: int | None = None  # then EOF on the process's stdin, stream kept
    # Each stdout frame leaves this much later than it was read, as when a runtime's stdout copier
    # lags behind its stderr one (they are separate goroutines: nothing orders the two streams).
    stdout_lag: float = 0.0
    hold: asyncio.Event | None = None  # the request waits until the test sets it


EXEC_FAULT = web.RequestKey("exec_fault", Fault)


def matches_selector(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


# The pod fields the API server lets a field selector name (besides spec and status fields
# this server does not serve).
POD_FIELDS = ("metadata.name", "metadata.namespace")


def pod_fields(metadata: dict[str, Any]) -> dict[str, str]:
    return {"metadata.name": metadata["name"], "metadata.namespace": metadata["namespace"]}


def unsupported_field(selector: str) -> str | None:
    """The first field a selector names that pods do not support, if any."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        field = term.replace("!=", "=").split("=", 1)[0].strip()
        if field not in POD_FIELDS:
            return field
    return None


def exact_name(selector: str) -> str | None:
    """The name a field selector requires (``metadata.name=x`` or ``==x``), as RBAC reads it."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" not in term and term.replace("==", "=").partition("=")[0].strip() == "metadata.name":
            return term.replace("==", "=").partition("=")[2].strip()
    return None


def rule_allows(rule: dict[str, Any], verb: str, resource: str, name: str | None) -> bool:
    """Whether one Role rule grants the request (core group only: this server serves no other)."""
    names = rule.get("resourceNames") or []
    return (
        bool({"", "*"} & set(rule.get("apiGroups") or []))
        and bool({verb, "*"} & set(rule.get("verbs") or []))
        and bool({resource, "*"} & set(rule.get("resources") or []))
        and (not names or name in names)
    )


class PodHistory:
    """Resource versions and watch events for pods that tests change by plain attribute writes.

    Each look (list, get, a watch's poll) compares every pod's manifest with the last one seen;
    a difference is a new revision and an ADDED, MODIFIED or DELETED event, as etcd would record.
    """

    def __init__(self) -> None:
        self.revision = 1
        self.compacted = 0  # watching from a revision at or below this one is "410 Expired"
        self.seen: dict[tuple[str, str], dict[str, Any]] = {}  # stamped with its resourceVersion
        self.events: list[tuple[int, str, dict[str, Any]]] = []  # (revision, type, object)

    def observe(self, pods: dict[tuple[str, str], FakePod]) -> None:
        for key, pod in pods.items():
            manifest, old = pod.manifest(), self.seen.get(key)
            if old is not None and old["metadata"]["uid"] != manifest["metadata"]["uid"]:
                self._record("DELETED", key, old)  # re-created under the same name
                old = None
            if old is not None and _without_version(old) == _without_version(manifest):
                continue
            self._record("ADDED" if old is None else "MODIFIED", key, manifest)
        for key in [key for key in self.seen if key not in pods]:
            self._record("DELETED", key, self.seen.pop(key))

    def _record(self, kind: str, key: tuple[str, str], manifest: dict[str, Any]) -> None:
        self.revision += 1
        manifest = json.loads(json.dumps(manifest))
        manifest["metadata"]["resourceVersion"] = str(self.revision)
        if kind != "DELETED":
            self.seen[key] = manifest
        self.events.append((self.revision, kind, manifest))


def _without_version(manifest: dict[str, Any]) -> dict[str, Any]:
    return {**manifest, "metadata": {**manifest["metadata"], "resourceVersion": ""}}


def query_bool(query: Any, name: str) -> bool:
    """Kubernetes' rule: missing, '0' or 'false' is false; anything else (even '') is true."""
    if name not in query:
        return False
    return query.getone(name).lower() not in ("0", "false")


class KubeApiServer:
    def __init__(self, workdir: Path, *, mode: str = "modern", tls: bool = True) -> None:
        assert mode in ("modern", "old")
        self.workdir = workdir
        self.mode = mode
        self.tls = tls
        self.pods: dict[tuple[str, str], FakePod] = {}
        self.deleted: list[FakePod] = []
        self.tokens: dict[str, str] = {}
        self.forbidden: set[tuple[str, str]] = set()  # (verb, resource) denied to everyone
        self.role_rules: dict[str, list[dict[str, Any]]] = {}  # user -> rules of the Roles bound
        self.requests: list[RecordedRequest] = []
        self.faults: list[Fault] = []
        self.history = PodHistory()
        self._stopping = False
        self.on_exec: Callable[[FakePod, list[str]], None] | None = None
        # An exec process's stdin stays open after its client left (a runtime that never closes
        # it), so a wrapper's dead-man switch cannot fire: only the kill exec can end it.
        self.keep_stdin_open = False
        # Seconds the "container runtime" takes to start each exec'd process. runc alone was
        # measured at 4-27 ms per exec (opencontainers/runc #4432, #4448); 0 models a free start.
        self.exec_start_delay = 0.0
        self.sessions: set[ExecSession] = set()  # exec streams open now
        self.spawns: set[asyncio.Future[Any]] = set()  # exec'd processes being started
        self.processes: list[asyncio.subprocess.Process] = []  # every exec'd process, for stop()
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._ca = trustme.CA()
        self._exec_tasks: set[asyncio.Task[Any]] = set()
        self._reapers: set[asyncio.Task[Any]] = set()

    def reap_later(self, process: asyncio.subprocess.Process) -> None:
        """A process left running (as a runtime would) is reaped whenever it ends."""

        async def reap() -> None:
            await process.wait()
            transport = getattr(process, "_transport", None)
            if transport is not None:
                transport.close()

        task = asyncio.create_task(reap())
        self._reapers.add(task)
        task.add_done_callback(self._reapers.discard)

    # ---- fixtures' interface -------------------------------------------------------------

    def add_pod(self, name: str, **kwargs: Any) -> FakePod:
        root = self.workdir / "pods" / name / uuid.uuid4().hex[:8]
        root.mkdir(parents=True)
        pod = FakePod(name=name, root=root, **kwargs)
        self.pods[(pod.namespace, name)] = pod
        return pod

    def delete_pod(self, name: str, namespace: str = "default") -> None:
        """Remove the pod and kill every process it ran, as the container runtime would."""
        pod = self.pods.pop((namespace, name))
        self.deleted.append(pod)
        kill_pod_processes(pod.uid)

    def add_token(self, token: str, user: str = "system:serviceaccount:default:session-proxy") -> None:
        self.tokens[token] = user

    def bind_role(self, user: str, role: dict[str, Any]) -> None:
        """Bind a Role manifest to ``user``: from now on it may do only what its Roles grant."""
        assert role["kind"] == "Role", role["kind"]
        self.role_rules.setdefault(user, []).extend(role.get("rules") or [])

    def allowed(self, user: str, verb: str, resource: str, name: str | None) -> bool:
        if (verb, resource) in self.forbidden:
            return False
        rules = self.role_rules.get(user)
        return rules is None or any(rule_allows(rule, verb, resource, name) for rule in rules)

    def exec_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/exec")]

    def abort_execs(self, pod: FakePod) -> int:
        """Drop every open exec connection to ``pod`` (no status, no close frame); how many."""
        dropped = [s for s in self.sessions if s.pod is pod]
        for session in dropped:
            session.abort()
        return len(dropped)

    @property
    def ca_pem(self) -> bytes:
        return self._ca.cert_pem.bytes()

    def write_ca(self, path: Path) -> Path:
        path.write_bytes(self.ca_pem)
        return path

    def write_kubeconfig(self, path: Path, token: str, namespace: str = "default") -> Path:
        cluster: dict[str, Any] = {"server": self.url}
        if self.tls:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca_pem).decode()
        context = {"cluster": "test", "user": "test", "namespace": namespace}
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": cluster}],
            "users": [{"name": "test", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": context}],
        }  # fmt: skip
        path.write_text(json.dumps(config))
        return path

    async def start(self) -> str:
        app = web.Application(middlewares=[self._record, self._faults, self._authenticate])
        app.router.add_get("/version", self._version)
        app.router.add_get("/api", self._api)
        app.router.add_get("/apis", self._apis)
        app.router.add_get("/api/v1", self._api_v1)
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._list_pods)
        app.router.add_get("/api/v1/namespaces/{ns}/pods/{name}", self._get_pod)
        app.router.add_get("/api/v1/namespaces/{ns}/pods/{name}/log", self._pod_log)
        app.router.add_route("*", "/api/v1/namespaces/{ns}/pods/{name}/exec", self._exec)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        context = None
        if self.tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        self._stopping = True  # ends open watches
        for task in list(self._exec_tasks):
            task.cancel()
        await asyncio.gather(*self._exec_tasks, return_exceptions=True)
        # A session cancelled mid-spawn abandons its process once spawned: wait for that, so the
        # process is killed and reaped below.
        await asyncio.gather(*self.spawns, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        for pod in [*self.pods.values(), *self.deleted]:
            kill_pod_processes(pod.uid)
        # Every exec'd process is ended and reaped here, even one that the scan above missed
        # (its environment unreadable as it exited): one collected unreaped later is a
        # ResourceWarning that fails whatever test is running then.
        for process in self.processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                self.reap_later(process)
        if self._reapers:
            await asyncio.wait(self._reapers, timeout=30)
        # An exited process's transport closes itself only once its pipe callbacks ran; close
        # every one that is left, so none is collected unclosed (a ResourceWarning) later.
        for process in self.processes:
            transport = getattr(process, "_transport", None)
            if transport is not None and process.returncode is not None:
                transport.close()

    # ---- middleware ----------------------------------------------------------------------

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(
            RecordedRequest(
                request.method,
                request.path,
                list(request.query.items()),
                dict(request.headers),
                request.raw_path,
            )
        )
        return await handler(request)

    @web.middleware
    async def _faults(self, request: web.Request, handler: Any) -> web.StreamResponse:
        for fault in self.faults:
            if fault.times == 0 or fault.path not in request.path:
                continue
            if fault.method and fault.method != request.method:
                continue
            if fault.user_agent and fault.user_agent not in request.headers.get("User-Agent", ""):
                continue
            if fault.drop_after_bytes is not None:
                request[DROP_AFTER] = fault.drop_after_bytes
            request[EXEC_FAULT] = fault
            if fault.times > 0:
                fault.times -= 1
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.hold is not None:
                await fault.hold.wait()
            if fault.status is not None:
                return status_response(fault.status, "InternalError", "injected failure")
        return await handler(request)

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/version":
            return await handler(request)  # public, as system:public-info-viewer
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else None
        if token is None or token not in self.tokens:
            return status_response(401, "Unauthorized", "Unauthorized")
        request[USER] = self.tokens[token]
        return await handler(request)

    def _deny(
        self, request: web.Request, verb: str, resource: str, name: str | None = None
    ) -> web.Response | None:
        if name is None and verb in ("list", "watch"):
            name = exact_name(request.query.get("fieldSelector", ""))
        if self.allowed(request[USER], verb, resource, name):
            return None
        ns = request.match_info.get("ns", "default")
        group, _, _sub = resource.partition("/")
        what = f'pods "{name}"' if name else "pods"
        message = (
            f'{what} is forbidden: User "{request[USER]}" cannot {verb} resource "{resource}" '
            f'in API group "" in the namespace "{ns}"'
        )
        return status_response(403, "Forbidden", message, name=name or "", group="", kind=group)

    # ---- discovery -----------------------------------------------------------------------

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"major": "1", "minor": "32", "gitVersion": "v1.32.4", "platform": "linux/amd64"}
        )

    async def _api(self, request: web.Request) -> web.Response:
        return web.json_response({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}],
        })  # fmt: skip

    async def _apis(self, request: web.Request) -> web.Response:
        return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": []})

    async def _api_v1(self, request: web.Request) -> web.Response:
        def resource(name: str, kind: str, verbs: list[str]) -> dict[str, Any]:
            return {"name": name, "singularName": "", "namespaced": True, "kind": kind, "verbs": verbs}

        return web.json_response({
            "kind": "APIResourceList", "groupVersion": "v1",
            "resources": [
                resource("pods", "Pod", ["get", "list", "watch"]),
                resource("pods/exec", "PodExecOptions", ["create", "get"]),
                resource("pods/log", "Pod", ["get"]),
            ],
        })  # fmt: skip

    # ---- pods ----------------------------------------------------------------------------

    async def _list_pods(self, request: web.Request) -> web.StreamResponse:
        if query_bool(request.query, "watch"):
            return await self._watch_pods(request)
        if denied := self._deny(request, "list", "pods"):
            return denied
        if field := unsupported_field(request.query.get("fieldSelector", "")):
            return status_response(400, "BadRequest", f'field label not supported: "{field}"')
        self.history.observe(self.pods)
        items = [manifest for _, _, manifest in self._matching(request, self.history.seen.values())]
        return web.json_response({
            "kind": "PodList", "apiVersion": "v1",
            "metadata": {"resourceVersion": str(self.history.revision)}, "items": items,
        })  # fmt: skip

    def _matching(
        self, request: web.Request, manifests: Any, kind: str = "ADDED", after: int = 0
    ) -> list[tuple[int, str, dict[str, Any]]]:
        """(revision, type, object) for the manifests in the request's namespace and selector."""
        ns, selector = request.match_info["ns"], request.query.get("labelSelector", "")
        fields = request.query.get("fieldSelector", "")
        found = []
        for manifest in sorted(manifests, key=lambda m: str(m["metadata"]["name"])):
            metadata = manifest["metadata"]
            revision = int(metadata["resourceVersion"])
            if (
                metadata["namespace"] == ns
                and matches_selector(metadata["labels"], selector)
                and matches_selector(pod_fields(metadata), fields)
                and revision > after
            ):
                found.append((revision, kind, manifest))
        return found

    async def _watch_pods(self, request: web.Request) -> web.StreamResponse:
        """``watch=true``: one JSON event per line from ``resourceVersion`` on (none or "0":
        the current pods as ADDED first), until ``timeoutSeconds``, as the API server does."""
        if denied := self._deny(request, "watch", "pods"):
            return denied
        if field := unsupported_field(request.query.get("fieldSelector", "")):
            return status_response(400, "BadRequest", f'field label not supported: "{field}"')
        self.history.observe(self.pods)
        since = request.query.get("resourceVersion", "")
        pending: list[tuple[int, str, dict[str, Any]]] = []
        if since in ("", "0"):
            pending = self._matching(request, self.history.seen.values())
            since = str(self.history.revision)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        if int(since) <= self.history.compacted:  # etcd compacted it: one ERROR event, then the end
            message = f"too old resource version: {since} ({self.history.compacted + 1})"
            error = {"type": "ERROR", "object": status_body(410, "Expired", message)}
            await response.write(json.dumps(error).encode() + b"\n")
            await response.write_eof()
            return response
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(request.query.get("timeoutSeconds") or 1800)
        last = int(since)
        with contextlib.suppress(ConnectionError):
            while not self._stopping and loop.time() < deadline:
                for revision, kind, manifest in pending:
                    await response.write(json.dumps({"type": kind, "object": manifest}).encode() + b"\n")
                    last = max(last, revision)
                await asyncio.sleep(0.02)
                self.history.observe(self.pods)
                pending = [
                    event
                    for revision, kind, manifest in self.history.events
                    if revision > last
                    for event in self._matching(request, [manifest], kind, last)
                ]
            await response.write_eof()
        return response

    def _pod_or_404(self, request: web.Request) -> FakePod | web.Response:
        name = request.match_info["name"]
        pod = self.pods.get((request.match_info["ns"], name))
        if pod is None:
            return status_response(404, "NotFound", f'pods "{name}" not found', name=name, kind="pods")
        return pod

    async def _get_pod(self, request: web.Request) -> web.Response:
        if denied := self._deny(request, "get", "pods", request.match_info["name"]):
            return denied
        pod = self._pod_or_404(request)
        if isinstance(pod, web.Response):
            return pod
        self.history.observe(self.pods)
        return web.json_response(self.history.seen[(pod.namespace, pod.name)])

    async def _pod_log(self, request: web.Request) -> web.Response:
        if denied := self._deny(request, "get", "pods/log", request.match_info["name"]):
            return denied
        pod = self._pod_or_404(request)
        if isinstance(pod, web.Response):
            return pod
        lines = pod.log_lines
        if "tailLines" in request.query:
            lines = lines[-int(request.query["tailLines"]) :] if int(request.query["tailLines"]) else []
        text = "".join(line + "\n" for line in lines).encode()
        if "limitBytes" in request.query:  # the first limitBytes bytes of what would be sent
            text = text[: int(request.query["limitBytes"])]
        return web.Response(body=text, content_type="text/plain")

    # ---- exec ----------------------------------------------------------------------------

    async def _exec(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        for verb in ("get", "create") if self.mode == "modern" else ("get",):
            if denied := self._deny(request, verb, "pods/exec", name):
                return denied
        pod = self._pod_or_404(request)
        if isinstance(pod, web.Response):
            return pod
        query = request.query
        container = query.get("container")
        if container is None:
            if len(pod.containers) != 1:
                return status_response(
                    400, "BadRequest",
                    f"a container name must be specified for pod {name}, choose one of: {pod.containers}",
                )  # fmt: skip
            container = pod.containers[0]
        if container not in pod.containers:
            return status_response(400, "BadRequest", f"container {container} is not valid for pod {name}")
        streams = {s: query_bool(query, s) for s in ("stdin", "stdout", "stderr")}
        if not any(streams.values()):
            return status_response(400, "BadRequest", "you must specify at least 1 of stdin, stdout, stderr")
        if request.method == "POST":  # SPDY (kubectl's fallback) is not spoken here
            return status_response(400, "BadRequest", "SPDY is not supported by this test server")
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return status_response(400, "BadRequest", "Upgrade request required")
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        supported = [V5, V4] if self.mode == "modern" else [V4]
        chosen = next((p for p in offered if p in supported), None)
        if chosen is None:
            return web.Response(status=403)  # the handshake rejects: empty body
        if (not pod.container_running or pod.container_gone) and chosen == V4:
            # The CRI streaming server refuses with a plain-text 500 (k8s.io/kubelet
            # pkg/cri/streaming/errors.go WriteError) and the API server's UpgradeAwareHandler
            # passes a non-101 answer through (apimachinery pkg/util/proxy/upgradeaware.go).
            return web.Response(status=500, text=f'container not found ("{container}")')
        # Pings are answered by hand (ExecSession.receive), so that faults can see and drop them.
        ws = web.WebSocketResponse(protocols=(chosen,), max_msg_size=0, autoping=False)
        await ws.prepare(request)
        session = ExecSession(self, pod, ws, chosen, query.getall("command", []), streams, request)
        task = asyncio.current_task()
        assert task is not None
        self._exec_tasks.add(task)
        self.sessions.add(session)
        try:
            await session.run(container)
        finally:
            self.sessions.discard(session)
            self._exec_tasks.discard(task)
        return ws


def kill_pod_processes(pod_uid: str) -> None:
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.environ().get("FAKE_POD_UID") == pod_uid:
                process.kill()


class ExecSession:
    """One exec stream: a real process wired to WebSocket channels."""

    def __init__(
        self, server: KubeApiServer, pod: FakePod, ws: web.WebSocketResponse, protocol: str,
        command: list[str], streams: dict[str, bool], request: web.Request,
    ) -> None:  # fmt: skip
        self.server = server
        self.pod = pod
        self.ws = ws
        self.protocol = protocol
        self.command = command
        self.streams = streams
        self.drop_after = request.get(DROP_AFTER)
        self.fault = request.get(EXEC_FAULT) or Fault(path="")
        self.stdin_frames = 0
        self.sent = 0
        self.process: asyncio.subprocess.Process | None = None
        self.last_frame = asyncio.get_running_loop().time()  # either way, pings included

    def abort(self) -> None:
        """The connection dies, with no status and no close frame."""
        transport = self.ws._req.transport if self.ws._req else None
        if transport is not None:
            transport.abort()

    async def send(self, channel: int, data: bytes) -> None:
        if self.drop_after is not None and self.sent + len(data) > self.drop_after:
            self.abort()  # fault: the connection dies mid-output
            raise ConnectionResetError("injected drop")
        self.sent += len(data)
        self.last_frame = asyncio.get_running_loop().time()
        await self.ws.send_bytes(bytes([channel]) + data)

    async def status(self, body: dict[str, Any]) -> None:
        if self.fault.no_status:
            self.abort()
            return
        with contextlib.suppress(ConnectionError):
            await self.ws.send_bytes(b"\x03" + json.dumps(body).encode())
        await self.ws.close()

    async def cut_when_idle(self, after: float) -> None:
        """Fault: close the connection once no frame went either way for ``after`` seconds."""
        loop = asyncio.get_running_loop()
        while not self.ws.closed:
            await asyncio.sleep(after / 20)
            if loop.time() - self.last_frame >= after:
                self.abort()
                return

    async def run(self, container: str) -> None:
        watchdog = None
        if self.fault.idle_cut is not None:
            watchdog = asyncio.create_task(self.cut_when_idle(self.fault.idle_cut))
        try:
            await self.serve(container)
        finally:
            if watchdog is not None:
                watchdog.cancel()
                await asyncio.gather(watchdog, return_exceptions=True)

    async def serve(self, container: str) -> None:
        with contextlib.suppress(ConnectionError):
            await self.ws.send_bytes(b"\x01" if self.streams["stdout"] else b"\x02")
            if self.fault.frame_bytes:
                await self.ws.send_bytes(b"\x01" + b"z" * self.fault.frame_bytes)
        if self.fault.stall:  # upgraded, then nothing: only pings are answered
            async for message in self.ws:
                await self.on_control(message)
            return
        if not self.pod.container_running or self.pod.container_gone:  # v5: reported after the upgrade
            message = f'unable to upgrade connection: container not found ("{container}")'
            await self.status(internal_error(message))
            return
        if self.server.on_exec is not None:
            self.server.on_exec(self.pod, self.command)
        argv = list(self.command)
        if self.pod.shell and argv and argv[0] == "/bin/sh":
            argv = [*self.pod.shell.split(), *argv[1:]]
        if self.server.exec_start_delay:
            await asyncio.sleep(self.server.exec_start_delay)
        try:
            # Shielded: a session cancelled mid-spawn (the server stopping) must not drop a
            # running process's transport unreaped; it is abandoned as a runtime would leave it.
            spawn = asyncio.ensure_future(
                asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.PIPE if self.streams["stdin"] else asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE if self.streams["stdout"] else asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE if self.streams["stderr"] else asyncio.subprocess.DEVNULL,
                    cwd=self.pod.root,
                    env={
                        "PATH": self.pod.path,
                        "HOME": "/root",
                        "HOSTNAME": self.pod.name,
                        "FAKE_POD_UID": self.pod.uid,
                    },
                    start_new_session=True,
                )
            )
            self.server.spawns.add(spawn)
            spawn.add_done_callback(self.server.spawns.discard)
            self.process = await asyncio.shield(spawn)
            self.server.processes.append(self.process)
        except asyncio.CancelledError:
            spawn.add_done_callback(self.abandon)
            raise
        except OSError as error:
            await self.status(exec_failure(self.command, error))
            return
        await self.pump()

    def abandon(self, spawn: asyncio.Future[asyncio.subprocess.Process]) -> None:
        """A process started for a session that is gone: its pipes closed (stdin EOF), reaped later."""
        if spawn.cancelled() or spawn.exception() is not None:
            return
        self.process = spawn.result()
        self.server.processes.append(self.process)
        self.close_pipes()
        self.server.reap_later(self.process)

    async def pump(self) -> None:
        process = self.process
        assert process is not None
        outputs = [
            asyncio.create_task(self.forward(reader, channel))
            for reader, channel in ((process.stdout, 1), (process.stderr, 2))
            if reader is not None
        ]
        inputs = asyncio.create_task(self.receive())
        try:
            done = await asyncio.gather(*outputs, return_exceptions=True)
            if any(isinstance(result, BaseException) for result in done) or self.ws.closed:
                # Client gone or stream dropped: the process is left to run, as containerd does
                # (internal/cri/server/container_execsync.go, comment on execInContainer: "if the
                # `kubectl exec -it` process is killed, IO will be closed ... still have a
                # goroutine waiting for the exec process to exit"; kubernetes/kubernetes#89031).
                return
            code = await process.wait()
            await self.status(exit_status(code, self.protocol))
        finally:
            for task in [*outputs, inputs]:
                task.cancel()
            await asyncio.gather(*outputs, inputs, return_exceptions=True)
            self.close_pipes()
            if process.returncode is None:
                self.server.reap_later(process)
            else:
                await process.wait()

    async def forward(self, reader: asyncio.StreamReader, channel: int) -> None:
        lag = self.fault.stdout_lag if channel == 1 else 0.0
        while data := await reader.read(READ_SIZE):
            if lag:
                await asyncio.sleep(lag)
            await self.send(channel, data)

    async def receive(self) -> None:
        process = self.process
        assert process is not None
        async for message in self.ws:
            if await self.on_control(message) or not message.data:
                continue
            channel, payload = message.data[0], message.data[1:]
            if channel == 0 and process.stdin is not None and not process.stdin.is_closing():
                with contextlib.suppress(ConnectionError):
                    process.stdin.write(payload)
                    await process.stdin.drain()
                self.stdin_frames += 1
                if self.stdin_frames == self.fault.close_stdin_after_frames:
                    process.stdin.close()  # as an API server half-closing stdin upstream
            elif channel == 255 and self.protocol == V5 and payload == b"\x00" and process.stdin:
                process.stdin.close()
        # The client went away: stdin EOF and the output pipes closed; the process keeps running.
        self.close_pipes()

    async def on_control(self, message: Any) -> bool:
        """Note the frame and answer a ping (unless told not to); True if it was not data."""
        self.last_frame = asyncio.get_running_loop().time()
        if message.type == WSMsgType.PING and not self.fault.ignore_pings:
            with contextlib.suppress(ConnectionError):
                await self.ws.pong(message.data)
        return bool(message.type != WSMsgType.BINARY)

    def close_pipes(self) -> None:
        process = self.process
        if process is None:
            return
        if process.stdin is not None and not self.server.keep_stdin_open:
            process.stdin.close()
        transport = getattr(process, "_transport", None)
        if transport is not None:
            for fd in (1, 2):
                pipe = transport.get_pipe_transport(fd)
                if pipe is not None:
                    pipe.close()


def internal_error(message: str) -> dict[str, Any]:
    return {
        "metadata": {}, "status": "Failure", "message": f"Internal error occurred: {message}",
        "reason": "InternalError", "details": {"causes": [{"message": message}]}, "code": 500,
    }  # fmt: skip


def exec_failure(command: list[str], error: OSError) -> dict[str, Any]:
    program = command[0] if command else ""
    detail = (
        "executable file not found in $PATH" if isinstance(error, FileNotFoundError) else "permission denied"
    )
    return internal_error(
        "error executing command in container: failed to exec in container: failed to start exec "
        f'"{uuid.uuid4().hex}": OCI runtime exec failed: exec failed: unable to start container '
        f'process: exec: "{program}": {detail}: unknown'
    )


def exit_status(code: int, protocol: str) -> dict[str, Any]:
    if code < 0:
        code = 128 - code  # a signal death is 128+N: runc libcontainer/utils ExitStatus
    if code == 0:
        return {"metadata": {}, "status": "Success"}
    if protocol == V5:
        inner = f"command terminated with exit code {code}"
    else:
        inner = f"error executing command [...], exit code {code}"
    return {
        "metadata": {}, "status": "Failure",
        "message": f"command terminated with non-zero exit code: {inner}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    }  # fmt: skip


async def _serve_by_hand(directory: Path, mode: str, exec_start_delay: float = 0.0) -> None:
    server = KubeApiServer(directory, mode=mode)
    server.exec_start_delay = exec_start_delay
    server.add_token("demo-token")
    pod = server.add_pod("workspace-demo", labels={"session": "demo", "type": "workspace"})
    await server.start()
    config = server.write_kubeconfig(directory / "kubeconfig", "demo-token")
    print(f"Kubernetes API test server ({mode}) at {server.url}", flush=True)
    print(f"kubeconfig: {config}  (pod workspace-demo runs commands in {pod.root})", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


if __name__ == "__main__":
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="Run the Kubernetes API test server by hand.")
    parser.add_argument("--dir", type=Path, default=None, help="where to put pods and the kubeconfig")
    parser.add_argument("--mode", choices=["modern", "old"], default="modern")
    parser.add_argument(
        "--exec-start-delay", type=float, default=0.0, help="seconds before each exec'd process starts"
    )
    arguments = parser.parse_args()
    folder = arguments.dir or Path(tempfile.mkdtemp(prefix="kube-api-"))
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_by_hand(folder, arguments.mode, arguments.exec_start_delay))
