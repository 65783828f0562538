"""Load the MCP SDK's server side only: what the tools and their transports use.

Two package ``__init__`` modules of the SDK import far more than a server needs: ``mcp``
imports the SDK's client (sessions, stdio and HTTP transports, caching) and ``mcp.server`` the
high-level ``MCPServer`` (resources, prompts, URI templates); and sse-starlette imports uvicorn
(with click and multiprocessing) to patch its signal handler, though the proxy does not run
under uvicorn. Together about 11 MB of RSS and 0.2 s (BENCHMARKS.md, "Memory").

So the two packages are registered without running their ``__init__`` (their modules import as
usual, each bringing what it needs) and uvicorn is kept out while the modules load. Where the
SDK is already loaded whole (a process that is also an MCP client), it is used as it is; should
a new SDK layout need an ``__init__`` after all, the whole SDK is loaded instead, with a warning.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Final

log = logging.getLogger(__name__)

# Packages whose __init__ imports what the server does not use; their submodules are needed.
UNEXECUTED_PACKAGES: Final = ("mcp", "mcp.server")
# Imported by a module the server needs, only to patch a server the proxy does not run.
KEPT_OUT: Final = ("uvicorn",)


def import_server_side(*names: str) -> list[ModuleType]:
    """Import ``names`` (modules of the SDK, or of ours that import it) without the SDK's rest."""
    if UNEXECUTED_PACKAGES[0] in sys.modules:
        return [importlib.import_module(name) for name in names]
    try:
        with _packages_unexecuted(), _kept_out():
            return [importlib.import_module(name) for name in names]
    except ImportError:
        log.warning("the MCP SDK's server modules need its whole package now; loading it", exc_info=True)
        _forget(*UNEXECUTED_PACKAGES, *names)
        return [importlib.import_module(name) for name in names]


@contextlib.contextmanager
def _packages_unexecuted() -> Iterator[None]:
    for name in UNEXECUTED_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError(f"{name} is not a package", name=name)
        package = importlib.util.module_from_spec(spec)  # a package object; __init__ is not run
        sys.modules[name] = package
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, package)
    yield


@contextlib.contextmanager
def _kept_out() -> Iterator[None]:
    blocked = [name for name in KEPT_OUT if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # import raises ModuleNotFoundError
    try:
        yield
    finally:
        for name in blocked:
            del sys.modules[name]


def _forget(*names: str) -> None:
    """Drop partly loaded modules (and everything below them) so they import afresh."""
    for loaded in list(sys.modules):
        if any(loaded == name or loaded.startswith(name + ".") for name in names):
            del sys.modules[loaded]
