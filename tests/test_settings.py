"""Settings: flags win over SESSION_PROXY_* variables; bad values stop start-up, named clearly."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from session_proxy.cli import build_parser, describe_settings_error, settings_from
from session_proxy.settings import DEFAULT_CA_FILE, DEFAULT_TOKEN_FILE, Settings


def parse(argv: list[str], environ: dict[str, str]) -> Settings:
    return settings_from(build_parser().parse_args(["serve", *argv]), environ)


README = Path(__file__).resolve().parent.parent / "README.md"
# Defaults the README states in words; each is checked here, everything else must be `literal`.
DEFAULTS_IN_WORDS: dict[str, tuple[str, object]] = {
    "unsafe_listen_any_address": ("off", False),
    "ops_listen": (
        "`0.0.0.0:9464` in a cluster (`KUBERNETES_SERVICE_HOST` set), else `127.0.0.1:9464`",
        "127.0.0.1:9464",
    ),
    "auth_token_file": ("unset: no token", None),
    "backend": ("`kubernetes` in a cluster (`KUBERNETES_SERVICE_HOST` set), else `local`", "local"),
    "local_root": ("current directory", Path.cwd().resolve()),
    "kubeconfig": ("`$KUBECONFIG`", None),
    "token_file": ("the standard service-account paths", DEFAULT_TOKEN_FILE),
    "ca_file": ("the standard service-account paths", DEFAULT_CA_FILE),
    "namespace": ("`$POD_NAMESPACE`", None),
    "session_name": ("`$SESSION_NAME`", None),
    "workspace_selector": ("`session=$SESSION_NAME,type=workspace`", None),
    "workspace_pod": ("unset", None),
    "owner_kind": ("unset", None),
    "owner_api_group": ("unset", ""),
    "owner_name": ("unset", None),
    "owner_uid": ("unset", None),
    "mcp_workdir": ("unset: the backend's default", None),
}


def documented_defaults() -> dict[str, str]:
    """Setting name -> the README table's default cell (one literal per flag where it lists several)."""
    table: dict[str, str] = {}
    for line in README.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`--"):
            continue
        names = [flag.strip("`").removeprefix("--").replace("-", "_") for flag in cells[0].split(", ")]
        literals = re.findall(r"`([^`]*)`", cells[2].split(" (")[0])
        for index, name in enumerate(names):
            if name in DEFAULTS_IN_WORDS:
                table[name] = cells[2]
            else:
                assert len(literals) == len(names), f"{cells[0]}: not one literal default per flag"
                table[name] = literals[index]
    return table


def test_defaults_match_the_documented_table() -> None:
    """Every setting is in the README's table, and its default there is the one ``Settings`` has
    (outside a cluster, without variables)."""
    settings = parse([], {})
    documented = documented_defaults()
    assert sorted(documented) == sorted(Settings.model_fields)
    for name, text in documented.items():
        actual = getattr(settings, name)
        if name in DEFAULTS_IN_WORDS:
            words, expected = DEFAULTS_IN_WORDS[name]
            assert (text, actual) == (words, expected), name
        elif name == "unix_socket_mode":
            assert int(text, 8) == actual
        elif isinstance(actual, bool | str):
            assert text == str(actual), name
        else:
            assert float(text) == actual, name


def test_in_cluster_default_backend_is_kubernetes() -> None:
    """KUBERNETES_SERVICE_HOST (set in every pod) makes kubernetes the default backend."""
    settings = parse([], {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "SESSION_NAME": "s1"})
    assert settings.backend == "kubernetes"
    assert parse(["--backend", "local"], {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}).backend == "local"


def test_downward_api_variables_fill_defaults_and_lose_to_our_own() -> None:
    """POD_NAMESPACE, SESSION_NAME and KUBECONFIG are defaults; SESSION_PROXY_* and flags win."""
    environ = {"POD_NAMESPACE": "ns1", "SESSION_NAME": "s1", "KUBECONFIG": "/k/config"}
    settings = parse([], environ)
    assert (settings.namespace, settings.session_name, settings.kubeconfig) == ("ns1", "s1", "/k/config")
    settings = parse(["--namespace", "ns3"], {**environ, "SESSION_PROXY_SESSION_NAME": "s2"})
    assert (settings.namespace, settings.session_name) == ("ns3", "s2")


def test_settings_model_ignores_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only ``Settings.load`` reads variables: the model's own defaults are fixed."""
    for name, value in [("KUBERNETES_SERVICE_HOST", "10.0.0.1"), ("SESSION_NAME", "s1"),
                        ("POD_NAMESPACE", "ns1"), ("KUBECONFIG", "/k/config")]:  # fmt: skip
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.backend == "local"
    assert settings.session_name is settings.namespace is settings.kubeconfig is None


def test_kubernetes_backend_needs_a_selector() -> None:
    """Without SESSION_NAME or --workspace-selector there is nothing to select: refused."""
    with pytest.raises(ValidationError) as caught:
        parse(["--backend", "kubernetes"], {})
    assert "--workspace-selector" in describe_settings_error(caught.value)


def test_workspace_pod_is_a_pod_name() -> None:
    """--workspace-pod alone is enough to find the pod; it must be a valid pod name."""
    settings = parse(["--backend", "kubernetes", "--workspace-pod", "workspace-a.1"], {})
    assert settings.workspace_pod == "workspace-a.1"
    for bad in ("Workspace", "ws_1", "-ws", "ws,metadata.namespace=x"):
        with pytest.raises(ValidationError) as caught:
            parse([f"--workspace-pod={bad}"], {})
        assert "--workspace-pod" in describe_settings_error(caught.value)


def test_flag_wins_over_environment() -> None:
    """A flag overrides its SESSION_PROXY_ variable; the variable applies when no flag is given."""
    environ = {"SESSION_PROXY_MAX_CONCURRENT": "3", "SESSION_PROXY_IDLE_TIMEOUT": "7"}
    settings = parse(["--max-concurrent", "5"], environ)
    assert settings.max_concurrent == 5
    assert settings.idle_timeout == 7


def test_selector_defaults_from_session_name() -> None:
    """The workspace selector is derived from SESSION_NAME unless given."""
    settings = parse(["--session-name", "s-42"], {})
    assert settings.effective_workspace_selector == "session=s-42,type=workspace"
    settings = parse(["--workspace-selector", "app=ws"], {"SESSION_PROXY_SESSION_NAME": "x"})
    assert settings.effective_workspace_selector == "app=ws"


@pytest.mark.parametrize(
    ("argv", "environ", "needle"),
    [
        (["--max-concurrent", "lots"], {}, "--max-concurrent"),
        ([], {"SESSION_PROXY_MAX_CONCURRENT": "0"}, "SESSION_PROXY_MAX_CONCURRENT"),
        (["--backend", "docker"], {}, "'kubernetes' or 'local'"),
        (["--listen", "0.0.0.0:8081"], {}, "--unsafe-listen-any-address"),
        (["--listen", "example.com:80"], {}, "IP address or 'localhost'"),
        (["--listen", "127.0.0.1:99999"], {}, "0 to 65535"),
        (["--listen", "unix:relative.sock"], {}, "absolute"),
        (["--ops-listen", "unix:/tmp/x.sock"], {}, "HOST:PORT"),
        (["--default-timeout", "100", "--max-timeout", "10"], {}, "exceeds max_timeout"),
        (["--local-root", "/no/such/dir"], {}, "not a directory"),
        (["--log-format", "xml"], {}, "'json' or 'text'"),
    ],
)
def test_bad_settings_are_named_with_accepted_values(
    argv: list[str], environ: dict[str, str], needle: str
) -> None:
    """Each bad value yields a message naming the setting and what is accepted."""
    with pytest.raises(ValidationError) as caught:
        parse(argv, environ)
    assert needle in describe_settings_error(caught.value)


def test_non_loopback_listen_needs_the_loud_flag() -> None:
    """0.0.0.0 is allowed only with --unsafe-listen-any-address."""
    settings = parse(["--listen", "0.0.0.0:8081", "--unsafe-listen-any-address"], {})
    assert settings.listen == "0.0.0.0:8081"


def test_serve_exits_2_with_one_clear_line(tmp_path: Path) -> None:
    """A real start-up with a bad value stops with exit 2 and a line naming flag and variable."""
    result = subprocess.run(
        [sys.executable, "-m", "session_proxy", "serve", "--kill-grace", "-1"],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("session-proxy: invalid setting --kill-grace / SESSION_PROXY_KILL_GRACE")
    assert "greater than or equal to 0" in result.stderr


def test_kubernetes_backend_outside_a_cluster_says_what_to_do(tmp_path: Path) -> None:
    """The kubernetes backend with no cluster and no kubeconfig stops start-up with advice."""
    env = {k: v for k, v in os.environ.items() if k not in ("KUBERNETES_SERVICE_HOST", "KUBECONFIG")}
    result = subprocess.run(
        [sys.executable, "-m", "session_proxy", "serve", "--backend", "kubernetes", "--session-name", "s1"],
        capture_output=True, text=True, timeout=30, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert result.returncode == 2
    assert "pass --kubeconfig" in result.stderr


def test_serve_prints_one_prefixed_line_per_bad_setting(tmp_path: Path) -> None:
    """Two bad values: exit 2 and exactly two lines, each naming its setting, nothing else."""
    result = subprocess.run(
        [sys.executable, "-m", "session_proxy", "serve", "--kill-grace", "-1", "--max-concurrent", "0"],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 2
    assert all(line.startswith("session-proxy: invalid setting --") for line in lines)


def test_listen_failure_exits_1_with_one_line(tmp_path: Path) -> None:
    """An address in use: exit 1 and one line saying it cannot listen (no log noise before it)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "session_proxy", "serve", "--backend", "local",
             "--listen", f"127.0.0.1:{port}", "--ops-listen", ""],
            capture_output=True, text=True, timeout=30, cwd=tmp_path,
        )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("session-proxy: cannot listen: ")
    assert "address already in use" in lines[0]
