"""The workspace supervisor binary for the tests: built from ``supervisor/`` when missing or stale."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "supervisor"
BINARY = ROOT / "build" / "workspace-supervisor"


def supervisor_binary() -> Path:
    """The built supervisor; rebuilt (to a temporary name, then renamed: test workers may race)
    when any source file is newer. musl-gcc when installed, else the system compiler."""
    newest = max(path.stat().st_mtime for path in SOURCE.iterdir())
    if BINARY.exists() and BINARY.stat().st_mtime >= newest:
        return BINARY
    BINARY.parent.mkdir(exist_ok=True)
    compiler = "musl-gcc" if shutil.which("musl-gcc") else "cc"
    handle, temporary = tempfile.mkstemp(dir=BINARY.parent, prefix=".workspace-supervisor-")
    os.close(handle)
    subprocess.run([str(SOURCE / "build.sh"), temporary], check=True, env={**os.environ, "CC": compiler})
    os.replace(temporary, BINARY)
    return BINARY
