"""The MCP tools through the SDK's own client, over Streamable HTTP and stdio, on both backends."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPDeprecationWarning

from .conftest import ProxyFactory, RunningProxy, kube_proxy, survivors, wait_for_processes
from .mcp_client import TRANSPORTS, ProgressLog, connect, text_of

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def api_mode() -> str:
    """One Kubernetes API flavour is enough here; the exec tests cover both."""
    return "modern"


@dataclass
class Workspace:
    proxy: RunningProxy
    root: Path  # where a command starts (relative paths resolve here)


@pytest.fixture(params=["local", "kube"])
def backend_kind(request: pytest.FixtureRequest) -> tuple[str, Any]:
    """The backend, with the Kubernetes API test server when it is ``kube``."""
    kube = request.getfixturevalue("kube") if request.param == "kube" else None
    return str(request.param), kube


@pytest.fixture
async def workspace(backend_kind: tuple[str, Any], make_proxy: ProxyFactory, tmp_path: Path) -> Workspace:
    """A proxy on the local backend, or on the kubernetes backend with one workspace pod."""
    kind, kube = backend_kind
    if kind == "local":
        return Workspace(await make_proxy(), tmp_path)
    pod = kube.add_pod("ws-1", labels={"session": "s1", "type": "workspace"})
    return Workspace(await kube_proxy(kube, make_proxy, tmp_path, workspace_wait=3), pod.root)


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_tools_are_listed_with_schemas(workspace: Workspace, transport: str, tmp_path: Path) -> None:
    """exec, status and logs are listed with input and output schemas and honest annotations."""
    async with connect(transport, workspace.proxy.url, tmp_path) as session:
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
    assert set(tools) == {"exec", "status", "logs"}
    exec_tool = tools["exec"]
    assert {"command", "argv", "workdir", "timeout", "env", "stdin"} <= set(
        exec_tool.input_schema["properties"]
    )
    assert set(exec_tool.output_schema["required"]) >= {"exit_code", "reason", "stdout_bytes", "truncated"}
    assert "setsid" in exec_tool.description
    # The real numbers, also through the stdio bridge (which asks the proxy for its timeouts).
    assert "Timeout: default 300 s, at most 1800 s" in exec_tool.description
    assert "beyond 30000 characters" in exec_tool.description
    assert exec_tool.input_schema["properties"]["timeout"]["anyOf"][0]["maximum"] == 1800
    # What the model reads of the input schema: the rule it must follow, no internal docstring.
    assert "exactly one of `command`" in exec_tool.input_schema["description"]
    assert "ExecArguments" not in json.dumps(exec_tool.input_schema)
    assert exec_tool.output_schema["title"] == "exec result"
    assert exec_tool.annotations.destructive_hint is True
    assert exec_tool.annotations.open_world_hint is True
    assert tools["status"].annotations.read_only_hint is True
    assert "ready" in tools["status"].output_schema["properties"]
    assert tools["logs"].input_schema["properties"]["tail"]["maximum"] == 10_000


async def test_output_exit_code_and_structured_fields(
    workspace: Workspace, transport: str, tmp_path: Path
) -> None:
    """stdout and stderr interleaved, then the exit code line; a non-zero exit is a result, not an error."""
    async with connect(transport, workspace.proxy.url, tmp_path) as session:
        result = await session.call_tool(
            "exec",
            {"command": 'echo out; echo err >&2; printf "%s" "$GREETING"; cat; exit 3',
             "env": {"GREETING": "hello"}, "stdin": "from stdin\n"},
        )  # fmt: skip
    assert result.is_error is False
    text = text_of(result)
    # Two pipes: where stderr's line lands among stdout's is up to the scheduler, not the proxy.
    assert "[stderr] err\n" in text
    assert text.replace("[stderr] err\n", "", 1) == "out\nhellofrom stdin\nexit code: 3"
    structured = result.structured_content
    assert structured["exit_code"] == 3
    assert structured["reason"] == "exited"
    assert structured["stdout_bytes"] == len(b"out\nhellofrom stdin\n")
    assert structured["stderr_bytes"] == len(b"err\n")
    assert structured["truncated"] is False
    assert structured["signal"] is None
    assert structured["duration_ms"] >= 0


async def test_argv_and_invalid_arguments(workspace: Workspace, transport: str, tmp_path: Path) -> None:
    """argv runs without a shell; command and argv together is a tool error saying so."""
    async with connect(transport, workspace.proxy.url, tmp_path) as session:
        plain = await session.call_tool("exec", {"argv": ["printf", "%s|", "a b", "$HOME"]})
        both = await session.call_tool("exec", {"argv": ["true"], "command": "true"})
        relative = await session.call_tool("exec", {"command": "pwd", "workdir": "relative"})
    assert text_of(plain) == "a b|$HOME|\nexit code: 0"
    assert both.is_error is True
    assert "exactly one of `command`" in text_of(both)
    assert relative.is_error is True
    assert "absolute" in text_of(relative)


async def test_non_utf8_output_is_replaced_and_counted(
    workspace: Workspace, transport: str, tmp_path: Path
) -> None:
    """Bytes that are not UTF-8 show as U+FFFD; the byte counts stay exact."""
    async with connect(transport, workspace.proxy.url, tmp_path) as session:
        result = await session.call_tool("exec", {"command": r"printf 'a\377b\303\251\n'"})
    assert text_of(result) == "a\ufffdbé\nexit code: 0"
    assert result.structured_content["stdout_bytes"] == 6


async def test_timeout_is_an_error_and_leaves_no_process(
    workspace: Workspace, transport: str, tmp_path: Path, marker: str
) -> None:
    """Past its timeout the command and its children end; the result is an error with reason timeout."""
    async with connect(transport, workspace.proxy.url, tmp_path) as session:
        result = await session.call_tool(
            "exec", {"command": f"echo started; sleep {marker} & sleep {marker}", "timeout": 1}
        )
    assert result.is_error is True
    assert result.structured_content["reason"] == "timeout"
    text = text_of(result)
    assert text.startswith("started\n")
    assert "ran out of time (1 s)" in text
    assert "at most 1800 s" in text
    assert "setsid" not in text  # a detached process escapes every kill: never the advice
    assert text.splitlines()[-1].startswith("exit code: ")
    assert await survivors(marker, within=5) == []


async def test_a_missing_program_reads_the_same_with_and_without_a_shell(
    workspace: Workspace, transport: str, tmp_path: Path
) -> None:
    """argv naming no program: exit 127 and the reason on stderr, as through `sh -c`; not an early end."""
    async with connect(transport, workspace.proxy.url, tmp_path) as session:
        direct = await session.call_tool("exec", {"argv": ["no-such-program-here"]})
        shell = await session.call_tool("exec", {"command": "no-such-program-here"})
    for result in (direct, shell):
        assert result.is_error is False, text_of(result)
        assert result.structured_content["exit_code"] == 127
        lines = text_of(result).split("\n")
        assert len(lines) == 2, lines
        assert lines[0].startswith("[stderr] ")
        assert "no-such-program-here" in lines[0]
        assert lines[1] == "exit code: 127"


async def test_progress_carries_output_while_the_command_runs(
    workspace: Workspace, transport: str, tmp_path: Path
) -> None:
    """A progress message brings the first line while the command still waits for the test's gate."""
    gate = workspace.root / "gate"
    progress = ProgressLog()
    async with connect(transport, workspace.proxy.url, tmp_path) as session:
        call = asyncio.create_task(
            session.call_tool(
                "exec",
                {"command": "echo first-line; while [ ! -e gate ]; do sleep 0.02; done; echo done"},
                progress_callback=progress,
            )
        )
        message = await progress.wait_for("first-line")
        assert not call.done()
        gate.touch()
        result = await call
    assert "first-line" in message
    assert text_of(result) == "first-line\ndone\nexit code: 0"


async def test_cancelling_the_call_ends_the_command(
    workspace: Workspace, transport: str, tmp_path: Path, marker: str
) -> None:
    """A cancelled call (notifications/cancelled) ends the command and every process it started."""
    async with connect(transport, workspace.proxy.url, tmp_path) as session:
        call = asyncio.create_task(
            session.call_tool("exec", {"command": f"sleep {marker} & sleep {marker}", "timeout": 600})
        )
        await wait_for_processes(marker, 2)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert await survivors(marker, within=10) == []
        # The session is still usable afterwards.
        after = await session.call_tool("exec", {"command": "echo still here"})
    assert text_of(after) == "still here\nexit code: 0"


async def test_long_output_is_cut_in_the_middle(workspace: Workspace, transport: str, tmp_path: Path) -> None:
    """1 MB of output: the head and the tail are kept, the cut is announced, the byte counts are exact."""
    script = "awk 'BEGIN { for (i = 0; i < 10000; i++) printf \"line %05d %088d\\n\", i, 0 }'"
    async with connect(transport, workspace.proxy.url, tmp_path) as session:
        result = await session.call_tool("exec", {"command": script + "; echo err >&2"})
    structured = result.structured_content
    assert result.is_error is False
    assert structured["stdout_bytes"] == 10_000 * 100
    assert structured["stderr_bytes"] == 4
    assert structured["truncated"] is True
    text = text_of(result)
    assert text.startswith("line 00000 ")
    assert text.endswith("[stderr] err\nexit code: 0")
    assert "line 09999 " in text
    assert "line 05000 " not in text
    assert "characters left out in the middle" in text
    shown = [line for line in text.split("\n") if line.startswith("line ")]
    assert {len(line) for line in shown} == {99}  # the cut falls between lines
    assert len(text) < 30_000 + 500


async def test_deleting_the_session_ends_the_command(workspace: Workspace, marker: str) -> None:
    """DELETE of the MCP session ends a running call's command and all its children."""
    session_ids: list[str] = []

    async def remember_session(response: httpx2.Response) -> None:
        if "mcp-session-id" in response.headers:
            session_ids.append(response.headers["mcp-session-id"])

    async with (
        httpx2.AsyncClient(event_hooks={"response": [remember_session]}) as client,
        streamable_http_client(
            f"{workspace.proxy.url}/mcp", http_client=client, terminate_on_close=False
        ) as (
            read,
            write,
        ),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        call = asyncio.create_task(session.call_tool("exec", {"command": f"sleep {marker} & sleep {marker}"}))
        await wait_for_processes(marker, 2)
        headers = {"Mcp-Session-Id": session_ids[0], "Mcp-Protocol-Version": "2025-11-25"}
        async with (
            aiohttp.ClientSession() as http,
            http.delete(f"{workspace.proxy.url}/mcp", headers=headers) as response,
        ):
            assert response.status == 200
        assert await survivors(marker, within=10) == []
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)


async def test_status_and_logs_on_kubernetes(kube: Any, make_proxy: ProxyFactory, tmp_path: Path) -> None:
    """status names the workspace pod; logs returns the last lines of its container log."""
    pod = kube.add_pod("ws-1", labels={"session": "s1", "type": "workspace"})
    pod.log_lines = [f"log line {i}" for i in range(10)]
    proxy = await kube_proxy(kube, make_proxy, tmp_path)
    async with connect("http", proxy.url, tmp_path) as session:
        status = await session.call_tool("status", {})
        logs = await session.call_tool("logs", {"tail": 3})
    assert status.structured_content["ready"] is True
    assert "ws-1" in text_of(status)
    assert text_of(logs) == "log line 7\nlog line 8\nlog line 9\n"


@pytest.mark.parametrize("wait", [0, 1])
async def test_workspace_not_ready_is_a_tool_error_saying_what_to_do(
    kube: Any, make_proxy: ProxyFactory, tmp_path: Path, wait: int
) -> None:
    """A workspace that never gets ready (refused at once, or after waiting): not run, why, when to retry."""
    kube.add_pod("ws-1", labels={"session": "s1", "type": "workspace"}, ready=False,
                 waiting_reason="ContainerCreating")  # fmt: skip
    proxy = await kube_proxy(kube, make_proxy, tmp_path, workspace_wait=wait)
    async with connect("http", proxy.url, tmp_path) as session:
        result = await session.call_tool("exec", {"command": "true"})
    assert result.is_error is True
    assert "not ready" in text_of(result)
    assert "retry in" in text_of(result)
    assert "not run: " in text_of(result)


class LogMessages:
    """Collects the server's log messages (notifications/message); a test can wait for one."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self._arrived = asyncio.Condition()

    async def __call__(self, params: Any) -> None:
        async with self._arrived:
            self.messages.append(f"{params.level} {params.logger}: {params.data}")
            self._arrived.notify_all()

    async def wait_for(self, text: str, within: float = 20) -> str:
        async with asyncio.timeout(within), self._arrived:
            while True:
                for message in self.messages:
                    if text in message:
                        return message
                await self._arrived.wait()


async def file_appears(path: Path, within: float = 20) -> None:
    async with asyncio.timeout(within):
        while not path.exists():
            await asyncio.sleep(0.02)


def gated(started: Path, gate: Path) -> str:
    """A command that says it started, then runs until the test opens ``gate``."""
    return f"echo first-line; touch {started}; while [ ! -e {gate} ]; do sleep 0.02; done; echo done"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_long_call_without_progress_token_gets_log_messages(
    make_proxy: ProxyFactory, tmp_path: Path, transport: str
) -> None:
    """No progress token: a long call's news still reaches the client (a short call sends none)."""
    proxy = await make_proxy()
    gate = tmp_path / "gate"
    log = LogMessages()
    async with connect(transport, proxy.url, tmp_path, logging_callback=log) as session:
        assert session.server_capabilities is not None
        assert session.server_capabilities.logging is not None
        short = await session.call_tool("exec", {"command": "echo short"})
        assert log.messages == []
        call = asyncio.create_task(session.call_tool("exec", {"command": gated(tmp_path / "s", gate)}))
        message = await log.wait_for("first-line", within=60)
        gate.touch()
        result = await call
    assert text_of(short) == "short\nexit code: 0"
    assert message.startswith("info exec: running for "), message
    assert message.endswith("; last output:\nfirst-line"), message
    assert text_of(result) == "first-line\ndone\nexit code: 0"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_log_messages_keep_to_the_level_the_client_set(
    make_proxy: ProxyFactory, tmp_path: Path, transport: str
) -> None:
    """A client that asked for warnings and worse gets no running-command notices.

    A second client's call, started later, shows when a notice was due.
    """
    proxy = await make_proxy()
    gate = tmp_path / "gate"
    quiet_log, loud_log = LogMessages(), LogMessages()
    async with (
        connect(transport, proxy.url, tmp_path, logging_callback=quiet_log) as quiet,
        connect(transport, proxy.url, tmp_path, logging_callback=loud_log) as loud,
    ):
        with pytest.warns(MCPDeprecationWarning, match="logging capability"):
            await quiet.set_logging_level("warning")
        quiet_call = asyncio.create_task(quiet.call_tool("exec", {"command": gated(tmp_path / "q", gate)}))
        await file_appears(tmp_path / "q")
        loud_call = asyncio.create_task(loud.call_tool("exec", {"command": gated(tmp_path / "l", gate)}))
        await loud_log.wait_for("first-line", within=60)
        gate.touch()
        results = [await quiet_call, await loud_call]
    assert [text_of(result) for result in results] == ["first-line\ndone\nexit code: 0"] * 2
    assert quiet_log.messages == []
