"""session-proxy: the exec sidecar between an AI agent and its workspace pod."""

__version__ = "0.1.0"
