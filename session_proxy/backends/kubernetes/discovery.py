"""Finding the session's workspace pod, and deciding whether it may be used.

The caller never names a pod: the target is the one pod in our namespace that matches the
configured selector (and, when the pod's name is configured, has that name), is Running and
Ready, is not being deleted, has the target container running and, when an owner is
configured, is owned by it. The answer is cached briefly; a deleted and re-created pod is
found again on the next look.

With the name configured, every list and watch names the pod by a ``metadata.name`` field
selector: that is how the API server lets a Role that grants list and watch only on
``resourceNames: [<pod>]`` through, so a session's token can see no other pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from ...settings import Settings
from .api import KubeApi
from .api_errors import Forbidden, NotFound

CACHE_SECONDS: Final = 2.0
# Without a watch (the Role lacks it), or when the API server ends watches at once.
POLL_SECONDS: Final = 1.0
# While a request waits, it is told why at least every 5 s (clients and proxies see progress).
WAITING_EVERY: Final = 4.5

ProblemKind = Literal["not_found", "ambiguous", "not_ready", "terminating", "wrong_owner"]
# Problems that waiting does not solve: reported at once.
SETTLED: Final = frozenset({"ambiguous", "wrong_owner"})


@dataclass(frozen=True)
class WorkspaceProblem:
    """Why no pod can be used now; the backend decides what the caller is told."""

    kind: ProblemKind
    message: str


@dataclass(frozen=True)
class Workspace:
    namespace: str
    name: str
    uid: str
    container: str
    image: str
    phase: str
    ready: bool
    restarts: int
    problem: str | None  # why it cannot be used now; None when usable
    terminating: bool = False
    wrong_owner: str | None = None

    @property
    def usable(self) -> bool:
        return self.problem is None

    def describe(self) -> dict[str, Any]:
        return {
            "pod": self.name, "namespace": self.namespace, "container": self.container,
            "uid": self.uid, "phase": self.phase, "ready": self.ready, "image": self.image,
            "restarts": self.restarts, "problem": self.problem,
        }  # fmt: skip


def _condition(pod: dict[str, Any], kind: str) -> bool:
    for condition in pod.get("status", {}).get("conditions") or []:
        if condition.get("type") == kind:
            return bool(condition.get("status") == "True")
    return False


def owner_problem(pod: dict[str, Any], settings: Settings) -> str | None:
    """None if the pod is owned as configured, else what is wrong."""
    if not settings.owner_kind:
        return None
    for reference in pod["metadata"].get("ownerReferences") or []:
        group = str(reference.get("apiVersion", "")).rpartition("/")[0]
        if (
            reference.get("kind") == settings.owner_kind
            and group == settings.owner_api_group
            and reference.get("name") == settings.owner_name
            and (settings.owner_uid is None or reference.get("uid") == settings.owner_uid)
        ):
            return None
    owner = f"{settings.owner_kind} {settings.owner_name!r}"
    if settings.owner_api_group:
        owner += f" (group {settings.owner_api_group})"
    if settings.owner_uid:
        owner += f" uid {settings.owner_uid}"
    return f"pod {pod['metadata']['name']} is not owned by {owner}"


def assess(pod: dict[str, Any], settings: Settings) -> Workspace:
    metadata, status = pod["metadata"], pod.get("status", {})
    container = settings.workspace_container
    statuses = {s.get("name"): s for s in status.get("containerStatuses") or []}
    container_status = statuses.get(container, {})
    state = container_status.get("state") or {}
    phase = status.get("phase", "Unknown")
    ready = _condition(pod, "Ready")
    terminating = bool(metadata.get("deletionTimestamp"))
    images = {c.get("name"): c.get("image", "") for c in pod.get("spec", {}).get("containers") or []}
    problem: str | None = None
    wrong_owner = owner_problem(pod, settings)
    if wrong_owner:
        problem = wrong_owner
    elif terminating:
        problem = f"pod {metadata['name']} is terminating"
    elif container not in images:
        problem = f"pod {metadata['name']} has no container {container!r}"
    elif phase != "Running":
        reason = (state.get("waiting") or {}).get("reason")
        problem = f"pod {metadata['name']} is {phase}" + (f" ({reason})" if reason else "")
    elif "running" not in state:
        reason = (state.get("waiting") or {}).get("reason", "not running")
        problem = f"container {container} in pod {metadata['name']} is waiting: {reason}"
    elif not ready:
        problem = f"pod {metadata['name']} is not Ready"
    return Workspace(
        namespace=metadata.get("namespace", settings.namespace or "default"),
        name=metadata["name"],
        uid=metadata.get("uid", ""),
        container=container,
        image=images.get(container, ""),
        phase=phase,
        ready=ready,
        restarts=int(container_status.get("restartCount", 0)),
        problem=problem,
        terminating=terminating,
        wrong_owner=wrong_owner,
    )


def pod_query(settings: Settings) -> dict[str, str]:
    """The list and watch parameters that select the workspace pod: its labels and, when it is
    named, its name (what a Role with resourceNames needs to allow a list or a watch)."""
    query = {}
    if selector := settings.effective_workspace_selector:
        query["labelSelector"] = selector
    if settings.workspace_pod:
        query["fieldSelector"] = f"metadata.name={settings.workspace_pod}"
    return query


class WorkspaceLocator:
    def __init__(self, api: KubeApi, settings: Settings) -> None:
        self._api = api
        self._settings = settings
        self._namespace = settings.namespace or "default"
        self._query = pod_query(settings)
        if not self._query:
            raise ValueError("workspace_selector: set it, --workspace-pod, or SESSION_NAME to derive it")
        self._cached: Workspace | None = None
        self._cached_at = 0.0

    def forget(self) -> None:
        self._cached = None

    @property
    def _pods_path(self) -> str:
        return f"/api/v1/namespaces/{self._namespace}/pods"

    async def _list(self) -> tuple[dict[str, Workspace], str]:
        """The matching pods by uid, and the resourceVersion to watch them from."""
        document = await self._api.get_json(self._pods_path, self._query)
        pods = [assess(pod, self._settings) for pod in document.get("items") or []]
        version = str((document.get("metadata") or {}).get("resourceVersion") or "")
        return {pod.uid: pod for pod in pods}, version

    async def candidates(self) -> list[Workspace]:
        return list((await self._list())[0].values())

    async def pod_state(self, name: str) -> dict[str, Any] | None:
        """The pod's current manifest, or None if it is gone."""
        try:
            return await self._api.get_json(f"/api/v1/namespaces/{self._namespace}/pods/{name}")
        except NotFound:
            return None

    async def find(
        self, on_waiting: Callable[[str], Awaitable[None]], until: float
    ) -> Workspace | WorkspaceProblem:
        """The usable workspace, or why there is none; while it is starting, waits (saying why
        at least every WAITING_EVERY seconds) until the loop time ``until``."""
        if self._cached is not None and time.monotonic() - self._cached_at < CACHE_SECONDS:
            return self._cached
        loop = asyncio.get_running_loop()
        told_at = float("-inf")
        told = ""
        pods, version = await self._list()
        while True:
            found = self.choose(list(pods.values()))
            if isinstance(found, Workspace):
                self._cached, self._cached_at = found, time.monotonic()
                return found
            now = loop.time()
            if found.kind in SETTLED or now >= until:
                return found
            if found.message != told or now - told_at >= WAITING_EVERY:
                told, told_at = found.message, now
                await on_waiting(found.message)
            version = await self._next_change(pods, version, min(until, told_at + WAITING_EVERY))
            if not version:
                pods, version = await self._list()

    async def _next_change(self, pods: dict[str, Workspace], version: str, until: float) -> str:
        """Watch the pods from ``version`` until one changes (applied to ``pods``) or the loop
        time ``until``; the version to go on from, or "" when the pods must be listed again."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        query = {**self._query, "resourceVersion": version, "allowWatchBookmarks": "true"}
        try:
            async with asyncio.timeout_at(until):
                watch = self._api.watch(self._pods_path, query, until - started)
                async with contextlib.aclosing(watch) as events:
                    async for event in events:
                        version, changed = self._apply(event, pods)
                        if changed and version:
                            return version
                        if changed:
                            break  # list again, after the pause below
        except TimeoutError:
            return version
        except Forbidden:  # a Role without "watch": poll instead
            version = ""
        # The watch ended early or was refused: pause, so a server that does that at once
        # every time cannot make us spin.
        await asyncio.sleep(max(0.0, min(POLL_SECONDS - (loop.time() - started), until - loop.time())))
        return version

    def _apply(self, event: dict[str, Any], pods: dict[str, Workspace]) -> tuple[str, bool]:
        """Apply a watch event to ``pods``: the version it brings ("" to list again), and
        whether the pods may have changed (a bookmark only moves the version on)."""
        try:
            kind, manifest = event["type"], event["object"]
            if kind == "ERROR":
                return "", True  # e.g. 410 Gone: the version is too old to watch from
            version = str(manifest["metadata"]["resourceVersion"])
            if kind == "BOOKMARK":
                return version, False
            workspace = assess(manifest, self._settings)
        except (KeyError, TypeError, AttributeError):
            return "", True  # not the event it should be: start again from a list
        if kind == "DELETED":
            pods.pop(workspace.uid, None)
        else:
            pods[workspace.uid] = workspace
        return version, True

    def choose(self, candidates: list[Workspace]) -> Workspace | WorkspaceProblem:
        """The one usable pod among the candidates, or what is wrong with them."""
        wanted = " and ".join(f"{key} {value!r}" for key, value in self._query.items())
        where = f"{wanted} in namespace {self._namespace}"
        owned = [c for c in candidates if not c.wrong_owner]
        if candidates and not owned:
            return WorkspaceProblem(
                "wrong_owner",
                f"refusing to exec: {candidates[0].wrong_owner}; the proxy only execs into its "
                "own session's workspace",
            )
        live = [c for c in owned if not c.terminating]
        usable = [c for c in live if c.usable]
        if len(usable) == 1:
            return usable[0]
        if len(usable) > 1:
            names = ", ".join(sorted(c.name for c in usable))
            return WorkspaceProblem(
                "ambiguous", f"several workspace pods match {where} ({names}); exactly one must"
            )
        if live:
            return WorkspaceProblem("not_ready", f"workspace not ready: {live[0].problem}")
        if owned:
            return WorkspaceProblem(
                "terminating",
                f"the workspace pod is terminating ({owned[0].name}); retry once it is replaced",
            )
        return WorkspaceProblem("not_found", f"no workspace pod matches {where}")
