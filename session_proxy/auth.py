"""An optional shared secret for the exec API, kept in a file the agent container can read.

Loopback and the browser guards keep web pages out, but a tool inside the agent container that
fetches URLs (a confused deputy) could still reach localhost. With ``--auth-token-file`` every
exec API request must carry ``Authorization: Bearer <token>``; the proxy creates the file with
a random token when it does not exist, in a volume shared with the agent container only.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from .errors import Unauthorized

TOKEN_BYTES = 32
FILE_MODE = 0o640  # the agent reads it through the pod's shared group


def load_or_create(path: str) -> str:
    """The token in ``path``; a new random one, written atomically, if the file is missing."""
    file = Path(path)
    try:
        token = file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        token = secrets.token_urlsafe(TOKEN_BYTES)
        partial = file.with_name(f".{file.name}.{os.getpid()}")
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(token + "\n")
        os.chmod(partial, FILE_MODE)  # whatever the umask said
        os.replace(partial, file)
        return token
    if len(token) < 16:
        raise ValueError(f"auth_token_file: {path} holds no token of at least 16 characters")
    return token


def check_bearer(header: str | None, token: str) -> None:
    """Raise ``Unauthorized`` unless ``header`` is exactly ``Bearer <token>`` (constant time)."""
    presented = (header or "").encode()
    expected = f"Bearer {token}".encode()
    if not hmac.compare_digest(presented, expected):
        raise Unauthorized(
            "this exec API needs 'Authorization: Bearer <token>' with the token from the file "
            "in SESSION_PROXY_AUTH_TOKEN_FILE (the session-proxy CLI and client send it themselves)"
        )
