"""A proxy for fuzzing: its own process, run as an unprivileged user, its local backend rooted in
a fresh temporary directory, so that random argv can do no harm (``.ci/run`` creates the user).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import site
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

FUZZ_USER = "sp-fuzz"
REPO = Path(__file__).resolve().parent.parent
LISTENING = re.compile(rb'"exec_url": "http://127.0.0.1:(\d+)"')
# Settings that keep whatever random argv runs short and small.
FUZZ_FLAGS = (
    "--rate-limit", "0", "--max-timeout", "2", "--default-timeout", "2", "--kill-grace", "0.2",
    "--max-job-duration", "2",
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


def _fuzz_user() -> pwd.struct_passwd:
    """The unprivileged user, or a skip/failure that says exactly what is missing."""
    try:
        user = pwd.getpwnam(FUZZ_USER)
    except KeyError:
        if os.geteuid() != 0:
            pytest.skip(
                f"FUZZING NOT RUN: user {FUZZ_USER!r} is missing and this is not root "
                f"(.ci/run creates it: useradd --system {FUZZ_USER})"
            )
        pytest.fail(
            f"user {FUZZ_USER!r} is missing: create it (useradd --system {FUZZ_USER}) as .ci/run does"
        )
    if os.geteuid() != 0:
        pytest.skip(f"FUZZING NOT RUN: switching to {FUZZ_USER!r} needs root (CI runs as root)")
    return user


def _interpreter_for(user: pwd.struct_passwd, pythonpath: str) -> str:
    """A Python of this version that the user can run with this project importable.

    A virtualenv's interpreter often lives under a private home; the system's Python of the
    same minor version loads the same compiled extensions.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    check = f"import sys, session_proxy.server; assert sys.version.startswith('{version}')"
    candidates = [sys.executable, os.path.realpath(sys.executable), shutil.which(f"python{version}"),
                  f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"]  # fmt: skip
    tried = []
    for candidate in dict.fromkeys(c for c in candidates if c):
        try:
            probe = subprocess.run(
                [candidate, "-c", check],
                user=user.pw_uid, group=user.pw_gid, extra_groups=[], env={"PYTHONPATH": pythonpath},
                cwd="/", capture_output=True, timeout=60, check=False,
            )  # fmt: skip
        except OSError as error:  # not executable for this user
            tried.append(f"{candidate}: {error}")
            continue
        if probe.returncode == 0:
            return candidate
        tried.append(f"{candidate}: {probe.stderr.decode(errors='replace').strip()[-200:]}")
    pytest.fail(f"no Python {version} that {FUZZ_USER} can run with the project importable: {tried}")


@contextlib.contextmanager
def unprivileged_proxy(log_dir: Path, *flags: str) -> Iterator[UnprivilegedProxy]:
    """Start ``session-proxy serve`` as the fuzz user; at the end stop it and check what is left."""
    user = _fuzz_user()
    pythonpath = os.pathsep.join([str(REPO), *site.getsitepackages()])
    interpreter = _interpreter_for(user, pythonpath)
    root = Path(tempfile.mkdtemp(prefix="sp-fuzz-root-"))
    os.chown(root, user.pw_uid, user.pw_gid)
    log_path = log_dir / "fuzzed-proxy.log"
    command = [interpreter, "-m", "session_proxy", "serve", "--listen", "127.0.0.1:0", "--ops-listen", "",
               "--backend", "local", "--local-root", str(root), *FUZZ_FLAGS, *flags]  # fmt: skip
    env = {
        "PYTHONPATH": pythonpath,
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
    assert not left, f"processes of {FUZZ_USER} left running: {[p.info['cmdline'] for p in left]}"


def _processes_of(uid: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["uids", "cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if process.info["uids"].real == uid and process.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(process)
    return found
