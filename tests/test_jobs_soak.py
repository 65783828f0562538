"""The jobs soak, quick: 400 background jobs, each overflowing its ring, through one proxy
process: every read exact, the ended jobs kept bounded, nothing left, memory flat
(bench/jobs_soak.py --quick; the full run's figures are in docs/reliability.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.reliability, pytest.mark.timeout(180)]


def test_jobs_soak_quick(tmp_path: Path) -> None:
    """No job wrong, at most 4 x --max-jobs ended jobs kept, no process left, RSS flat."""
    out = tmp_path / "jobs-soak.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "jobs_soak.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=170, cwd=ROOT,
    )  # fmt: skip
    assert out.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["problems"] == []
    assert figures["kept_at_end"] == 32
    assert result.returncode == 0
