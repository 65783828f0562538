"""The optional shared secret: without the right bearer token nothing on the exec API answers."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from session_proxy.client import ExecClient, ProxyRefused
from session_proxy.models import ExitEvent, OutputEvent

from .conftest import ProxyFactory, ProxyProcess, exec_events, final


async def test_token_file_is_created_private_and_random(make_proxy: ProxyFactory, tmp_path: Path) -> None:
    """A missing token file is created with a long random token, readable by owner and group only."""
    path = tmp_path / "shared" / "token"
    path.parent.mkdir()
    await make_proxy(auth_token_file=str(path))
    token = path.read_text().strip()
    assert len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    other = tmp_path / "other-token"
    await make_proxy(auth_token_file=str(other))
    assert other.read_text().strip() != token


@pytest.mark.parametrize("header", [None, "Bearer wrong-token-0123456789", "Basic abc", "Bearer "])
async def test_requests_without_the_token_get_401(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory, tmp_path: Path, header: str | None
) -> None:
    """Missing or wrong credentials: 401 with WWW-Authenticate, on every exec API endpoint."""
    proxy = await make_proxy(auth_token_file=str(tmp_path / "token"))
    headers = {"Authorization": header} if header else {}
    async with http.post(f"{proxy.url}/exec", json={"command": ["true"]}, headers=headers) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await response.json())["error"]["code"] == "unauthorized"
    for path in ("/status", "/logs", "/openapi.json"):
        async with http.get(f"{proxy.url}{path}", headers=headers) as response:
            assert response.status == 401, path
    async with http.get(f"{proxy.ops_url}/readyz") as response:
        assert response.status == 200  # probes and scrapes stay open on the ops port


async def test_the_right_token_is_accepted(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """With the token from the file, requests run as usual."""
    path = tmp_path / "token"
    proxy = await make_proxy(auth_token_file=str(path))
    token = path.read_text().strip()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        events = await exec_events(session, proxy, {"command": ["echo", "authorized"]})
    assert final(events)["exit_code"] == 0


@pytest.mark.timeout(30)
async def test_near_misses_of_the_token_get_401(
    http: aiohttp.ClientSession, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """Only exactly `Bearer <token>` passes: the token with a byte more or less, without the
    scheme or with another separator is refused, and so no command runs."""
    path = tmp_path / "token"
    proxy = await make_proxy(auth_token_file=str(path))
    token = path.read_text().strip()
    near_misses = [
        f"Bearer {token}x", f"Bearer {token[:-1]}", token, f"Bearer  {token}",
        f"Bearer\t{token}", f"Token {token}", f"Bearer {token.upper()}",
    ]  # fmt: skip
    marker = tmp_path / "ran"
    for header in near_misses:
        body = {"command": ["touch", str(marker)]}
        async with http.post(f"{proxy.url}/exec", json=body, headers={"Authorization": header}) as response:
            assert response.status == 401, header
    assert not marker.exists()
    async with http.post(
        f"{proxy.url}/exec",
        json={"command": ["touch", str(marker)]},
        headers={"Authorization": f"Bearer {token}"},
    ) as response:
        assert response.status == 200
        await response.read()
    assert marker.exists()


async def test_an_existing_token_file_is_used(make_proxy: ProxyFactory, tmp_path: Path) -> None:
    """A token the platform wrote itself is used as is; one too short to be a secret stops start-up."""
    from session_proxy.app import StartupFailed

    path = tmp_path / "token"
    path.write_text("platform-chosen-token-0123456789\n")
    proxy = await make_proxy(auth_token_file=str(path))
    async with ExecClient(proxy.url, token="platform-chosen-token-0123456789") as client:
        events = [event async for event in client.exec(["echo", "ok"])]
    assert isinstance(events[-1], ExitEvent)
    assert events[-1].exit_code == 0
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(StartupFailed, match="at least 16"):
        await make_proxy(auth_token_file=str(short))


async def test_client_reads_the_token_file_from_the_environment(
    make_proxy: ProxyFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client library finds the token through SESSION_PROXY_AUTH_TOKEN_FILE, as the agent would."""
    path = tmp_path / "token"
    proxy = await make_proxy(auth_token_file=str(path))
    async with ExecClient(proxy.url) as client:
        with pytest.raises(ProxyRefused) as refused:
            [event async for event in client.exec(["true"])]
    assert refused.value.status == 401
    monkeypatch.setenv("SESSION_PROXY_AUTH_TOKEN_FILE", str(path))
    async with ExecClient(proxy.url) as client:
        events = [event async for event in client.exec(["echo", "hi"])]
    assert [e.payload() for e in events if isinstance(e, OutputEvent)] == [b"hi\n"]


def test_cli_with_the_token_file(spawn_proxy: Callable[..., ProxyProcess], tmp_path: Path) -> None:
    """`session-proxy exec` sends the token named by the environment; without it, exit 125 and 401."""
    path = tmp_path / "token"
    proxy = spawn_proxy("--auth-token-file", str(path))
    command = [sys.executable, "-m", "session_proxy", "exec", "--url", proxy.url, "--", "echo", "cli"]
    plain_env = {k: v for k, v in os.environ.items() if k != "SESSION_PROXY_AUTH_TOKEN_FILE"}
    refused = subprocess.run(command, capture_output=True, timeout=60, env=plain_env)
    assert refused.returncode == 125
    assert b"401 unauthorized" in refused.stderr
    allowed = subprocess.run(
        command,
        capture_output=True,
        timeout=60,
        env={**plain_env, "SESSION_PROXY_AUTH_TOKEN_FILE": str(path)},
    )
    assert allowed.returncode == 0
    assert allowed.stdout == b"cli\n"
