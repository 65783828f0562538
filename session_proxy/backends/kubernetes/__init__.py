"""The production backend: exec into the session's workspace pod through the Kubernetes API."""

from .backend import KubernetesBackend

__all__ = ["KubernetesBackend"]
