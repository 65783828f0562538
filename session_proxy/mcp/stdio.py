"""``session-proxy mcp``: the same tools over stdin/stdout, forwarding to a running proxy.

For MCP clients that only spawn stdio servers. The target is the exec API at ``--url`` (else
``$SESSION_PROXY_URL``, else the default), with the token from
``$SESSION_PROXY_AUTH_TOKEN_FILE``. When the client closes stdin, running calls are cancelled,
which closes their exec requests: the proxy ends those commands as ``client_gone``.
"""

from __future__ import annotations

from ..client import default_token, default_url
from .arguments import ToolOptions
from .sdk import import_server_side
from .target import ExecApiTarget


async def serve_stdio(url: str | None, options: ToolOptions) -> None:
    """Serve MCP on this process's stdin/stdout until the client goes away."""
    stdio, tools = import_server_side("mcp.server.stdio", "session_proxy.mcp.tools")
    target = ExecApiTarget(url or default_url(), token=default_token())
    try:
        server = tools.build_server(target, options)
        async with stdio.stdio_server() as (read_stream, write_stream):
            await server.run(read_stream, write_stream, server.create_initialization_options())
    finally:
        await target.close()
