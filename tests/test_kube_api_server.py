"""The Kubernetes API test server is faithful: the real kubectl works against it."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest

from .conftest import TOKEN

KUBECTL = shutil.which("kubectl")


@pytest.fixture
def kubeconfig(kube: Any, tmp_path: Path) -> Path:
    assert KUBECTL, "kubectl must be installed: these tests prove the test server is faithful"
    return kube.write_kubeconfig(tmp_path / "kubeconfig", TOKEN)


async def kubectl(kubeconfig: Path, *args: str, stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
    """Run the real kubectl without blocking the loop that serves the test API server."""
    assert KUBECTL
    process = await asyncio.create_subprocess_exec(
        KUBECTL, "--kubeconfig", str(kubeconfig), "--cache-dir", str(kubeconfig.parent / "kcache"),
        "--request-timeout", "20s", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(stdin), timeout=60)
    assert process.returncode is not None
    return process.returncode, stdout, stderr


async def test_kubectl_lists_pods_by_label(kube: Any, kubeconfig: Path) -> None:
    """`kubectl get pods -l` sends the selector and shows only matching pods."""
    kube.add_pod("ws-1", labels={"session": "s1", "type": "workspace"})
    kube.add_pod("ws-2", labels={"session": "s2", "type": "workspace"})
    code, out, err = await kubectl(kubeconfig, "get", "pods", "-l", "session=s1,type=workspace", "-o", "name")
    assert code == 0, err
    assert out.decode().split() == ["pod/ws-1"]
    code, out, err = await kubectl(kubeconfig, "get", "pods", "-l", "session=s1")
    assert code == 0, err
    assert "ws-1" in out.decode()
    assert "ws-2" not in out.decode()
    selectors = [dict(r.query).get("labelSelector") for r in kube.requests if r.path.endswith("/pods")]
    assert "session=s1,type=workspace" in selectors
    assert all(
        r.headers.get("Authorization") == f"Bearer {TOKEN}" for r in kube.requests if r.path.endswith("/pods")
    )


async def test_kubectl_exec_streams_and_exit_code(kube: Any, kubeconfig: Path) -> None:
    """`kubectl exec` gets stdout and stderr apart and exits with the command's code (v5 or v4)."""
    kube.add_pod("ws")
    code, out, err = await kubectl(
        kubeconfig, "exec", "ws", "-c", "workspace", "--", "sh", "-c", "echo out; echo err >&2; exit 3"
    )
    exec_requests = kube.exec_requests()
    assert exec_requests, "kubectl never reached the exec endpoint"
    if kube.mode == "modern":
        assert out == b"out\n"
        assert err == b"err\ncommand terminated with exit code 3\n"
        assert code == 3, err
        assert exec_requests[-1].headers["Sec-WebSocket-Protocol"] == "v5.channel.k8s.io"
    else:
        # kubectl's WebSocket client offers only v5: an old server refuses the handshake, and
        # kubectl falls back to SPDY, which this test server does not speak.
        assert code != 0
        assert [r.method for r in exec_requests] == ["GET", "POST"]


@pytest.mark.parametrize("api_mode", ["modern"])  # kubectl speaks only v5 over WebSocket
async def test_kubectl_exec_with_stdin(kube: Any, kubeconfig: Path) -> None:
    """`kubectl exec -i` delivers stdin and then EOF (v5 CLOSE), so `cat` ends."""
    kube.add_pod("ws")
    data = bytes(range(256)) * 100
    code, out, err = await kubectl(kubeconfig, "exec", "-i", "ws", "-c", "workspace", "--", "cat", stdin=data)
    assert code == 0, err
    assert out == data
    assert ("stdin", "true") in kube.exec_requests()[-1].query


async def test_kubectl_sees_not_found_and_forbidden(kube: Any, kubeconfig: Path) -> None:
    """A missing pod is NotFound and a denied verb is Forbidden, with the real messages."""
    code, _, err = await kubectl(kubeconfig, "get", "pod", "nope")
    assert code == 1
    assert b'pods "nope" not found' in err
    kube.add_pod("ws")
    kube.forbidden.add(("list", "pods"))
    code, _, err = await kubectl(kubeconfig, "get", "pods")
    assert code == 1
    assert (
        b'pods is forbidden: User "system:serviceaccount:default:session-proxy" cannot list resource "pods"'
        in err
    )


async def test_kubectl_exec_into_a_missing_container(kube: Any, kubeconfig: Path) -> None:
    """A container name the pod does not have is a 400 BadRequest with the real message."""
    kube.add_pod("ws")
    code, _, err = await kubectl(kubeconfig, "exec", "ws", "-c", "nope", "--", "true")
    assert code == 1
    assert b"container nope is not valid for pod ws" in err


async def test_kubectl_without_valid_token_is_unauthorized(kube: Any, tmp_path: Path) -> None:
    """A wrong bearer token gets 401, which kubectl reports as such."""
    assert KUBECTL
    config = kube.write_kubeconfig(tmp_path / "bad-kubeconfig", "wrong-token")
    code, _, err = await kubectl(config, "get", "pods")
    assert code == 1
    assert b"Unauthorized" in err or b"provide credentials" in err


@pytest.mark.parametrize("api_mode", ["modern"])  # kubectl speaks only v5 over WebSocket
async def test_kubectl_sees_a_killed_process_as_128_plus_n(kube: Any, kubeconfig: Path) -> None:
    """A process killed by SIGKILL reaches kubectl as `command terminated with exit code 137`,
    and kubectl exits 137: the status this server writes for a signal death is the real one.
    (That runtimes report a signal death as 128+N is runc's rule: libcontainer/utils
    `ExitStatus`, `exitSignalOffset = 128`; containerd passes it on unchanged.)"""
    kube.add_pod("ws")
    code, _, err = await kubectl(
        kubeconfig, "exec", "ws", "-c", "workspace", "--", "sh", "-c", "kill -KILL $$"
    )
    assert err.endswith(b"command terminated with exit code 137\n"), err
    assert code == 137


@pytest.mark.parametrize("api_mode", ["modern"])
async def test_kubectl_sees_a_lost_container_after_the_upgrade_on_v5(kube: Any, kubeconfig: Path) -> None:
    """On the v5 path a container the kubelet cannot find is reported after the upgrade, as an
    InternalError status on channel 3, which kubectl prints as the error (exit 1). (The v4 path
    answers HTTP 500 before the upgrade instead: the CRI streaming server writes the error with
    `WriteError`, k8s.io/kubelet pkg/cri/streaming/errors.go, and the API server's
    UpgradeAwareHandler passes a non-101 answer through, apimachinery pkg/util/proxy/upgradeaware.go;
    kubectl cannot show it, since it offers only v5 over WebSocket.)"""
    kube.add_pod("ws", container_gone=True)
    code, _, err = await kubectl(kubeconfig, "exec", "ws", "-c", "workspace", "--", "true")
    assert b'unable to upgrade connection: container not found ("workspace")' in err, err
    assert code == 1
    assert kube.exec_requests()[-1].headers["Sec-WebSocket-Protocol"] == "v5.channel.k8s.io"


async def test_kubectl_watches_pods(kube: Any, kubeconfig: Path) -> None:
    """`kubectl get pods -w` lists, then watches from the list's resourceVersion and prints each
    change as it happens: the test server's watch streams are the real wire format."""
    assert KUBECTL
    pod = kube.add_pod("ws-1", labels={"session": "s1"})
    template = "jsonpath={.type} {.object.metadata.name} {.object.status.conditions[0].status}{'\\n'}"
    process = await asyncio.create_subprocess_exec(
        KUBECTL, "--kubeconfig", str(kubeconfig), "--cache-dir", str(kubeconfig.parent / "kcache"),
        "get", "pods", "-l", "session=s1", "-w", "--output-watch-events", "-o", template,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None

    async def line() -> bytes:
        assert process.stdout is not None
        return await asyncio.wait_for(process.stdout.readline(), timeout=30)

    try:
        assert await line() == b"ADDED ws-1 True\n"
        pod.ready = False
        assert await line() == b"MODIFIED ws-1 False\n"
        kube.add_pod("other", labels={"session": "s2"})  # not selected: no event
        kube.delete_pod("ws-1")
        assert await line() == b"DELETED ws-1 False\n"
    finally:
        process.kill()
        await process.wait()
    listed, watched = [dict(r.query) for r in kube.requests if r.path.endswith("/pods")][-2:]
    assert watched["watch"] == "true"
    assert watched["labelSelector"] == "session=s1"
    assert int(watched["resourceVersion"]) >= 1
    assert "watch" not in listed
