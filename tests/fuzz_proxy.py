"""A proxy for fuzzing: its own process, run as an unprivileged user, its local backend rooted in
a fresh temporary directory, so that random argv can do no harm (the users are made as needed).

The user cannot be assumed to read the checkout or the virtualenv: either may sit under a
private directory (a home directory, ``mktemp -d``). So the proxy runs from a runtime copy made
for it: the project's package and the distributions it imports, hard-linked (or copied) into a
fresh world-readable, root-owned directory that the fuzzed commands can read but not change.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from packaging.requirements import Requirement

FUZZ_USER = "sp-fuzz"
MAX_FUZZ_USERS = 8
REPO = Path(__file__).resolve().parent.parent
LISTENING = re.compile(rb'"exec_url": "http://127.0.0.1:(\d+)"')
# Settings that keep whatever random argv runs short and small.
FUZZ_FLAGS = (
    "--rate-limit", "0", "--max-timeout", "2", "--default-timeout", "2", "--kill-grace", "0.2",
    "--max-output-bytes", "65536", "--max-concurrent", "64", "--body-timeout", "5",
)  # fmt: skip


@dataclass
class UnprivilegedProxy:
    process: subprocess.Popen[bytes]
    port: int
    root: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_path.read_bytes().splitlines() if line.strip()]

    def problems_in_log(self) -> list[dict[str, Any]]:
        """Log records that mean a bug: errors, tracebacks, anything not JSON."""
        problems = []
        for raw in self.log_path.read_bytes().splitlines():
            try:
                record = json.loads(raw)
            except ValueError:
                problems.append({"unparsed": raw[:300]})
                continue
            if record.get("level") in ("error", "critical") or "exception" in record:
                problems.append(record)
        return problems


@contextlib.contextmanager
def _fuzz_user() -> Iterator[pwd.struct_passwd]:
    """A fuzz user no other running fuzzed proxy has (xdist workers run them at once).

    Every process of that user is then this proxy's: the leftover check is exact, and random
    argv (``kill -9 -1``) reaches no other proxy. ``sp-fuzz`` first, then ``sp-fuzz-1``, ...,
    each held through a lock file for the proxy's lifetime and created when missing.
    """
    if os.geteuid() != 0:
        pytest.skip(f"FUZZING NOT RUN: running as {FUZZ_USER!r} needs root (CI runs as root)")
    for index in range(MAX_FUZZ_USERS):
        name = FUZZ_USER if index == 0 else f"{FUZZ_USER}-{index}"
        with (Path(tempfile.gettempdir()) / f"{name}.lock").open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            yield _existing_user(name)
            return
    pytest.fail(f"all {MAX_FUZZ_USERS} fuzz users are busy")


def _existing_user(name: str) -> pwd.struct_passwd:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    with (Path(tempfile.gettempdir()) / "sp-fuzz-useradd.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # useradd refuses while another holds /etc/passwd
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True, capture_output=True,
        )  # fmt: skip
    return pwd.getpwnam(name)


def _runtime_distributions() -> list[importlib.metadata.Distribution]:
    """The installed distributions the proxy needs at run time: its requirements, recursively."""
    found: dict[str, importlib.metadata.Distribution] = {}
    visited: set[tuple[str, frozenset[str]]] = set()
    pending: list[tuple[str, frozenset[str]]] = [("session-proxy", frozenset())]
    while pending:
        name, extras = pending.pop()
        distribution = importlib.metadata.distribution(name)
        key = distribution.metadata["Name"].lower().replace("_", "-")
        if (key, extras) in visited:
            continue
        visited.add((key, extras))
        found[key] = distribution
        for line in distribution.requires or []:
            requirement = Requirement(line)
            wanted = requirement.marker is None or any(
                requirement.marker.evaluate({"extra": extra}) for extra in ("", *extras)
            )
            if wanted:
                pending.append((requirement.name, frozenset(requirement.extras)))
    del found["session-proxy"]  # the package itself is taken from the checkout, not its install
    return list(found.values())


def _place(source: Path, target: Path) -> None:
    """Hard-link ``source`` at ``target`` when others may read it, else copy it readable."""
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    if source.stat().st_mode & 0o004:
        with contextlib.suppress(OSError):  # another file system: copy instead
            os.link(source, target)
            return
    shutil.copyfile(source, target)
    os.chmod(target, 0o755 if source.stat().st_mode & 0o100 else 0o644)


def build_runtime() -> Path:
    """A root-owned, world-readable directory holding everything ``python -m session_proxy`` imports."""
    runtime = Path(tempfile.mkdtemp(prefix="sp-fuzz-runtime-"))
    runtime.chmod(0o755)
    for distribution in _runtime_distributions():
        for file in distribution.files or []:
            if file.parts[0] == "..":  # console scripts beside the interpreter, not importable
                continue
            source = Path(str(distribution.locate_file(file)))
            if source.is_file():
                _place(source, runtime / file)
    package = REPO / "session_proxy"
    for source in package.rglob("*"):
        if source.is_file():
            _place(source, runtime / source.relative_to(REPO))
    for directory in [runtime, *(path for path in runtime.rglob("*") if path.is_dir())]:
        directory.chmod(0o755)
    return runtime


def _interpreter_for(user: pwd.struct_passwd, runtime: Path) -> str:
    """A Python of this version that the user can run with the runtime importable.

    A virtualenv's interpreter often lives under a private home; the system's Python of the
    same minor version loads the same compiled extensions.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    check = f"import sys, session_proxy.server; assert sys.version.startswith('{version}')"
    candidates = [sys.executable, os.path.realpath(sys.executable), shutil.which(f"python{version}"),
                  f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"]  # fmt: skip
    tried = []
    for candidate in dict.fromkeys(c for c in candidates if c):
        env = {"PYTHONPATH": str(runtime)}
        try:
            probe = subprocess.run(
                [candidate, "-c", check],
                user=user.pw_uid, group=user.pw_gid, extra_groups=[], env=env, cwd="/",
                capture_output=True, timeout=60, check=False,
            )  # fmt: skip
        except OSError as error:  # not executable for this user
            tried.append(f"{candidate}: {error}")
            continue
        if probe.returncode == 0:
            return candidate
        tried.append(f"{candidate}: {probe.stderr.decode(errors='replace').strip()[-200:]}")
    message = (
        f"no Python {version} that {user.pw_name} can run (install the system's python{version}): {tried}"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(f"FUZZING NOT RUN: {message}")


@contextlib.contextmanager
def unprivileged_proxy(log_dir: Path, *flags: str) -> Iterator[UnprivilegedProxy]:
    """Start ``session-proxy serve`` as the fuzz user; at the end stop it and check what is left."""
    with _fuzz_user() as user, _runtime() as runtime:
        yield from _run_unprivileged(user, runtime, log_dir, flags)


@contextlib.contextmanager
def _runtime() -> Iterator[Path]:
    runtime = build_runtime()
    try:
        yield runtime
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def _run_unprivileged(
    user: pwd.struct_passwd, runtime: Path, log_dir: Path, flags: tuple[str, ...]
) -> Iterator[UnprivilegedProxy]:
    interpreter = _interpreter_for(user, runtime)
    root = Path(tempfile.mkdtemp(prefix="sp-fuzz-root-"))
    os.chown(root, user.pw_uid, user.pw_gid)
    log_path = log_dir / "fuzzed-proxy.log"
    command = [interpreter, "-m", "session_proxy", "serve", "--listen", "127.0.0.1:0", "--ops-listen", "",
               "--backend", "local", "--local-root", str(root), *FUZZ_FLAGS, *flags]  # fmt: skip
    env = {
        "PYTHONPATH": str(runtime),
        "HOME": str(root),
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
    }
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, user=user.pw_uid, group=user.pw_gid, extra_groups=[], env=env, cwd=root,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (match := LISTENING.search(log_path.read_bytes())):
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the fuzzed proxy did not start"
            time.sleep(0.05)
        yield UnprivilegedProxy(process, int(match.group(1)), root, log_path)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        left = _processes_of(user.pw_uid)
        for leftover in left:
            leftover.kill()
        shutil.rmtree(root, ignore_errors=True)
    assert not left, f"processes of {user.pw_name} left running: {[p.info['cmdline'] for p in left]}"


def _processes_of(uid: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["uids", "cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if process.info["uids"].real == uid and process.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(process)
    return found
