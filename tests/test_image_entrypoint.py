"""The image's contents, exercised without a container engine: the built wheel, installed in a
fresh virtualenv, started with the Dockerfile's own ENTRYPOINT and ENV, in-cluster style."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .conftest import TOKEN

ROOT = Path(__file__).resolve().parent.parent
IMAGE_VENV = "/opt/session-proxy"


def dockerfile_runtime() -> tuple[list[str], dict[str, str]]:
    """ENTRYPOINT and ENV of the Dockerfile's final stage."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    final_stage = text.rsplit("\nFROM ", 1)[1]
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", final_stage, re.M).group(1))  # type: ignore[union-attr]
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV (.*)$", final_stage, re.M):
        for name, value in re.findall(r'(\w+)=("[^"]*"|\S+)', line):
            env[name] = value.strip('"')
    return entrypoint, env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project built as a wheel and installed into a new virtualenv, as the image does."""
    work = tmp_path_factory.mktemp("image")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(work / "dist"), str(ROOT)],
        check=True, timeout=300,
    )  # fmt: skip
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    wheel = next((work / "dist").glob("session_proxy-*.whl"))
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", str(wheel)], check=True, timeout=600)
    return venv


@pytest.mark.parametrize("api_mode", ["modern"])
@pytest.mark.timeout(600)
async def test_installed_entrypoint_runs_in_cluster_mode(
    installed: Path, kube: Any, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The installed `session-proxy serve`, given the image's environment plus what the kubelet
    provides (service host, token and CA files, downward API), serves exec into the workspace."""
    entrypoint, image_env = dockerfile_runtime()
    assert entrypoint[0].startswith(IMAGE_VENV + "/bin/")
    command = [str(installed / "bin" / Path(entrypoint[0]).name), *entrypoint[1:]]
    kube.add_pod("ws-1", labels={"session": "s1", "type": "workspace"})
    host, port = kube.url.removeprefix("https://").rsplit(":", 1)
    (tmp_path / "token").write_text(TOKEN)
    env = {
        **{k: v.replace(IMAGE_VENV, str(installed)) for k, v in image_env.items()},
        "PATH": f"{installed}/bin:/usr/bin:/bin",
        "KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port,
        "SESSION_PROXY_TOKEN_FILE": str(tmp_path / "token"),
        "SESSION_PROXY_CA_FILE": str(kube.write_ca(tmp_path / "ca.crt")),
        "POD_NAMESPACE": "default", "SESSION_NAME": "s1",
        # Only the ports differ from the image: a test may not take fixed ports.
        "SESSION_PROXY_LISTEN": "127.0.0.1:0", "SESSION_PROXY_OPS_LISTEN": "127.0.0.1:0",
    }  # fmt: skip
    assert image_env["SESSION_PROXY_LISTEN"].startswith("127.0.0.1:")
    log_path = tmp_path / "proxy.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, env=env, stderr=log_file, cwd=tmp_path)
    try:
        urls = await _listening(log_path, process)
        # The variables reach the settings: both listeners moved off the image's fixed ports.
        assert urls["exec_url"].startswith("http://127.0.0.1:")
        assert urls["ops_url"].startswith("http://127.0.0.1:")
        assert not urls["exec_url"].endswith(":8081")
        assert not urls["ops_url"].endswith(":9464")
        async with http.get(f"{urls['ops_url']}/readyz") as response:
            assert response.status == 200, await response.text()
        client = await asyncio.create_subprocess_exec(
            str(installed / "bin" / "session-proxy"), "exec", "--url", urls["exec_url"], "--",
            "sh", "-c", "echo from-the-image; exit 7",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(client.communicate(), timeout=60)
        assert stdout == b"from-the-image\n", stderr
        assert client.returncode == 7
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
    assert TOKEN not in log_path.read_text()


async def _listening(log_path: Path, process: subprocess.Popen[bytes]) -> dict[str, str]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in log_path.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("msg") == "listening":
                return {"exec_url": entry["exec_url"], "ops_url": entry["ops_url"]}
        assert process.poll() is None, log_path.read_text()
        await asyncio.sleep(0.05)
    raise AssertionError("the installed proxy did not start")


def test_image_env_names_are_real_settings() -> None:
    """Every SESSION_PROXY_* variable the Dockerfile sets is a real setting."""
    from session_proxy.settings import Settings, env_name

    _, image_env = dockerfile_runtime()
    known = {env_name(name) for name in Settings.model_fields}
    assert {k for k in image_env if k.startswith("SESSION_PROXY_")} <= known


def test_image_env_loads_and_matches_the_exposed_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    """The image's variables, read as `serve` reads them, are valid settings: the exec API on
    loopback, ops on every interface, each on a port the Dockerfile EXPOSEs."""
    from session_proxy.cli import build_parser, settings_from
    from session_proxy.settings import TcpAddress

    _, image_env = dockerfile_runtime()
    for name in list(os.environ):
        if name.startswith("SESSION_PROXY_") or name in ("KUBERNETES_SERVICE_HOST", "SESSION_NAME"):
            monkeypatch.delenv(name)
    settings = settings_from(build_parser().parse_args(["serve"]), image_env)
    exec_address, ops_address = settings.listen_address, settings.ops_address
    assert isinstance(exec_address, TcpAddress)
    assert exec_address.is_loopback
    assert ops_address is not None
    assert ops_address.host == "0.0.0.0"
    final_stage = (ROOT / "Dockerfile").read_text().rsplit("\nFROM ", 1)[1]
    exposed = {int(port) for line in re.findall(r"^EXPOSE (.*)$", final_stage, re.M) for port in line.split()}
    assert exposed == {exec_address.port, ops_address.port}
    assert settings.log_format == image_env["SESSION_PROXY_LOG_FORMAT"]
