"""The ``kubernetes`` backend: each command runs in the session's workspace pod via exec.

A request's ``timeout`` counts from its arrival (``ExecSpec.deadline``): waiting for the pod
(capped by ``--workspace-wait``) and probing the image come out of it, and a command whose
deadline passed before it could start is not started at all.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Final

from ... import __version__
from ...metrics import Metrics
from ...settings import Settings
from ..base import BackendInfo, ExecSpec, ExitStatus, WaitingCallback
from . import refusals
from .api import KubeApi
from .api_errors import KubeError
from .discovery import Workspace, WorkspaceLocator, WorkspaceProblem, assess
from .exec_stream import STDOUT, ExecStream
from .execution import AfterExit, KubernetesExecution, explain_exec_failure
from .image_probe import NO_GUARANTEES, ImageTools, Inconclusive, read_probe
from .supervised import SupervisedExecution, read_supervisor_probe, supervisor_header
from .warm_pool import WarmPool, WorkspaceReplaced
from .wrapper import KILL_SCRIPT, PROBE_SCRIPT, SHELL, WRAPPER_SCRIPT, encode_header, new_nonce

log = logging.getLogger(__name__)

# The wrapper's own deadline is a backstop, later than the proxy's, so the proxy's wins.
BACKSTOP_MARGIN: Final = 5
PROBE_TIMEOUT: Final = 30.0
PROBE_OUTPUT_LIMIT: Final = 64 * 1024
LOG_LIMIT_BYTES: Final = 1024 * 1024


class KubernetesBackend:
    name = "kubernetes"

    def __init__(self, settings: Settings, metrics: Metrics, after_exit: AfterExit | None = None) -> None:
        self._settings = settings
        self._after_exit = after_exit or AfterExit()
        self._metrics = metrics
        self._api = KubeApi(
            settings,
            self._count_error,
            metrics.observe_kubernetes_api,
            on_token_changed=self._drop_credentials,
        )
        self._locator = WorkspaceLocator(self._api, settings)
        self._tools: dict[tuple[str, str], ImageTools] = {}  # by pod uid and container image
        self._pool: WarmPool | None = None

    def _count_error(self, kind: str) -> None:
        self._metrics.kubernetes_api_errors.labels(kind=kind).inc()
        if kind in ("401", "403"):
            self._drop_credentials()

    def _drop_credentials(self) -> None:
        """The token changed or was refused something: warm execs opened with its old rights
        (a Role that lost ``pods/exec``, say) must not run commands any more."""
        if self._pool is not None:
            self._pool.drop_credentials()

    async def open(self) -> None:
        await self._api.open()
        if self._settings.warm_execs:
            self._pool = WarmPool(self._settings, self._metrics, self._open_warm)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
        await self._api.close()

    # ---- exec ----------------------------------------------------------------------------

    async def start(self, spec: ExecSpec, on_waiting: WaitingCallback) -> KubernetesExecution:
        try:
            workspace = await self._find(spec, on_waiting)
            _check_time(spec, "the workspace became usable too late")
            tools = await self._image_tools(workspace, spec)
            self._refuse_unsupported(spec, tools)
            _check_time(spec, "the image probe finished too late")
            target = f"{workspace.namespace}/{workspace.name}/{workspace.container}"
            if tools.supervisor:
                return await self._start_supervised(spec, workspace, target)
            if not tools.has_shell:
                return await self._start_bare(spec, workspace, target)
            return await self._start_wrapped(spec, workspace, target, tools)
        except KubeError as error:
            raise refusals.refusal(error) from None

    async def _start_wrapped(
        self, spec: ExecSpec, workspace: Workspace, target: str, tools: ImageTools
    ) -> KubernetesExecution:
        nonce = new_nonce()
        remaining = math.ceil(spec.deadline - asyncio.get_running_loop().time())
        header = encode_header(
            nonce=nonce,
            argv=spec.argv,
            workdir=spec.workdir,
            env=spec.env,
            stdin_length=len(spec.stdin or b""),
            deadline=max(1, remaining) + math.ceil(self._settings.kill_grace) + BACKSTOP_MARGIN,
            grace=math.ceil(self._settings.kill_grace),
            leftover_grace=self._after_exit.leftover_grace,
        )
        stream, stdin, warm, on_end = await self._runner_stream(
            workspace, header, spec, [SHELL, "-c", WRAPPER_SCRIPT]
        )
        return KubernetesExecution(
            stream,
            target=target,
            guarantees=tools.guarantees,
            nonce=nonce,
            kill_group=lambda pgid, grace: self._kill_group(workspace, pgid, grace, spec.exec_id),
            explain_lost_stream=lambda lost: self._explain_lost_stream(workspace, lost),
            stdin=stdin,
            program=spec.argv[0],
            warm=warm,
            drain=self._after_exit.drain(),
            on_end=on_end,
        )

    async def _start_supervised(
        self, spec: ExecSpec, workspace: Workspace, target: str
    ) -> KubernetesExecution:
        nonce = new_nonce()
        now = asyncio.get_running_loop().time()
        header = supervisor_header(spec, nonce, now=now, grace=self._settings.kill_grace)
        stream, stdin, warm, on_end = await self._runner_stream(
            workspace, header, spec, [self._settings.workspace_supervisor]
        )
        return SupervisedExecution(
            stream,
            target=target,
            guarantees=self._tools[_image_key(workspace)].guarantees,
            nonce=nonce,
            explain_lost_stream=lambda lost: self._explain_lost_stream(workspace, lost),
            stdin=stdin,
            program=spec.argv[0],
            warm=warm,
            drain=self._after_exit.drain(),
            on_end=on_end,
        )

    async def _runner_stream(
        self, workspace: Workspace, header: bytes, spec: ExecSpec, cold_argv: list[str]
    ) -> tuple[ExecStream, bytes, bool, Callable[[], None] | None]:
        """A warm exec with ``header`` already written, or a new exec of ``cold_argv`` whose stdin
        starts with it: the stream, the stdin left to send, whether it was warm, and what to call
        once the request has ended (a warm exec's replacement waits for that)."""
        stdin = spec.stdin or b""
        stream = await self._take_warm(workspace, header, spec.exec_id)
        if stream is not None:
            assert self._pool is not None  # only the pool hands out warm execs
            return stream, stdin, True, self._pool.released
        stream = await self._open(workspace, cold_argv, spec.exec_id, stdin=True)
        return stream, header + stdin, False, None

    async def _take_warm(self, workspace: Workspace, header: bytes, exec_id: str) -> ExecStream | None:
        """A live warm exec with the header written to it, or None: go cold."""
        if self._pool is None:
            return None
        return await self._pool.take(workspace, header, exec_id)

    async def _open_warm(self, workspace: Workspace, warm_id: str) -> ExecStream:
        """Open the constant wrapper (or supervisor) exec for the pool; its header comes with a
        request.

        The exec is opened by the pod's name: the pod is looked up again afterwards, and if the
        name now holds another pod (another uid), the exec is closed and the pool told so."""
        argv = [SHELL, "-c", WRAPPER_SCRIPT]
        if self._tools[_image_key(workspace)].supervisor:
            argv = [self._settings.workspace_supervisor]
        url = self._api.exec_url(workspace.namespace, workspace.name, workspace.container, argv, stdin=True)
        try:
            stream = await self._api.open_exec(url, f"session-proxy/{__version__} warm_exec={warm_id}")
        except KubeError as error:
            if error.status in (404, 500):
                self._locator.forget()
            raise
        try:
            pod = await self._locator.pod_state(workspace.name)
        except BaseException:
            await stream.close()
            raise
        if pod is None or pod["metadata"].get("uid") != workspace.uid:
            await stream.close()
            self._locator.forget()
            raise WorkspaceReplaced(f"pod {workspace.name} is no longer the one with uid {workspace.uid}")
        return stream

    async def _start_bare(self, spec: ExecSpec, workspace: Workspace, target: str) -> KubernetesExecution:
        # No shell in the image: the argv must go in the URL, and nothing can be killed.
        stream = await self._open(workspace, spec.argv, spec.exec_id, stdin=False)
        return KubernetesExecution(
            stream,
            target=target,
            guarantees=NO_GUARANTEES,
            nonce=None,
            kill_group=self._cannot_kill,
            explain_lost_stream=lambda lost: self._explain_lost_stream(workspace, lost),
            stdin=None,
        )

    @staticmethod
    async def _cannot_kill(pgid: int, grace: float) -> None:
        return None

    def _refuse_unsupported(self, spec: ExecSpec, tools: ImageTools) -> None:
        if tools.supervisor or (tools.has_shell and tools.guarantees.stdin):
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
            raise refusals.unsupported_inputs(lacking, asked)

    async def _find(self, spec: ExecSpec, on_waiting: WaitingCallback) -> Workspace:
        now = asyncio.get_running_loop().time()
        until = min(spec.deadline, now + self._settings.workspace_wait)
        found = await self._locator.find(on_waiting, until)
        on_waiting.wait_over()
        if isinstance(found, WorkspaceProblem):
            if found.kind in ("not_ready", "not_found", "terminating") and until >= spec.deadline:
                raise refusals.out_of_time(spec.timeout, found.message)
            raise refusals.refusal(found)
        return found

    async def _open(self, workspace: Workspace, argv: list[str], exec_id: str, *, stdin: bool) -> ExecStream:
        url = self._api.exec_url(workspace.namespace, workspace.name, workspace.container, argv, stdin=stdin)
        try:
            return await self._api.open_exec(url, f"session-proxy/{__version__} exec_id={exec_id}")
        except KubeError as error:
            if error.status in (404, 500):
                self._locator.forget()
            raise refusals.refusal(error, exec_handshake=True) from None

    async def _run_small(
        self, workspace: Workspace, script: str | list[str], stdin: bytes, exec_id: str
    ) -> tuple[bytes, ExitStatus | None]:
        """Run a short fixed script (or argv) to completion; its stdout (capped) and its status."""
        argv = [SHELL, "-c", script] if isinstance(script, str) else script
        stream = await self._open(workspace, argv, exec_id, stdin=bool(stdin))
        output = bytearray()
        try:
            if stdin:
                await stream.send_stdin(stdin)
            while (frame := await stream.receive()) is not None:
                channel, payload = frame
                if channel == STDOUT and len(output) < PROBE_OUTPUT_LIMIT:
                    output += payload
        finally:
            await stream.close()
        return bytes(output), stream.status

    async def _image_tools(self, workspace: Workspace, spec: ExecSpec) -> ImageTools:
        cached = self._tools.get(_image_key(workspace))
        if cached is not None:
            return cached
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(min(spec.deadline, loop.time() + PROBE_TIMEOUT)):
                tools = await self._probe(workspace, spec.exec_id)
        except TimeoutError:
            if loop.time() >= spec.deadline:
                raise refusals.out_of_time(spec.timeout, "the image probe had not finished") from None
            raise refusals.probe_failed(f"the probe did not finish within {PROBE_TIMEOUT:g} s") from None
        if isinstance(tools, Inconclusive):
            if tools.container_lost:  # the pod outran discovery
                self._locator.forget()
                raise refusals.container_lost(tools.message)
            raise refusals.probe_failed(tools.message)
        if not tools.supervisor and (tools.missing or not tools.has_shell):
            log.warning(
                "workspace image lacks tools",
                extra={"pod": workspace.name, "missing": tools.missing or ["sh"]},
            )
        self._tools[_image_key(workspace)] = tools
        return tools

    async def _probe(self, workspace: Workspace, exec_id: str) -> ImageTools | Inconclusive:
        """The shell probe (which also looks for the supervisor); without /bin/sh, the
        supervisor's own ``--version``."""
        where = self._settings.workspace_supervisor
        argv = [SHELL, "-c", PROBE_SCRIPT, "probe", where]
        tools = read_probe(*await self._run_small(workspace, argv, b"", f"{exec_id}-probe"))
        if isinstance(tools, ImageTools) and not tools.has_shell and where:
            answer = await self._run_small(
                workspace, [where, "--version"], b"", f"{exec_id}-probe-supervisor"
            )
            return read_supervisor_probe(*answer)
        return tools

    async def _kill_group(self, workspace: Workspace, pgid: int, grace: float, exec_id: str) -> None:
        """The second exec: TERM the group, wait up to the grace, then KILL."""
        stdin = f"{pgid}\n{math.ceil(grace)}\n".encode()
        await self._run_small(workspace, KILL_SCRIPT, stdin, f"{exec_id}-kill")

    async def _explain_lost_stream(self, workspace: Workspace, stream: ExecStream) -> ExitStatus:
        status = stream.status
        if status is not None and status.reason == "error":
            return explain_exec_failure(status)
        self._locator.forget()
        try:
            pod = await self._locator.pod_state(workspace.name)
        except KubeError:
            pod = {"metadata": {"uid": workspace.uid}}  # cannot tell: assume it is still there
        if pod is None or pod["metadata"].get("uid") != workspace.uid:
            return ExitStatus(None, reason="pod_gone", message=f"pod {workspace.name} was deleted")
        if pod.get("status") and assess(pod, self._settings).terminating:
            return ExitStatus(None, reason="pod_gone", message=f"pod {workspace.name} is terminating")
        tools = self._tools.get(_image_key(workspace), ImageTools(True, ()))
        if status is not None and tools.wrapped is False:
            return status  # a bare exec: the stream's own status is all there is
        return ExitStatus(
            None, reason="transport_lost", message=_lost_message(stream, status, self._settings)
        )

    # ---- status ---------------------------------------------------------------------------

    async def info(self) -> BackendInfo:
        target: dict[str, object] = {"selector": self._settings.effective_workspace_selector}
        try:
            candidates = await self._locator.candidates()
        except KubeError as error:
            target["error"] = str(error)
            return BackendInfo(self.name, ready=False, target=target)
        usable = [c for c in candidates if c.usable]
        target["pods"] = [c.describe() for c in candidates]
        if self._pool is not None:
            target["warm_pool"] = self._pool.describe()
        return BackendInfo(self.name, ready=len(usable) == 1, target=target)

    async def logs(self, tail: int) -> str:
        """The last ``tail`` lines, at most LOG_LIMIT_BYTES of them (asked of the API server too)."""
        try:
            live = [c for c in await self._locator.candidates() if not c.terminating]
            if not live:
                raise refusals.refusal(WorkspaceProblem("not_found", "no workspace pod to read logs from"))
            workspace = live[0]
            path = f"/api/v1/namespaces/{workspace.namespace}/pods/{workspace.name}/log"
            query = {
                "container": workspace.container,
                "tailLines": str(tail),
                "limitBytes": str(LOG_LIMIT_BYTES),
            }
            text, _ = await self._api.get_text(path, query, cap=LOG_LIMIT_BYTES)
            return text
        except KubeError as error:
            raise refusals.refusal(error) from None


def _check_time(spec: ExecSpec, what: str) -> None:
    """A command whose request ran out of time before it could start is not started."""
    if asyncio.get_running_loop().time() >= spec.deadline:
        raise refusals.out_of_time(spec.timeout, what)


def _lost_message(stream: ExecStream, status: ExitStatus | None, settings: Settings) -> str:
    if stream.peer_silent:
        return f"the API server stopped answering pings for {settings.exec_ping_timeout:g} s"
    if stream.frame_too_large:
        return "the API server sent a WebSocket frame over the size limit"
    detail = f" (its status said exit code {status.exit_code})" if status and status.exit_code else ""
    return "the exec stream ended before the command reported its exit" + detail


def _image_key(workspace: Workspace) -> tuple[str, str]:
    """What an image probe holds for: this pod's container running this image (``kubectl set
    image`` keeps the pod and its uid, and restarts the container on another image)."""
    return workspace.uid, workspace.image
