"""``session-proxy mcp``: the same tools over stdin/stdout, forwarding to a running proxy.

For MCP clients that only spawn stdio servers. The target is the exec API at ``--url`` (else
``$SESSION_PROXY_URL``, else the default), with the token from
``$SESSION_PROXY_AUTH_TOKEN_FILE``. When the client closes stdin, running calls are cancelled,
which closes their exec requests: the proxy ends those commands as ``client_gone``.
"""

from __future__ import annotations

import dataclasses
import logging

import aiohttp

from ..client import ProxyClientError, default_token, default_url
from .arguments import ToolOptions
from .sdk import import_server_side
from .target import ExecApiTarget

log = logging.getLogger(__name__)


async def serve_stdio(url: str | None, options: ToolOptions) -> None:
    """Serve MCP on this process's stdin/stdout until the client goes away."""
    stdio, tools = import_server_side("mcp.server.stdio", "session_proxy.mcp.tools")
    target = ExecApiTarget(url or default_url(), token=default_token())
    try:
        server = tools.build_server(target, await _with_proxy_limits(target, options))
        async with stdio.stdio_server() as (read_stream, write_stream):
            await server.run(read_stream, write_stream, server.create_initialization_options())
    finally:
        await target.close()


async def _with_proxy_limits(target: ExecApiTarget, options: ToolOptions) -> ToolOptions:
    """The options with the proxy's own timeouts, so the tool descriptions give real numbers.

    A proxy that does not answer yet leaves them unknown ("set by the proxy"); calls still work.
    """
    try:
        default_timeout, max_timeout = await target.exec_limits()
    except (ProxyClientError, aiohttp.ClientError, TimeoutError, ValueError, LookupError, TypeError):
        log.warning("could not read the proxy's timeouts; the tool descriptions will not name them")
        return options
    return dataclasses.replace(options, default_timeout=default_timeout, max_timeout=max_timeout)
