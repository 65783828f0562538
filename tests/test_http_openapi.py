"""/openapi.json describes the request body exactly: what it accepts, the server runs."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from jsonschema import Draft202012Validator

from .conftest import ProxyFactory, RunningProxy

pytestmark = pytest.mark.timeout(60)

MAX_TIMEOUT = 30

# (body, accepted): each rule the server checks, on both sides of its boundary.
CASES: list[tuple[Any, bool]] = [
    ({"command": ["true"]}, True),
    ({"command": [""]}, False),
    ({"command": ["true", ""]}, True),
    ({"command": []}, False),
    ({"command": "true"}, False),
    ({"command": ["tr\u0000ue"]}, False),
    ({"command": ["true", "a\u0000"]}, False),
    ({"command": ["true"] * 4096}, True),
    ({"command": ["true"] * 4097}, False),
    ({"command": ["true", 1]}, False),
    ({"command": ["true"], "workdir": "/"}, True),
    ({"command": ["true"], "workdir": None}, True),
    ({"command": ["true"], "workdir": "relative"}, False),
    ({"command": ["true"], "workdir": "/a\u0000"}, False),
    ({"command": ["true"], "workdir": "/" + "a" * 4095}, True),
    ({"command": ["true"], "workdir": "/" + "a" * 4096}, False),
    ({"command": ["true"], "env": {"A_1": "x", "_b": ""}}, True),
    ({"command": ["true"], "env": {"1A": "x"}}, False),
    ({"command": ["true"], "env": {"A\n": "x"}}, False),
    ({"command": ["true"], "env": {"A-B": "x"}}, False),
    ({"command": ["true"], "env": {"": "x"}}, False),
    ({"command": ["true"], "env": {"A": "x\u0000"}}, False),
    ({"command": ["true"], "env": {"A": 1}}, False),
    ({"command": ["true"], "env": {f"V{i}": "" for i in range(256)}}, True),
    ({"command": ["true"], "env": {f"V{i}": "" for i in range(257)}}, False),
    ({"command": ["true"], "env": None}, False),
    ({"command": ["cat"], "stdin": "text"}, True),
    ({"command": ["cat"], "stdin_b64": "YWJj"}, True),
    ({"command": ["cat"], "stdin_b64": ""}, True),
    ({"command": ["cat"], "stdin_b64": "YQ=="}, True),
    ({"command": ["cat"], "stdin_b64": "YQ"}, False),
    ({"command": ["cat"], "stdin_b64": "YQ===="}, False),
    ({"command": ["cat"], "stdin_b64": "YQ==\n"}, False),
    ({"command": ["cat"], "stdin_b64": "YW Jj"}, False),
    ({"command": ["cat"], "stdin": "a", "stdin_b64": "YQ=="}, False),
    ({"command": ["cat"], "stdin": None, "stdin_b64": "YQ=="}, True),
    ({"command": ["cat"], "stdin": "", "stdin_b64": None}, True),
    ({"command": ["true"], "timeout": MAX_TIMEOUT}, True),
    ({"command": ["true"], "timeout": 0.5}, True),
    ({"command": ["true"], "timeout": MAX_TIMEOUT + 0.5}, False),
    ({"command": ["true"], "timeout": 0}, False),
    ({"command": ["true"], "timeout": -1}, False),
    ({"command": ["true"], "timeout": True}, False),
    ({"command": ["true"], "timeout": "5"}, False),
    ({"command": ["true"], "timeout": None}, True),
    ({"command": ["true"], "pod": "other"}, False),
    (["true"], False),
]


@pytest.fixture
async def small_proxy(make_proxy: ProxyFactory) -> RunningProxy:
    return await make_proxy(max_timeout=MAX_TIMEOUT, default_timeout=MAX_TIMEOUT)


@pytest.mark.parametrize(("body", "accepted"), CASES, ids=range(len(CASES)))
async def test_the_schema_accepts_exactly_what_the_server_accepts(
    http: aiohttp.ClientSession, small_proxy: RunningProxy, body: Any, accepted: bool
) -> None:
    """For each boundary case, the served schema and the server agree (200 vs 422)."""
    async with http.get(f"{small_proxy.url}/openapi.json") as response:
        schema = (await response.json())["components"]["schemas"]["ExecRequest"]
    assert Draft202012Validator(schema).is_valid(body) is accepted
    async with http.post(f"{small_proxy.url}/exec", json=body) as response:
        await response.read()
        assert response.status == (200 if accepted else 422)


async def test_the_schema_carries_the_configured_maximum_timeout(
    http: aiohttp.ClientSession, small_proxy: RunningProxy
) -> None:
    """`timeout`'s maximum in the document is this server's --max-timeout."""
    async with http.get(f"{small_proxy.url}/openapi.json") as response:
        timeout = (await response.json())["components"]["schemas"]["ExecRequest"]["properties"]["timeout"]
    assert {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TIMEOUT} in timeout["anyOf"]
