"""The ``kubernetes`` backend: each command runs in the session's workspace pod via exec."""

from __future__ import annotations

import asyncio
import logging
import math
import re
from dataclasses import dataclass
from typing import Final

import aiohttp

from ... import __version__
from ...errors import BackendFailure, InvalidRequest, NotReady
from ...metrics import Metrics
from ...models import Guarantees
from ...settings import Settings
from ..base import BackendInfo, ExecSpec, ExitStatus, WaitingCallback
from .api import ConfigurationError, KubeApi, KubeApiError
from .discovery import Workspace, WorkspaceLocator, assess
from .execution import KubernetesExecution, explain_exec_failure, parse_status
from .wrapper import KILL_SCRIPT, PROBE_SCRIPT, SHELL, WRAPPER_SCRIPT, encode_header, new_nonce

log = logging.getLogger(__name__)

# The wrapper's own deadline is a backstop, later than the proxy's, so the proxy's wins.
BACKSTOP_MARGIN: Final = 5
PROBE_TIMEOUT: Final = 30.0
NO_GUARANTEES: Final = Guarantees(workdir=False, env=False, stdin=False, kill=False)
# How runtimes say that the program of an exec does not exist (runc/crun wording).
_EXEC_NOT_FOUND: Final = re.compile(r"executable file not found|no such file or directory", re.IGNORECASE)


@dataclass(frozen=True)
class ImageTools:
    """What the workspace image offers the wrapper, found once per pod."""

    has_shell: bool
    missing: tuple[str, ...]

    @property
    def guarantees(self) -> Guarantees:
        if not self.has_shell:
            return NO_GUARANTEES
        complete = not self.missing
        return Guarantees(workdir=True, env=True, stdin="head" not in self.missing, kill=complete)


class KubernetesBackend:
    name = "kubernetes"

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._api = KubeApi(settings, self._count_error, metrics.observe_kubernetes_api)
        self._locator = WorkspaceLocator(self._api, settings)
        self._tools: dict[str, ImageTools] = {}

    def _count_error(self, kind: str) -> None:
        self._metrics.kubernetes_api_errors.labels(kind=kind).inc()

    async def open(self) -> None:
        await self._api.open()

    async def close(self) -> None:
        await self._api.close()

    # ---- exec ----------------------------------------------------------------------------

    async def start(self, spec: ExecSpec, on_waiting: WaitingCallback) -> KubernetesExecution:
        workspace = await self._find(on_waiting)
        tools = await self._image_tools(workspace)
        self._refuse_unsupported(spec, tools)
        target = f"{workspace.namespace}/{workspace.name}/{workspace.container}"
        if not tools.has_shell:
            return await self._start_bare(spec, workspace, target)
        nonce = new_nonce()
        header = encode_header(
            nonce=nonce,
            argv=spec.argv,
            workdir=spec.workdir,
            env=spec.env,
            stdin_length=len(spec.stdin or b""),
            deadline=math.ceil(spec.timeout) + math.ceil(self._settings.kill_grace) + BACKSTOP_MARGIN,
            grace=math.ceil(self._settings.kill_grace),
        )
        websocket = await self._open(workspace, [SHELL, "-c", WRAPPER_SCRIPT], spec.exec_id, stdin=True)
        return KubernetesExecution(
            websocket,
            target=target,
            guarantees=tools.guarantees,
            nonce=nonce,
            kill_group=lambda pgid, grace: self._kill_group(workspace, pgid, grace, spec.exec_id),
            explain_lost_stream=lambda status: self._explain_lost_stream(workspace, status),
            stdin=header + (spec.stdin or b""),
            program=spec.argv[0],
        )

    async def _start_bare(self, spec: ExecSpec, workspace: Workspace, target: str) -> KubernetesExecution:
        # No shell in the image: the argv must go in the URL, and nothing can be killed.
        websocket = await self._open(workspace, spec.argv, spec.exec_id, stdin=False)
        return KubernetesExecution(
            websocket,
            target=target,
            guarantees=NO_GUARANTEES,
            nonce=None,
            kill_group=self._cannot_kill,
            explain_lost_stream=lambda status: self._explain_lost_stream(workspace, status),
            stdin=None,
        )

    @staticmethod
    async def _cannot_kill(pgid: int, grace: float) -> None:
        return None

    def _refuse_unsupported(self, spec: ExecSpec, tools: ImageTools) -> None:
        if tools.has_shell and tools.guarantees.stdin:
            return
        lacking = "no /bin/sh" if not tools.has_shell else f"no {', '.join(tools.missing)}"
        asked = [
            name
            for name, wanted in (
                ("workdir", spec.workdir and not tools.has_shell),
                ("env", spec.env and not tools.has_shell),
                ("stdin", spec.stdin is not None),
            )
            if wanted
        ]
        if asked:
            raise InvalidRequest(
                f"the workspace image has {lacking}, so {', '.join(asked)} cannot be given",
                [
                    {"field": name, "reason": f"not supported: the workspace image has {lacking}"}
                    for name in asked
                ],
            )

    async def _find(self, on_waiting: WaitingCallback) -> Workspace:
        try:
            workspace = await self._locator.find(on_waiting)
        except KubeApiError as error:
            raise self._api_failure(error) from None
        self._metrics.workspace_ready.set(1)
        return workspace

    def _api_failure(self, error: KubeApiError) -> BackendFailure | NotReady:
        if error.status is None or error.status >= 500 or error.status == 429:
            return NotReady(
                f"Kubernetes API unavailable: {error.message}", retry_after=5, code="api_unavailable"
            )
        return BackendFailure(f"Kubernetes API refused the request ({error.status}): {error.message}")

    async def _open(
        self, workspace: Workspace, argv: list[str], exec_id: str, *, stdin: bool
    ) -> aiohttp.ClientWebSocketResponse:
        url = self._api.exec_url(workspace.namespace, workspace.name, workspace.container, argv, stdin=stdin)
        try:
            return await self._api.open_exec(url, f"session-proxy/{__version__} exec_id={exec_id}")
        except KubeApiError as error:
            if error.status == 404:
                self._locator.forget()
                raise NotReady(error.message, retry_after=1, code="workspace_not_found") from None
            if error.status == 500:
                self._locator.forget()
                raise NotReady(error.message, retry_after=2, code="workspace_not_ready") from None
            raise self._api_failure(error) from None

    async def _run_small(
        self, workspace: Workspace, script: str, stdin: bytes, exec_id: str
    ) -> tuple[bytes, ExitStatus | None]:
        """Run a short fixed script to completion; its stdout and its status."""
        websocket = await self._open(workspace, [SHELL, "-c", script], exec_id, stdin=bool(stdin))
        output, status = bytearray(), bytearray()
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                if stdin:
                    await websocket.send_bytes(b"\x00" + stdin)
                async for message in websocket:
                    if message.type == aiohttp.WSMsgType.BINARY and len(message.data) > 1:
                        if message.data[0] == 1:
                            output += message.data[1:]
                        elif message.data[0] == 3:
                            status += message.data[1:]
        finally:
            await websocket.close()
        return bytes(output), parse_status(bytes(status))

    async def _image_tools(self, workspace: Workspace) -> ImageTools:
        cached = self._tools.get(workspace.uid)
        if cached is not None:
            return cached
        output, status = await self._run_small(workspace, PROBE_SCRIPT, b"", "probe")
        if status is not None and status.reason == "error":
            message = status.message or ""
            if "container not found" in message:  # the pod outran discovery: not cached
                self._locator.forget()
                raise NotReady(f"workspace not ready: {message}", retry_after=2, code="workspace_not_ready")
            if SHELL not in message or not _EXEC_NOT_FOUND.search(message):
                raise BackendFailure(f"cannot inspect the workspace image: {message}")
            tools = ImageTools(has_shell=False, missing=())
        else:
            tools = ImageTools(has_shell=True, missing=tuple(output.decode(errors="replace").split()))
        if tools.missing or not tools.has_shell:
            log.warning(
                "workspace image lacks tools",
                extra={"pod": workspace.name, "missing": tools.missing or ["sh"]},
            )
        self._tools[workspace.uid] = tools
        return tools

    async def _kill_group(self, workspace: Workspace, pgid: int, grace: float, exec_id: str) -> None:
        """The second exec: TERM the group, wait up to the grace, then KILL."""
        stdin = f"{pgid}\n{math.ceil(grace)}\n".encode()
        await self._run_small(workspace, KILL_SCRIPT, stdin, f"{exec_id}-kill")

    async def _explain_lost_stream(self, workspace: Workspace, status: ExitStatus | None) -> ExitStatus:
        if status is not None and status.reason == "error":
            return explain_exec_failure(status)
        self._locator.forget()
        try:
            pod = await self._locator.pod_state(workspace.name)
        except KubeApiError:
            pod = {"metadata": {"uid": workspace.uid}}  # cannot tell: assume it is still there
        if pod is None or pod["metadata"].get("uid") != workspace.uid:
            return ExitStatus(None, reason="pod_gone", message=f"pod {workspace.name} was deleted")
        if pod.get("status") and assess(pod, self._settings).terminating:
            return ExitStatus(None, reason="pod_gone", message=f"pod {workspace.name} is terminating")
        if status is not None and self._tools.get(workspace.uid, ImageTools(True, ())).has_shell is False:
            return status  # a bare exec: the stream's own status is all there is
        detail = f" (its status said exit code {status.exit_code})" if status and status.exit_code else ""
        return ExitStatus(
            None,
            reason="transport_lost",
            message="the exec stream ended before the command reported its exit" + detail,
        )

    # ---- status ---------------------------------------------------------------------------

    async def info(self) -> BackendInfo:
        target: dict[str, object] = {"selector": self._settings.effective_workspace_selector}
        try:
            candidates = await self._locator.candidates()
        except (KubeApiError, ConfigurationError) as error:
            self._metrics.workspace_ready.set(0)
            target["error"] = str(error)
            return BackendInfo(self.name, ready=False, target=target)
        usable = [c for c in candidates if c.usable]
        target["pods"] = [c.describe() for c in candidates]
        ready = len(usable) == 1
        self._metrics.workspace_ready.set(1 if ready else 0)
        return BackendInfo(self.name, ready=ready, target=target)

    async def logs(self, tail: int) -> str:
        try:
            live = [c for c in await self._locator.candidates() if not c.terminating]
        except KubeApiError as error:
            raise self._api_failure(error) from None
        if not live:
            raise NotReady("no workspace pod to read logs from", retry_after=5, code="workspace_not_found")
        workspace = live[0]
        path = f"/api/v1/namespaces/{workspace.namespace}/pods/{workspace.name}/log"
        query = {"container": workspace.container, "tailLines": str(tail)}
        try:
            return await self._api.get_text(path, query)
        except KubeApiError as error:
            raise self._api_failure(error) from None
