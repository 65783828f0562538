"""The benchmark script runs end to end on tiny sizes (a smoke test: it measures nothing)."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def markdown_table(report: str, heading: str) -> list[dict[str, str]]:
    """The rows of the first table after ``heading``, each as {column: cell}."""
    lines = report[report.index(heading) :].splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("|"))
    table = itertools.takewhile(lambda line: line.startswith("|"), lines[start:])
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table]
    header, separator, *body = rows
    assert all(set(cell) <= {"-", ":"} for cell in separator), separator
    return [dict(zip(header, row, strict=True)) for row in body]


@pytest.mark.timeout(300)
def test_bench_runs_quick(tmp_path: Path) -> None:
    """`bench/run.py --quick` produces every section of the report with every contender, and
    the concurrency table shows every contender at every level with zero failed execs."""
    out = tmp_path / "report.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=280, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = out.read_text()
    headings = ("## Round trip", "## Streaming throughput", "## Concurrency", "## Footprint", "## Warm execs",
                "## The workspace supervisor")  # fmt: skip
    for heading in headings:
        assert heading in report
    latency = {row["contender"] for row in markdown_table(report, "## Round trip")}
    assert latency == {"proxy-kube", "kubectl", "direct-ws", "direct-ws+wrapper", "proxy-local", "subprocess"}
    throughput = {row["contender"] for row in markdown_table(report, "## Streaming throughput")}
    assert throughput == {"proxy-kube", "kubectl", "direct-ws", "proxy-local", "subprocess"}
    concurrency = markdown_table(report, "## Concurrency")
    levels = {(row["contender"], row["streams"]) for row in concurrency}
    assert levels == {(name, level) for name in ("proxy-kube", "proxy-local", "direct-ws") for level in "12"}
    errors = {(row["contender"], row["streams"]): row["errors"] for row in concurrency}
    assert set(errors.values()) == {"0"}, errors
    for mode in ("modern", "old"):  # the warm section: both API test servers, a modelled start cost
        assert f"| {mode} | 25 ms | 1 |" in report


@pytest.mark.timeout(300)
def test_bench_memory_section_runs_quick(tmp_path: Path) -> None:
    """`bench/run.py --memory-only --quick --out FILE` measures every row and puts its section in
    FILE in place of the old one, keeping the rest of the file."""
    out = tmp_path / "report.md"
    out.write_text("# Benchmarks\n\n## Memory: stale figures\n\nSTALE\n\n## Reliability\n\nkept\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--memory-only", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=280, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = out.read_text()
    assert "STALE" not in report
    assert report.index("## Memory") < report.index("## Reliability\n\nkept")
    rows = {row["proxy"]: row for row in markdown_table(report, "## Memory")}
    assert set(rows) == {
        "local backend", "kubernetes, in-cluster (a pod's token, CA, service variables)",
        "kubernetes, kubeconfig (loads kubernetes-asyncio)",
        "kubernetes, in-cluster, `MALLOC_TRIM_THRESHOLD_=0` (glibc gives freed memory back at once)",
    }  # fmt: skip
    for row in rows.values():
        assert row["idle RSS"].endswith(" MB"), row
        assert row["peak (VmHWM)"].endswith(" MB"), row


def test_every_table_in_benchmarks_md_is_written_by_the_bench() -> None:
    """Every figure table of BENCHMARKS.md sits in a section that bench/run.py rewrites on each
    run (its marked sections, and the memory section it replaces by heading), so none can be
    left from an older run; the file names no file that does not exist, and no issue numbers."""
    text = (ROOT / "BENCHMARKS.md").read_text()
    marked = r"<!-- written by bench/run.py \((.+?)\);.*?<!-- end of what bench/run.py \(\1\) writes -->"
    outside = re.sub(marked, "", text, flags=re.DOTALL)
    outside = outside[: outside.index("## Memory: at rest")]  # from here on: bench/memory.py's section
    tables = [line for line in outside.splitlines() if line.startswith("|")]
    assert tables == [], tables[:3]
    named = set(re.findall(r"`((?:bench|tests|session_proxy|manifests|docs|supervisor)/[\w./-]+)`", text))
    named |= set(re.findall(r"\]\(((?:docs|bench)/[\w./-]+)\)", text))
    assert named, "the file names the scripts that write it"
    assert [path for path in sorted(named) if not (ROOT / path).exists()] == []
    assert re.findall(r"(?i)\bissues? #?\d+|(?<![\w/-])#\d+", text) == []
