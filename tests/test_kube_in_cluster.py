"""In-cluster credentials (read without kubernetes-asyncio): what a pod's broken files cause."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from session_proxy.app import StartupFailed

from .conftest import TOKEN, ProxyFactory


@pytest.fixture
def pod_files(kube: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What a pod gives the proxy: the service variables, a token file and the CA file."""
    host, port = kube.url.removeprefix("https://").rsplit(":", 1)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
    (tmp_path / "token").write_text(TOKEN + "\n")
    return {
        "backend": "kubernetes", "token_file": str(tmp_path / "token"),
        "ca_file": str(kube.write_ca(tmp_path / "ca.crt")), "namespace": "default", "session_name": "s1",
    }  # fmt: skip


async def test_a_missing_token_file_stops_start_up(
    make_proxy: ProxyFactory, pod_files: dict[str, Any], tmp_path: Path
) -> None:
    """No token file: start-up fails naming the file, before any call to the API server."""
    with pytest.raises(StartupFailed, match=r"service-account token file .*nope"):
        await make_proxy(**{**pod_files, "token_file": str(tmp_path / "nope")})


@pytest.mark.parametrize("content", [None, b"not a certificate\n"])
async def test_an_unusable_ca_file_stops_start_up(
    make_proxy: ProxyFactory, pod_files: dict[str, Any], tmp_path: Path, content: bytes | None
) -> None:
    """A CA file that is missing or holds no certificate: start-up fails saying TLS cannot be set up."""
    ca = tmp_path / "bad-ca.crt"
    if content is not None:
        ca.write_bytes(content)
    with pytest.raises(StartupFailed, match=r"cannot set up TLS to the API server with the CA file .*bad-ca"):
        await make_proxy(**{**pod_files, "ca_file": str(ca)})


async def test_a_server_the_ca_does_not_vouch_for_never_sees_the_token(
    http: aiohttp.ClientSession, kube: Any, make_proxy: ProxyFactory, pod_files: dict[str, Any],
    tmp_path: Path,
) -> None:  # fmt: skip
    """The CA file is another cluster's: the TLS handshake fails, the exec is refused as the API
    server unreachable, and no request (so no token) reaches the server."""
    kube.add_pod("ws-1", labels={"session": "s1", "type": "workspace"})
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "other-ca.crt"))
    proxy = await make_proxy(**{**pod_files, "ca_file": str(tmp_path / "other-ca.crt")})
    async with http.post(f"{proxy.url}/exec", json={"command": ["true"]}) as response:
        body = await response.json()
    assert response.status in (502, 503), body
    assert "certificate" in body["error"]["message"], body
    assert kube.requests == []
    assert TOKEN not in str(body)
