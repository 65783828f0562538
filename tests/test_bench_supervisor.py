"""The supervisor's benchmark scripts run end to end on tiny sizes (smoke tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_randomized_early_ends_leave_nothing() -> None:
    """`bench/supervisor_ends.py` on 25 runs: no hang and no process left after any end."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "supervisor_ends.py"), "--runs", "25"],
        capture_output=True, text=True, timeout=280, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "25 randomized early ends" in result.stdout
    assert "0 failed" in result.stdout
