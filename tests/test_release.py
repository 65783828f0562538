"""A release is one version everywhere it is written, an image built from a hash-checked lock
file that satisfies the project's own dependency ranges, and a changelog entry."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import session_proxy

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Packages whose internals the code subclasses or patches: they need an upper bound.
LEANED_ON = {"aiohttp": "session_proxy/http_protocol.py"}


def locked(text: str) -> dict[str, tuple[str, list[str]]]:
    """The lock file's requirements: name -> (pinned version, hashes)."""
    pins: dict[str, tuple[str, list[str]]] = {}
    for entry in re.split(r"\n(?=\S)", text):
        line = entry.split("\\", 1)[0].splitlines()[0].strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line)
        assert match, f"not pinned with ==: {line!r}"
        pins[canonicalize_name(match.group(1))] = (
            match.group(2),
            re.findall(r"--hash=sha256:([0-9a-f]{64})", entry),
        )
    return pins


def lock_problems(text: str, dependencies: list[str]) -> list[str]:
    """What makes the lock unusable for the image: a dependency missing or outside its range,
    or a pin without a hash."""
    pins = locked(text)
    problems = [f"{name}=={version} has no hash" for name, (version, hashes) in pins.items() if not hashes]
    for dependency in map(Requirement, dependencies):
        name = canonicalize_name(dependency.name)
        if name not in pins:
            problems.append(f"{dependency} is not in the lock")
        elif not dependency.specifier.contains(pins[name][0], prereleases=True):
            problems.append(f"{name}=={pins[name][0]} is outside {dependency}")
    return problems


def image_version() -> str:
    match = re.search(r'org\.opencontainers\.image\.version="([^"]+)"', (ROOT / "Dockerfile").read_text())
    assert match, "the Dockerfile has no image version label"
    return match.group(1)


def manifest_image_tags() -> set[str]:
    tags = set()
    for path in (ROOT / "manifests").rglob("*.yaml"):
        for document in yaml.safe_load_all(path.read_text()):
            for line in yaml.safe_dump(document).splitlines():
                if match := re.search(r"image: session-proxy:(\S+)", line):
                    tags.add(match.group(1))
    return tags


def test_one_version_everywhere() -> None:
    """pyproject, the package, `session-proxy --version`, the image label and the manifests'
    image tag name the same version, and the changelog has an entry for it."""
    version = PYPROJECT["project"]["version"]
    assert session_proxy.__version__ == version
    shown = subprocess.run(
        [sys.executable, "-m", "session_proxy", "--version"], capture_output=True, text=True, timeout=60
    )
    assert shown.stdout.strip() == f"session-proxy {version}", shown
    assert image_version() == version
    assert manifest_image_tags() == {version}
    assert f"\n## {version}\n" in (ROOT / "CHANGELOG.md").read_text()


def test_the_lock_pins_every_dependency_with_hashes() -> None:
    """requirements.lock pins each runtime dependency inside pyproject's range, with hashes."""
    assert lock_problems((ROOT / "requirements.lock").read_text(), PYPROJECT["project"]["dependencies"]) == []


@pytest.mark.parametrize(
    ("mistake", "edit"),
    [
        ("a hash dropped", lambda text: re.sub(r"(aiohttp==\S+)(?: \\\n\s+--hash=\S+)+", r"\1", text)),
        ("a pin outside the range", lambda text: re.sub(r"aiohttp==\S+", "aiohttp==3.15.0", text)),
        ("a dependency missing", lambda text: re.sub(r"\norjson==[^\n]*(\n\s+[^\n]*)*", "", text)),
    ],
)
def test_lock_problems_are_caught(mistake: str, edit: object) -> None:
    """Each way the lock can go stale is reported."""
    text = (ROOT / "requirements.lock").read_text()
    broken = edit(text)  # type: ignore[operator]
    assert broken != text, mistake
    assert lock_problems(broken, PYPROJECT["project"]["dependencies"]), mistake


def test_internals_the_code_leans_on_are_bounded() -> None:
    """A dependency whose internals the code subclasses has an upper bound in pyproject."""
    for name, user in LEANED_ON.items():
        assert f"from {name}." in (ROOT / user).read_text(), f"{user} no longer uses {name}'s internals"
        requirement = next(
            Requirement(d) for d in PYPROJECT["project"]["dependencies"] if Requirement(d).name == name
        )
        assert any(spec.operator in ("<", "<=", "==", "~=") for spec in requirement.specifier), requirement


def test_the_image_installs_from_the_lock() -> None:
    """The Dockerfile installs the dependencies from the lock in hash-checking mode, then the
    project alone, so nothing unlocked comes in."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    runs = [line for line in text.splitlines() if line.startswith("RUN ")]
    assert any("--require-hashes -r requirements.lock" in run for run in runs), runs
    project = [run for run in runs if re.search(r"pip install .* \.(\s|$)", run)]
    assert project, runs
    assert all("--no-deps" in run for run in project), project
