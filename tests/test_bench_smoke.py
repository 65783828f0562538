"""The benchmark script runs end to end on tiny sizes (a smoke test: it measures nothing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_bench_runs_quick(tmp_path: Path) -> None:
    """`bench/run.py --quick` produces every section of the report, with every contender."""
    out = tmp_path / "report.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=280, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = out.read_text()
    for heading in ("## Round trip", "## Streaming throughput", "## Concurrency", "## Footprint"):
        assert heading in report
    for contender in ("proxy-kube", "kubectl", "direct-ws", "proxy-local", "subprocess"):
        assert f"| {contender} |" in report
    assert "| 0 |" in report  # the error column: no failed execs
