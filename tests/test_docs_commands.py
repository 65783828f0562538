"""The README's and the runbook's commands work as printed: each is taken from the document and
run by bash, against a proxy started by the document's own command. Everything runs in a network
namespace of its own (unshare), so the printed 127.0.0.1:8081 and :9464 are free whoever else
uses this machine. `kubectl exec` into the agent container is stood in for by a script that
runs the command here with the agent's environment, so the quoting is what is tested."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
RUNBOOK = (ROOT / "docs" / "runbook.md").read_text()
BIN = Path(sys.executable).parent
# Waits until the proxy answers on its ops port (a deadline, not a sleep for readiness).
WAIT_READY = "for _ in $(seq 300); do curl -sf 127.0.0.1:9464/healthz >/dev/null && break; sleep 0.05; done"
# Stands for kubectl: `wait` succeeds; `exec ... -c agent -- CMD...` runs CMD here with the agent
# container's environment (the manifests' SESSION_PROXY_AUTH_TOKEN_FILE), nothing of this shell's.
FAKE_KUBECTL = """#!/bin/bash
for arg; do case "$arg" in wait) exit 0 ;; exec) break ;; *) ;; esac; done
while [ $# -gt 0 ] && [ "$1" != "--" ]; do shift; done
[ $# -gt 0 ] || { echo "fake kubectl: not an exec into a container" >&2; exit 2; }
shift
exec env -i PATH="$PATH" SESSION_PROXY_AUTH_TOKEN_FILE="$AGENT_TOKEN_FILE" "$@"
"""


def section(text: str, heading: str) -> str:
    """From the heading to the next heading of its level or higher."""
    start = text.index(heading + "\n") + len(heading)
    following = re.search(rf"\n#{{1,{heading.count('#')}}} ", text[start:])
    return text[start : start + following.start()] if following else text[start:]


def blocks(text: str, language: str) -> list[str]:
    """The code blocks of a language, indented ones (in a list item) with their indent removed."""
    found = re.findall(rf"^([ \t]*)```{language}\n(.*?)\n\1```", text, re.DOTALL | re.MULTILINE)
    return [textwrap.dedent(body) if indent else body for indent, body in found]


def run_isolated(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a bash script in a new network namespace with only loopback up; the test's venv is
    on the PATH (what `. .venv/bin/activate` gives). What it leaves in the background (the
    proxy) is stopped when it ends."""
    assert shutil.which("unshare"), "unshare (util-linux) is needed"
    assert shutil.which("ip"), "ip (iproute2) is needed"
    path = f"{tmp_path / 'bin'}:{BIN}:/usr/local/bin:/usr/bin:/bin"
    (tmp_path / "script.sh").write_text("trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n" + script)
    return subprocess.run(
        ["unshare", "--net", "bash", "-c", 'ip link set lo up && exec bash "$0"', "script.sh"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={"PATH": path, "HOME": str(tmp_path), **env},
    )  # fmt: skip


def events(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_quick_start_install_is_run_only() -> None:
    """The quick start installs the project without the test extras and activates the venv."""
    install = blocks(section(README, "## Quick start"), "sh")[0].splitlines()
    assert install == ["python3 -m venv .venv", ".venv/bin/pip install -q -e .", ". .venv/bin/activate"]


@pytest.mark.timeout(150)
def test_quick_start_commands_work_as_printed(tmp_path: Path) -> None:
    """The serve command, the curl call, the CLI examples (output as printed) and the client
    script (output and exit code as stated) all work in a fresh directory."""
    quick = section(README, "## Quick start")
    sh = blocks(quick, "sh")
    serve, curl = sh[1], sh[2]
    assert serve.startswith("session-proxy serve")
    assert serve.endswith(" &")
    cli_examples = blocks(section(README, "### CLI"), "sh")[1]
    client = blocks(section(README, "### CLI"), "python")[0]
    (tmp_path / "run.py").write_text(client)
    commands = [line.removeprefix("$ ") for line in cli_examples.splitlines() if line.startswith("$ ")]
    expected_cli = "".join(line + "\n" for line in cli_examples.splitlines() if not line.startswith("$ "))
    script = "\n".join([
        f"{serve.removesuffix(' &')} > serve.out 2> serve.log &",
        WAIT_READY,
        f"{curl} > curl.out",
        *(f"{{ {command}; }} >> cli.out" for command in commands),
        "head -c 2000000 /dev/zero | session-proxy exec -i -- wc -c > big.out 2>&1",
        'echo "exit=$?" >> big.out',
        "python run.py > client.out",
        'echo "exit=$?" >> client.out',
    ])  # fmt: skip
    result = run_isolated(script, tmp_path)
    assert result.returncode == 0, result.stderr + (tmp_path / "serve.log").read_text()
    streamed = events((tmp_path / "curl.out").read_text())
    assert [e["type"] for e in streamed] == ["start", "stdout", "stderr", "exit"]
    assert streamed[-1]["exit_code"] == 3
    assert (tmp_path / "cli.out").read_text() == expected_cli
    big = (tmp_path / "big.out").read_text()
    assert "413" in big, big
    assert big.endswith("exit=125\n"), big
    assert (tmp_path / "client.out").read_text() == "stdout b'hello\\n'\nexit=3\n"


def test_deployment_and_runbook_commands_work_as_printed(tmp_path: Path) -> None:
    """The README's "check it works" commands and the runbook's status command reach a proxy
    that requires the bearer token: `$(cat ...)` is left for the agent's shell, not expanded
    by the operator's; the runbook's log key and fields are what the proxy writes."""
    checks = blocks(section(README, "## Deploying"), "sh")[1].splitlines()
    status = next(b for b in blocks(RUNBOOK, "sh") if "/status" in b).strip()
    assert all(line.startswith("kubectl ") for line in [*checks, status])
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "kubectl").write_text(FAKE_KUBECTL)
    (tmp_path / "bin" / "kubectl").chmod(0o755)
    token_file = tmp_path / "token"
    script = "\n".join([
        f"session-proxy serve --local-root . --auth-token-file {token_file} > serve.out 2> serve.log &",
        WAIT_READY,
        *(f"{line} > check-{index}.out" for index, line in enumerate(checks)),
        f"{status} > runbook-status.out",
        "curl -s -o /dev/null -w '%{http_code}' 127.0.0.1:8081/status > no-token.out",
    ])  # fmt: skip
    result = run_isolated(script, tmp_path, AGENT_TOKEN_FILE=str(token_file))
    assert result.returncode == 0, result.stderr + (tmp_path / "serve.log").read_text()
    assert (tmp_path / "no-token.out").read_text() == "401"
    exec_events = events((tmp_path / "check-1.out").read_text())
    assert exec_events[-1]["exit_code"] == 0, exec_events
    assert "uid=" in next(e["data"] for e in exec_events if e["type"] == "stdout")
    for name in ("check-2.out", "runbook-status.out"):
        assert json.loads((tmp_path / name).read_text())["ready"] is True
    logged = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines()]
    finished = next(line for line in logged if line.get("msg") == "exec finished")
    fields = re.search(r'`"msg": "exec finished"` line with (.*?)\n  request', RUNBOOK, re.DOTALL)
    assert fields, "the runbook no longer lists the exec finished line's fields"
    assert set(re.findall(r"`(\w+)`", fields.group(1))) <= set(finished)


def test_runbook_status_fields_are_the_proxys() -> None:
    """The pod fields the runbook lists under /status are the ones the backend reports."""
    from session_proxy.backends.kubernetes.discovery import Workspace

    workspace = Workspace("ns", "ws", "uid", "workspace", "image", "Running", True, 0, None)
    listed = re.search(r"each candidate pod with (.*?) \(why", RUNBOOK, re.DOTALL)
    assert listed
    assert set(re.findall(r"`(\w+)`", listed.group(1))) <= set(workspace.describe())
