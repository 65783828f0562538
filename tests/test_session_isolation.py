"""One session, one identity: a token bound to the session layer's own Role (rendered from
manifests/session/) reaches its session's workspace pod and no other, through the proxy and
through the real kubectl; the Kubernetes API test server enforces the Role as RBAC does."""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from .conftest import ProxyFactory, RunningProxy, exec_events, final, output_of
from .kube_api_server import V5
from .test_kube_api_server import kubectl
from .test_manifests import session_layer

# kubectl speaks only v5 over WebSocket (an old server has it fall back to SPDY, not served).
pytestmark = pytest.mark.parametrize("api_mode", ["modern"])

TOKEN_ALPHA = "token-alpha-0123456789"
USER_ALPHA = "system:serviceaccount:default:session-proxy-alpha"


@pytest.fixture
def sessions(kube: Any, tmp_path: Path) -> dict[str, Any]:
    """Two sessions' workspace pods; alpha's token bound to alpha's rendered Role only."""
    role = next(o for o in session_layer(tmp_path / "layer", "alpha") if o["kind"] == "Role")
    kube.add_token(TOKEN_ALPHA, USER_ALPHA)
    kube.bind_role(USER_ALPHA, role)
    return {
        name: kube.add_pod(f"workspace-{name}", labels={"session": name, "type": "workspace"})
        for name in ("alpha", "beta")
    }


async def alpha_proxy(kube: Any, make_proxy: ProxyFactory, tmp_path: Path, **settings: Any) -> RunningProxy:
    """A proxy holding alpha's token, configured by ``settings`` (which session it serves)."""
    config = kube.write_kubeconfig(tmp_path / "kubeconfig-alpha", TOKEN_ALPHA)
    return await make_proxy(
        backend="kubernetes", kubeconfig=str(config), namespace="default", workspace_wait=0,
        warm_execs=0, kill_grace=1, **settings,
    )  # fmt: skip


def execs_into(kube: Any, pod: str) -> list[Any]:
    return [r for r in kube.exec_requests() if f"/pods/{pod}/exec" in r.path]


async def test_the_token_runs_commands_in_its_own_workspace(
    http: aiohttp.ClientSession, kube: Any, sessions: dict[str, Any], make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """Named by --workspace-pod, alpha's pod is listed, watched and exec'd with alpha's Role,
    every list and watch carrying the metadata.name field selector the Role needs."""
    proxy = await alpha_proxy(
        kube, make_proxy, tmp_path, session_name="alpha", workspace_pod="workspace-alpha"
    )
    events = await exec_events(http, proxy, {"command": ["sh", "-c", "echo mine > owned; cat owned"]})
    assert final(events)["exit_code"] == 0, events
    assert output_of(events, "stdout") == b"mine\n"
    assert (sessions["alpha"].root / "owned").read_text() == "mine\n"
    lists = [r for r in kube.requests if r.path == "/api/v1/namespaces/default/pods"]
    assert lists
    assert {dict(r.query).get("fieldSelector") for r in lists} == {"metadata.name=workspace-alpha"}


async def test_the_token_is_refused_on_another_sessions_pod(
    http: aiohttp.ClientSession, kube: Any, sessions: dict[str, Any], make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """A proxy with alpha's token pointed at beta's pod cannot find it, and when told its name
    cannot exec into it: nothing runs in beta's workspace."""
    proxy = await alpha_proxy(kube, make_proxy, tmp_path, session_name="beta", workspace_pod="workspace-beta")
    async with http.post(f"{proxy.url}/exec", json={"command": ["touch", "taken"]}) as response:
        body = await response.json()
    assert response.status >= 400, body
    assert "forbidden" in body["error"]["message"].lower(), body
    assert not (sessions["beta"].root / "taken").exists()
    assert execs_into(kube, "workspace-beta") == []


async def test_a_name_pinned_role_needs_the_pod_named(
    http: aiohttp.ClientSession, kube: Any, sessions: dict[str, Any], make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    """Without --workspace-pod, the namespace-wide list is refused by alpha's Role: the error
    says so instead of running anything."""
    proxy = await alpha_proxy(kube, make_proxy, tmp_path, session_name="alpha")
    async with http.post(f"{proxy.url}/exec", json={"command": ["true"]}) as response:
        body = await response.json()
    assert response.status >= 400, body
    assert "forbidden" in body["error"]["message"].lower(), body
    assert kube.exec_requests() == []


async def test_kubectl_with_the_token_reaches_only_its_own_pod(
    kube: Any, sessions: dict[str, Any], tmp_path: Path
) -> None:
    """The real kubectl with alpha's token: exec and get on alpha's pod work, a list works only
    naming it; exec, get and a plain list on beta's pod are Forbidden, and nothing runs there."""
    assert shutil.which("kubectl"), "kubectl must be installed"
    config = kube.write_kubeconfig(tmp_path / "kubeconfig-alpha", TOKEN_ALPHA)
    code, out, err = await kubectl(config, "exec", "workspace-alpha", "-c", "workspace", "--", "echo", "mine")
    assert (code, out) == (0, b"mine\n"), err
    code, out, err = await kubectl(
        config, "get", "pods", "--field-selector", "metadata.name=workspace-alpha", "-o", "name"
    )
    assert (code, out) == (0, b"pod/workspace-alpha\n"), err
    for args in (
        ["exec", "workspace-beta", "-c", "workspace", "--", "touch", "taken"],
        ["get", "pod", "workspace-beta"],
        ["get", "pods"],
        ["get", "pods", "--field-selector", "metadata.name=workspace-beta"],
    ):
        code, out, err = await kubectl(config, *args)
        assert code != 0, (args, out)
        assert b"forbidden" in err.lower(), (args, err)
    assert not (sessions["beta"].root / "taken").exists()
    assert execs_into(kube, "workspace-beta") == []


async def test_the_exec_endpoint_itself_refuses_another_sessions_pod(
    http: aiohttp.ClientSession, kube: Any, sessions: dict[str, Any]
) -> None:
    """A WebSocket exec straight to the API with alpha's token: 403 on beta's pod (whatever
    else the token may read), 101 on alpha's."""
    context = ssl.create_default_context(cadata=kube.ca_pem.decode())
    query = [("command", "touch"), ("command", "taken"), ("container", "workspace"), ("stdout", "true")]
    for pod, allowed in (("workspace-beta", False), ("workspace-alpha", True)):
        url = URL(kube.url).with_path(f"/api/v1/namespaces/default/pods/{pod}/exec").with_query(query)
        headers = {"Authorization": f"Bearer {TOKEN_ALPHA}"}
        if allowed:
            async with http.ws_connect(url, protocols=(V5,), headers=headers, ssl=context) as socket:
                async for _ in socket:
                    pass
            assert (sessions["alpha"].root / "taken").exists()
            continue
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(url, protocols=(V5,), headers=headers, ssl=context)
        assert refused.value.status == 403
    assert not (sessions["beta"].root / "taken").exists()
