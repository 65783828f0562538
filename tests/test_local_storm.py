"""A fork bomb inside a command is ended with everything it forked.

RLIMIT_NPROC does not hold for root, so when the suite runs as root the storm runs as an
unprivileged user, created here if missing (``useradd``). The bomb is bounded twice: by
``ulimit -u`` and by its own depth (at most 255 processes even if the limit did not hold).
"""

from __future__ import annotations

import os
import pwd
import subprocess

import aiohttp
import psutil
import pytest

from .conftest import ProxyFactory, exec_events, final, output_of, survivors

STORM_USER = "session-proxy-storm"
PROCESS_LIMIT = 40
DEPTH = 7


@pytest.fixture(scope="session")
def storm_user() -> tuple[int, list[str]]:
    """The uid the storm runs as, and the argv prefix that switches to it."""
    if os.geteuid() != 0:
        return os.getuid(), []
    try:
        entry = pwd.getpwnam(STORM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", STORM_USER],
            check=True,
        )
        entry = pwd.getpwnam(STORM_USER)
    prefix = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups", "--"]
    return entry.pw_uid, prefix


def processes_of(uid: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["uids", "status"]):
        if process.info["uids"].real == uid and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


@pytest.mark.timeout(60)
async def test_fork_bomb_under_ulimit_ends_with_nothing_left(
    http: aiohttp.ClientSession,
    make_proxy: ProxyFactory,
    marker: str,
    storm_user: tuple[int, list[str]],
) -> None:
    """A fork bomb that hits its process limit is ended by a 5 s timeout, leaving no process."""
    uid, prefix = storm_user
    assert uid == os.getuid() or processes_of(uid) == [], "the storm user is busy elsewhere"
    proxy = await make_proxy(kill_grace=1)
    bomb = (
        f": {marker}; ulimit -u {PROCESS_LIMIT}; "
        f"b() {{ [ $1 -gt 0 ] || exec sleep {marker}; b $(($1-1)) & b $(($1-1)) & wait; }}; b {DEPTH}"
    )
    body = {"command": [*prefix, "bash", "-c", bomb], "workdir": "/tmp", "timeout": 5}
    events = await exec_events(http, proxy, body)
    assert final(events)["reason"] == "timeout"
    assert b"fork" in output_of(events, "stderr"), "the bomb never reached its process limit"
    assert await survivors(marker, within=0) == []
    if uid != os.getuid():
        assert processes_of(uid) == []
