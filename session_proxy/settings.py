"""The proxy's configuration: one frozen, validated object built from flags and environment.

Every field is a public setting: flag ``--some-name`` and variable ``SESSION_PROXY_SOME_NAME``
(the flag wins). The names are part of the interface manifests depend on, so renaming one is a
breaking change. The environment is read in one place, :meth:`Settings.load`; the model itself
has fixed defaults, so ``Settings(...)`` in a test never depends on the process's variables.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MiB = 1024 * 1024
ENV_PREFIX = "SESSION_PROXY_"
DEFAULT_TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # noqa: S105 (a path)
DEFAULT_CA_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
LOOPBACK_NAMES = frozenset({"localhost"})
# A DNS subdomain name (RFC 1123), what Kubernetes accepts as a pod's name.
POD_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


@dataclass(frozen=True)
class TcpAddress:
    host: str
    port: int

    @property
    def is_loopback(self) -> bool:
        if self.host in LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True)
class UnixAddress:
    path: str


ListenAddress = TcpAddress | UnixAddress


def parse_listen_address(value: str) -> ListenAddress:
    """Parse ``HOST:PORT``, ``[V6]:PORT`` or ``unix:/absolute/path``."""
    if value.startswith("unix:"):
        path = value.removeprefix("unix:")
        if not path.startswith("/"):
            raise ValueError("a unix socket path must be absolute, e.g. unix:/run/proxy/exec.sock")
        return UnixAddress(path)
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError("expected HOST:PORT (e.g. 127.0.0.1:8081) or unix:/path")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port must be a number from 0 to 65535, got {port_text!r}")
    if host not in LOOPBACK_NAMES:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"host must be an IP address or 'localhost', got {host!r}") from None
    return TcpAddress(host, int(port_text))


# Settings whose default comes from a variable that is not ours: the downward API, kubectl's
# KUBECONFIG. The SESSION_PROXY_ variable and the flag still win over these.
INHERITED_VARIABLES: Mapping[str, str] = {
    "kubeconfig": "KUBECONFIG",
    "namespace": "POD_NAMESPACE",
    "session_name": "SESSION_NAME",
}
IN_CLUSTER_VARIABLE = "KUBERNETES_SERVICE_HOST"  # set by the kubelet in every pod
# In a pod the kubelet's probes and Prometheus reach the ops port on the pod's IP.
IN_CLUSTER_OPS_LISTEN = "0.0.0.0:9464"


class Settings(BaseModel):
    """All settings; see the README's configuration table for the user-facing description."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Listeners
    listen: str = Field("127.0.0.1:8081", description="exec API address HOST:PORT or unix:/path")
    ops_listen: str = Field(
        "127.0.0.1:9464",
        description="ops address (metrics, probes); empty disables; every interface in a pod",
    )
    unsafe_listen_any_address: bool = Field(
        False, description="allow a non-loopback exec API address (exposes command execution)"
    )
    unix_socket_mode: int = Field(0o660, ge=0, le=0o777, description="permissions of a unix socket")
    auth_token_file: str | None = Field(
        None,
        description="require 'Authorization: Bearer <token>' from this file on the exec API "
        "(the file is created with a random token if missing)",
    )

    # Backend
    backend: Literal["kubernetes", "local"] = Field(
        "local", description="where commands run; default kubernetes inside a cluster"
    )
    local_root: Path = Field(Path("."), validate_default=True, description="local backend working dir")
    kubeconfig: str | None = Field(None, description="kubeconfig file instead of in-cluster config")
    token_file: str = Field(DEFAULT_TOKEN_FILE, description="service-account token file")
    ca_file: str = Field(DEFAULT_CA_FILE, description="API server CA bundle")
    namespace: str | None = Field(
        None, description="namespace of the workspace pod (downward API POD_NAMESPACE)"
    )
    session_name: str | None = Field(None, description="session name (downward API SESSION_NAME)")
    workspace_selector: str | None = Field(
        None,
        description="label selector of the workspace pod; default session=$SESSION_NAME,type=workspace",
    )
    workspace_pod: str | None = Field(
        None,
        description="name of the workspace pod: lists and watches name it (metadata.name field "
        "selector), as a Role pinned to it by resourceNames requires",
    )
    workspace_container: str = Field("workspace", min_length=1, description="container to exec into")
    workspace_supervisor: str = Field(
        "/session-proxy/workspace-supervisor",
        pattern=r"^(/[A-Za-z0-9._-]+)*$",
        description="where the workspace pod carries the workspace supervisor; empty: never use it",
    )
    workspace_wait: float = Field(
        60, ge=0, description="seconds a request waits for a starting workspace pod before 503"
    )
    owner_kind: str | None = Field(None, description="kind the workspace pod must be owned by")
    owner_api_group: str = Field("", description="API group of that owner ('' is the core group)")
    owner_name: str | None = Field(None, description="name of that owner")
    owner_uid: str | None = Field(None, description="uid of that owner (optional, stricter)")
    api_timeout: float = Field(10, gt=0, description="seconds for one Kubernetes API call")
    exec_ping_interval: float = Field(
        5, gt=0, description="seconds between WebSocket pings on each exec stream"
    )
    exec_ping_timeout: float = Field(
        30, gt=0, description="seconds an exec stream's peer may stay silent before it is transport_lost"
    )
    warm_execs: int = Field(
        2, ge=0, le=100, description="pre-opened wrapper execs kept per workspace pod; 0 turns the pool off"
    )
    warm_exec_idle: float = Field(
        600, gt=0, description="seconds without requests after which every warm exec is closed"
    )
    warm_exec_max_age: float = Field(
        300, gt=0, description="seconds after which an unused warm exec is replaced by a new one"
    )
    warm_exec_fresh: float = Field(
        1,
        ge=0,
        le=60,
        description="seconds: a warm exec heard from this recently (its open, a pong) is used without a "
        "liveness ping first; 0 pings before every use",
    )

    # Limits
    max_concurrent: int = Field(10, ge=1, le=10_000, description="execs running at once")
    default_timeout: float = Field(300, gt=0, description="seconds, when a request names none")
    max_timeout: float = Field(1800, gt=0, description="largest timeout a request may ask for")
    idle_timeout: float = Field(0, ge=0, description="seconds without output; 0 disables")
    max_output_bytes: int = Field(16 * MiB, ge=1, description="per exec, stdout+stderr")
    max_body_bytes: int = Field(1 * MiB, ge=1024, description="largest /exec request body")
    body_timeout: float = Field(5, gt=0, description="seconds a request body may take to arrive before 408")
    rate_limit: float = Field(20, ge=0, description="requests per second; 0 disables")
    rate_burst: int = Field(40, ge=1, description="requests allowed at once before the rate applies")
    rate_limit_wait: float = Field(
        0.5, ge=0, description="seconds a request over the rate may wait for capacity before 429"
    )
    kill_grace: float = Field(5, ge=0, description="seconds between TERM and KILL")
    max_jobs: int = Field(4, ge=1, le=1000, description="background jobs running at once (its own cap)")
    max_job_duration: float = Field(
        3600, gt=0, description="seconds a background job may run: its default and largest timeout"
    )
    job_output_bytes: int = Field(
        1 * MiB, ge=1024, le=64 * MiB, description="bytes kept per stream of a job; older ones are dropped"
    )
    job_retention: float = Field(600, ge=0, description="seconds an ended job stays readable")
    shutdown_grace: float = Field(20, ge=0, description="seconds running execs may finish on SIGTERM")

    # MCP (/mcp on the exec listener)
    mcp_workdir: str | None = Field(
        None, description="working directory of the MCP exec tool when a call names none (absolute)"
    )
    mcp_max_output_chars: int = Field(
        30_000, ge=1000, description="MCP exec results longer than this are cut in the middle"
    )
    mcp_max_sessions: int = Field(
        16, ge=1, le=1000, description="MCP sessions open at once; one more gets 503 until one ends"
    )
    mcp_session_idle: float = Field(
        600, ge=1, le=86_400, description="seconds after which an MCP session without requests ends"
    )

    # Logs
    log_format: Literal["json", "text"] = Field("json", description="log line format")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    @classmethod
    def load(cls, flags: Mapping[str, object | None], environ: Mapping[str, str]) -> Settings:
        """Build the settings: a flag, else its ``SESSION_PROXY_`` variable, else the default.

        ``flags`` maps field names to given values (None: not given). Defaults that depend on
        where the proxy runs (in a cluster, the downward API, ``KUBECONFIG``) are read here from
        ``environ`` and nowhere else. Raises pydantic's ``ValidationError`` on a bad value.
        """
        values: dict[str, object] = {}
        for name in cls.model_fields:
            given = flags.get(name)
            if given is not None:
                values[name] = given
            elif env_name(name) in environ:
                values[name] = environ[env_name(name)]
            elif environ.get(INHERITED_VARIABLES.get(name, "")):
                values[name] = environ[INHERITED_VARIABLES[name]]
        if "backend" not in values and environ.get(IN_CLUSTER_VARIABLE):
            values["backend"] = "kubernetes"
        if "ops_listen" not in values and environ.get(IN_CLUSTER_VARIABLE):
            values["ops_listen"] = IN_CLUSTER_OPS_LISTEN
        return cls.model_validate(values)

    @field_validator("unix_socket_mode", mode="before")
    @classmethod
    def _mode_is_octal(cls, value: object) -> object:
        # Written like chmod takes it: "660" or "0o660" means octal.
        if isinstance(value, str):
            try:
                return int(value.removeprefix("0o"), 8)
            except ValueError:
                raise ValueError("expected octal permissions such as 660") from None
        return value

    @field_validator("mcp_workdir")
    @classmethod
    def _mcp_workdir_is_absolute(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith("/"):
            raise ValueError("must be an absolute path, e.g. /workspace")
        return value

    @field_validator("workspace_pod")
    @classmethod
    def _workspace_pod_is_a_name(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not POD_NAME.fullmatch(value):
            raise ValueError(f"not a pod name (lowercase letters, digits, '-' and '.'): {value!r}")
        return value

    @field_validator("listen")
    @classmethod
    def _listen_is_parseable(cls, value: str) -> str:
        parse_listen_address(value)
        return value

    @field_validator("ops_listen")
    @classmethod
    def _ops_listen_is_tcp(cls, value: str) -> str:
        if value and not isinstance(parse_listen_address(value), TcpAddress):
            raise ValueError("the ops listener must be HOST:PORT (probes and scrapes use the pod IP)")
        return value

    @field_validator("local_root")
    @classmethod
    def _local_root_is_directory(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"not a directory: {value}")
        return value.resolve()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        address = self.listen_address
        if isinstance(address, TcpAddress) and not address.is_loopback and not self.unsafe_listen_any_address:
            raise ValueError(
                f"listen: {self.listen} is not a loopback address; the exec API runs commands, so "
                "bind 127.0.0.1, [::1], localhost or unix:/path, or pass "
                "--unsafe-listen-any-address if you really mean it"
            )
        if self.backend == "kubernetes" and not (self.effective_workspace_selector or self.workspace_pod):
            raise ValueError(
                "workspace_selector: the kubernetes backend needs --workspace-selector, "
                "--workspace-pod, or SESSION_NAME to derive session=<name>,type=workspace"
            )
        if bool(self.owner_kind) != bool(self.owner_name):
            raise ValueError("owner_kind and owner_name: give both (or neither) to require an owner")
        if self.exec_ping_timeout <= self.exec_ping_interval:
            raise ValueError(
                f"exec_ping_timeout: {self.exec_ping_timeout} must exceed exec_ping_interval "
                f"{self.exec_ping_interval}, or a quiet command would be cut between two pings"
            )
        if self.default_timeout > self.max_timeout:
            raise ValueError(
                f"default_timeout: {self.default_timeout} exceeds max_timeout {self.max_timeout}"
            )
        return self

    @property
    def listen_address(self) -> ListenAddress:
        return parse_listen_address(self.listen)

    @property
    def ops_address(self) -> TcpAddress | None:
        if not self.ops_listen:
            return None
        address = parse_listen_address(self.ops_listen)
        assert isinstance(address, TcpAddress)
        return address

    @property
    def effective_workspace_selector(self) -> str | None:
        if self.workspace_selector:
            return self.workspace_selector
        if self.session_name:
            return f"session={self.session_name},type=workspace"
        return None


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")
