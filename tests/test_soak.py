"""The soak, quick: 2,100 execs through one proxy process leave no error, no process, no fd
and no memory growth behind (bench/soak.py --quick; the full run's figures are in docs/reliability.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
# RSS at the end over RSS at the start (after a warm-up). Allocator noise moves it by a few
# percent; a leak of 12 KB per exec over the 2,100 execs already crosses this.
RSS_GROWTH_BOUND = 1.5


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One quick soak run, its figures as written by --json."""
    out = tmp_path_factory.mktemp("soak") / "soak.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=170, cwd=ROOT,
    )  # fmt: skip
    assert out.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    figures: dict[str, Any] = json.loads(out.read_text())
    figures["returncode"] = result.returncode
    figures["report"] = result.stdout
    return figures


@pytest.mark.timeout(180)
def test_every_exec_succeeds(soak: dict[str, Any]) -> None:
    """Every exec ends with its own exit code and exactly its output; nothing is logged as an error."""
    plan = soak["plan"]
    assert (plan["sequential"], plan["concurrent"], plan["cancelled"]) == (1000, 1000, 100)
    assert soak["failures"] == []
    assert soak["summary"]["error_log_lines"] == 0, soak["log_errors"]
    assert (soak["ok"], soak["returncode"]) == (True, 0), soak["report"]  # the script's own verdict


@pytest.mark.timeout(180)
def test_cancelled_execs_leave_nothing(soak: dict[str, Any]) -> None:
    """Every exec dropped mid-stream is counted as client_gone and none of its processes (the
    command and its background child) is left; the proxy has no child at any quiet point."""
    assert soak["client_gone"] == soak["plan"]["cancelled"]
    assert soak["in_flight"] == 0
    assert soak["leftovers"] == []
    assert [s["children"] for s in soak["samples"] if s["quiet"]] == [0, 0, 0, 0]


@pytest.mark.timeout(180)
def test_fds_and_memory_stay_flat(soak: dict[str, Any]) -> None:
    """With nothing in flight, the proxy holds exactly the fds it held at the start, and its RSS
    stays within a bound of its own start."""
    quiet = [s for s in soak["samples"] if s["quiet"]]
    assert [s["point"] for s in quiet] == ["start", "after sequential", "after concurrent", "end"]
    assert [s["fds"] for s in quiet] == [quiet[0]["fds"]] * 4, soak["report"]
    assert [s["execs"] for s in soak["samples"] if not s["quiet"]] == [1000, 2000]
    ratio = soak["summary"]["rss_end_mb"] / soak["summary"]["rss_start_mb"]
    assert ratio <= RSS_GROWTH_BOUND, soak["report"]
