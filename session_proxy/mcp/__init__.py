"""MCP for agents: the ``exec``, ``status`` and ``logs`` tools, over Streamable HTTP and stdio.

The tools (``tools.py``) are defined once against a small target (``target.py``): the exec
API, reached through the project's own client, so every command an agent runs through MCP is
an exec like any other (admission, metrics, exec id, log line, kill on disconnect). The
transports only carry them: ``http.py`` mounts the SDK's session manager at ``/mcp`` on the
exec listener, ``stdio.py`` serves them over stdin/stdout for ``session-proxy mcp``.

Nothing here imports the MCP SDK at module level except ``tools.py`` and ``stdio.py``: the
proxy loads it on the first ``/mcp`` request only, and then only its server side (``sdk.py``).
"""
