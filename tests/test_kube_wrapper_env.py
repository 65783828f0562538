"""The request's env reaches the command alone: no name or value changes what the wrapper does.

Table-driven over hostile names and values, through the proxy and the Kubernetes API test
server, with the wrapper run by dash, bash and busybox sh, on both API server modes.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from session_proxy.backends.kubernetes import wrapper

from .conftest import KubeSetup, exec_events, final, output_of

SHELLS = ["dash", "bash", "busybox sh"]
STDIN = "line1\nline2 $(x)\n"
ARGS = ["a b", "*", "-n", ""]


def wrapper_variables() -> list[str]:
    """Every variable name the wrapper scripts use, read from the scripts themselves."""
    names = set(re.findall(r"\b__sp_[a-z_]+", wrapper.WRAPPER_SCRIPT + wrapper.KILL_SCRIPT))
    functions = set(re.findall(r"(__sp_[a-z_]+)\(\)", wrapper.WRAPPER_SCRIPT))
    return sorted(names - functions)


# The names the wrapper used before its variables were prefixed, each of which once broke it.
OLD_NAMES = ["n", "nstdin", "nonce", "v", "e", "wd", "tag", "deadline", "grace", "S", "main",
             "stop", "pid", "st", "timer", "t", "i", "s", "p", "g", "r", "d", "mk", "end"]  # fmt: skip


def hostile_cases(pod_root: Path) -> list[tuple[str, dict[str, str]]]:
    sourced = pod_root / "sourced.sh"
    sourced.write_text(f"echo SOURCED >&2; : > {pod_root}/pwned\n")
    hostile_value = f"0 $(: > {pod_root}/pwned) `x` \\0101 \x1e;\n-1"
    cases = [
        ("PATH elsewhere", {"PATH": "/nonexistent"}),
        ("PATH of a venv", {"PATH": "/opt/venv/bin"}),
        ("IFS of a letter", {"IFS": "s"}),
        ("IFS of digits", {"IFS": "0123456789"}),
        ("IFS empty", {"IFS": ""}),
        ("ENV sourcing a script", {"ENV": str(sourced)}),
        ("BASH_ENV sourcing a script", {"BASH_ENV": str(sourced)}),
        ("CDPATH", {"CDPATH": "/:..:/tmp"}),
        ("LD_PRELOAD of nothing", {"LD_PRELOAD": "/nonexistent/libhostile.so"}),
        ("old names as 0", dict.fromkeys(OLD_NAMES, "0")),
        ("old names hostile", dict.fromkeys(OLD_NAMES, hostile_value)),
        ("wrapper names as 0", dict.fromkeys(wrapper_variables(), "0")),
        ("wrapper names hostile", dict.fromkeys(wrapper_variables(), hostile_value)),
    ]
    everything: dict[str, str] = {}
    for _, env in cases:
        if "LD_PRELOAD" not in env:
            everything.update(env)
    cases.append(("all at once", everything))
    return cases


# Reports stdin, argv, directory and the named variables exactly as the process got them. Not a
# shell: dash, for one, resets IFS at start-up and passes its own value on to its children.
PROBE = """
import json, os, sys, time
if sys.argv[1] == "pause":
    time.sleep(0.3)
json.dump({
    "stdin": sys.stdin.read(), "argv": sys.argv[2:], "cwd": os.getcwd(),
    "env": {name: os.environ.get(name) for name in json.loads(sys.argv[2])},
}, sys.stdout)
sys.exit(7)
"""


def probe_command(names: list[str], *, pause: bool) -> list[str]:
    """The probe by full path (the request's PATH may hide everything), told what to report;
    the pause gives a wrapper that ends the command at once (a lost backstop) time to do so."""
    return [sys.executable, "-c", PROBE, "pause" if pause else "go", json.dumps(names), *ARGS]


def expected_report(root: Path, env: dict[str, str]) -> dict[str, Any]:
    return {"stdin": STDIN, "argv": [json.dumps(sorted(env)), *ARGS], "cwd": str(root), "env": env}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("shell", SHELLS)
async def test_hostile_env_reaches_only_the_command(
    http: aiohttp.ClientSession, kube_setup: KubeSetup, shell: str
) -> None:
    """For every hostile env, the command gets exactly the stdin, argv, workdir and values
    asked for, stderr carries nothing of the wrapper, and the exit is the command's own."""
    kube_setup.pod.shell = shell
    root = kube_setup.pod.root
    failures = []
    for name, env in hostile_cases(root):
        body: dict[str, Any] = {
            "command": probe_command(sorted(env), pause="PATH" in env),
            "env": env, "stdin": STDIN, "workdir": str(root), "timeout": 60,
        }  # fmt: skip
        events = await exec_events(http, kube_setup.proxy, body)
        stdout, stderr = output_of(events, "stdout"), output_of(events, "stderr")
        exit_event = final(events)
        if "LD_PRELOAD" in env:  # the loader's complaints, from the command's own processes
            stderr = b"".join(line for line in stderr.splitlines(True) if b"LD_PRELOAD" not in line)
        try:
            report = json.loads(stdout)
        except ValueError:
            report = stdout
        seen = (report, stderr, exit_event["reason"], exit_event["exit_code"])
        wanted = (expected_report(root, env), b"", "exited", 7)
        if seen != wanted:
            failures.append(f"{name}: got {seen!r}, wanted {wanted!r}")
    assert not (root / "pwned").exists(), "a value was evaluated"
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("shell", SHELLS)
async def test_program_is_looked_up_with_the_requests_path(
    http: aiohttp.ClientSession, kube_setup: KubeSetup, shell: str, tmp_path: Path
) -> None:
    """The program is found through the request's PATH, as on the local backend, while the
    wrapper's own tools are not: a PATH naming only the program's directory still runs it."""
    kube_setup.pod.shell = shell
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "greet").write_text("#!/bin/sh\necho hello from greet\n")
    (tools / "greet").chmod(0o755)
    events = await exec_events(
        http, kube_setup.proxy, {"command": ["greet"], "env": {"PATH": str(tools)}, "stdin": "x"}
    )
    assert output_of(events, "stdout") == b"hello from greet\n"
    assert (final(events)["reason"], final(events)["exit_code"]) == ("exited", 0)
    events = await exec_events(
        http, kube_setup.proxy, {"command": ["sh", "-c", "true"], "env": {"PATH": str(tools)}}
    )
    assert (final(events)["reason"], final(events)["exit_code"]) == ("error", 127)
    assert "'sh' was not found" in final(events)["message"]


# Cold only: it changes the image (or faults the next exec) after the pool's execs were opened.
@pytest.mark.parametrize("exec_path", ["cold"])
@pytest.mark.parametrize("runner", ["shell"])  # the supervisor exports through no shell
async def test_an_entry_the_shell_refuses_is_an_error(
    http: aiohttp.ClientSession, kube_setup: KubeSetup
) -> None:
    """An entry the workspace's shell will not export (bash's read-only UID) ends in reason
    error with a message, and nothing runs."""
    kube_setup.pod.shell = "bash"
    gate = kube_setup.pod.root / "ran"
    events = await exec_events(
        http, kube_setup.proxy, {"command": ["sh", "-c", f": > {gate}"], "env": {"UID": "0"}}
    )
    assert final(events)["reason"] == "error"
    assert "environment" in final(events)["message"]
    assert not gate.exists()


async def test_workdir_with_raw_bytes(http: aiohttp.ClientSession, kube_setup: KubeSetup) -> None:
    """A workdir with \\udc80-\\udcff escapes is accepted, as argv and env are, and the command
    runs in the directory with exactly those bytes in its name."""
    raw = bytes(kube_setup.pod.root) + b"/caf\xe9-\xff"
    Path(raw.decode("utf-8", "surrogateescape")).mkdir()
    body = {"command": ["/bin/pwd"], "workdir": raw.decode("utf-8", "surrogateescape")}
    events = await exec_events(http, kube_setup.proxy, body)
    assert output_of(events, "stdout") == raw + b"\n"
    assert final(events)["exit_code"] == 0
