"""The README's configuration table is the truth about every setting: each one is listed once,
and each documented default is the default `serve` really uses."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from session_proxy.cli import build_parser, settings_from
from session_proxy.settings import Settings, flag_name

README = Path(__file__).resolve().parent.parent / "README.md"
# What the environment-derived defaults are tried with (the downward API, a kubeconfig, a pod).
SENTINELS = {
    "KUBECONFIG": "/sentinel/kubeconfig",
    "POD_NAMESPACE": "ns-sentinel",
    "SESSION_NAME": "session-sentinel",
    "KUBERNETES_SERVICE_HOST": "10.0.0.1",
}
# Defaults the table states in words, each with what it means for the value.
PHRASES: dict[str, Callable[[Any], bool]] = {
    "off": lambda value: value is False,
    "unset": lambda value: value in (None, ""),
    "unset: no token": lambda value: value is None,
    "unset: the backend's default": lambda value: value is None,
    "current directory": lambda value: value == Path.cwd().resolve(),
    "the standard service-account paths": lambda value: str(value).startswith(
        "/var/run/secrets/kubernetes.io/serviceaccount/"
    ),
}
IN_A_CLUSTER = re.compile(r"`([^`]+)` in a cluster \(`(\w+)` set\), else `([^`]+)`")
SIZE = re.compile(r"^`(\d+)` \((\d+) (KiB|MiB)\)$")


def documented_defaults() -> dict[str, str]:
    """Flag -> the default cell of its row in the README's configuration table."""
    text = README.read_text()
    section = text[text.index("## Configuration") : text.index("## Metrics")]
    rows = [line for line in section.splitlines() if line.startswith("| `--")]
    defaults: dict[str, str] = {}
    for row in rows:
        flags_cell, _meaning, default_cell = (cell.strip() for cell in row.strip("| ").rsplit(" | ", 2))
        flags = re.findall(r"`(--[a-z-]+)`", flags_cell)
        values = (
            default_cell.split(", ") if len(flags) > 1 and default_cell.count("`") == 2 * len(flags) else []
        )
        for index, flag in enumerate(flags):
            assert flag not in defaults, f"{flag} has two rows"
            defaults[flag] = values[index] if values else default_cell
    return defaults


def serve_settings(monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], *flags: str) -> Settings:
    """The settings `session-proxy serve FLAGS` gets in exactly this environment."""
    for name in SENTINELS:
        monkeypatch.delenv(name, raising=False)
    for name in [name for name in os.environ if name.startswith("SESSION_PROXY_")]:
        monkeypatch.delenv(name)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    return settings_from(build_parser().parse_args(["serve", *flags]), environ)


def current(settings: Settings, field: str) -> Any:
    """A setting's value as the proxy uses it (a derived default where there is one)."""
    return getattr(settings, f"effective_{field}", getattr(settings, field))


def test_every_setting_has_exactly_one_row() -> None:
    """Each setting's flag has a row of its own, and the table lists no flag that does not exist."""
    documented = set(documented_defaults())
    flags = {flag_name(field) for field in Settings.model_fields}
    assert sorted(flags - documented) == []
    assert sorted(documented - flags) == []


@pytest.mark.parametrize("environ", [{}, SENTINELS], ids=["bare", "in-a-pod"])
@pytest.mark.timeout(30)
def test_documented_defaults_are_the_real_ones(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, environ: dict[str, str]
) -> None:
    """With no flag and no SESSION_PROXY_* variable, every setting has the default the table
    states: a literal gives the same value as passing it as the flag, `$VAR` is that variable,
    and each default stated in words means what it says."""
    monkeypatch.chdir(tmp_path)
    defaults = serve_settings(monkeypatch, environ)
    fields = {flag_name(field): field for field in Settings.model_fields}
    wrong = {}
    for flag, cell in documented_defaults().items():
        field = fields[flag]
        value = current(defaults, field)
        if cell in PHRASES:
            if not PHRASES[cell](value):
                wrong[flag] = (cell, value)
            continue
        if match := IN_A_CLUSTER.fullmatch(cell):
            expected = match[1] if match[2] in environ else match[3]
            if value != expected:
                wrong[flag] = (cell, value)
            continue
        if match := SIZE.fullmatch(cell):
            unit = 1024 if match[3] == "KiB" else 1024 * 1024
            assert int(match[1]) == int(match[2]) * unit, f"{flag}: {cell} does not add up"
            cell = f"`{match[1]}`"
        literal = re.fullmatch(r"`([^`]+)`", cell)
        assert literal, f"{flag}: the default {cell!r} is neither a literal nor a known phrase"
        variables = re.findall(r"\$([A-Z_]+)", literal[1])
        if variables and not all(name in environ for name in variables):
            if value is not None:
                wrong[flag] = (cell, value)
            continue
        text = re.sub(r"\$([A-Z_]+)", lambda m: environ[m[1]], literal[1])
        stated = current(serve_settings(monkeypatch, environ, flag, text), field)
        if value != stated:
            wrong[flag] = (cell, value)
    assert wrong == {}
