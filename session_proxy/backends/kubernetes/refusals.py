"""The one place where the Kubernetes backend's troubles become the proxy's HTTP errors.

Everything below it speaks in its own terms (``api_errors``' typed errors, discovery's
``WorkspaceProblem``); what the caller is told, with which status, code and ``Retry-After``,
is decided here.
"""

from __future__ import annotations

from ...errors import BackendFailure, GuardRefused, InvalidRequest, NotReady, ProxyError
from .api_errors import ContainerUnavailable, KubeError, NotFound, Unavailable
from .discovery import WorkspaceProblem

# Seconds a caller should wait before trying again, per problem.
_RETRY = {"not_found": 5, "ambiguous": 5, "not_ready": 2, "terminating": 5}


def refusal(trouble: KubeError | WorkspaceProblem, *, exec_handshake: bool = False) -> ProxyError:
    """The HTTP error for a failed API call or an unusable workspace."""
    if isinstance(trouble, WorkspaceProblem):
        if trouble.kind == "wrong_owner":
            return GuardRefused(trouble.message, code="workspace_owner_mismatch")
        return NotReady(trouble.message, retry_after=_RETRY[trouble.kind], code=f"workspace_{trouble.kind}")
    if exec_handshake and isinstance(trouble, NotFound):
        return NotReady(trouble.message, retry_after=1, code="workspace_not_found")
    if isinstance(trouble, ContainerUnavailable):
        return NotReady(trouble.message, retry_after=2, code="workspace_not_ready")
    if isinstance(trouble, Unavailable):
        return NotReady(
            f"Kubernetes API unavailable: {trouble.message}", retry_after=5, code="api_unavailable"
        )
    return BackendFailure(f"Kubernetes API refused the request ({trouble.status}): {trouble.message}")


def container_lost(message: str) -> ProxyError:
    """The pod outran discovery: its container is not (or no longer) there."""
    return NotReady(f"workspace not ready: {message}", retry_after=2, code="workspace_not_ready")


def probe_failed(message: str) -> ProxyError:
    """The image probe ended without a conclusive answer."""
    return BackendFailure(f"cannot inspect the workspace image: {message}")


def out_of_time(timeout: float, problem: str) -> ProxyError:
    """The request's own timeout ran out before its command could start."""
    return NotReady(
        f"the request's timeout ({timeout:g} s) ran out before the command could start: {problem}",
        retry_after=2,
        code="workspace_not_ready",
    )


def unsupported_inputs(lacking: str, asked: list[str]) -> ProxyError:
    """The image cannot honour some of the request's fields."""
    return InvalidRequest(
        f"the workspace image has {lacking}, so {', '.join(asked)} cannot be given",
        [{"field": name, "reason": f"not supported: the workspace image has {lacking}"} for name in asked],
    )
