"""The log throttle passes a burst, then a steady rate, per kind of message, and counts the rest."""

from __future__ import annotations

import logging

import pytest

from session_proxy.log_throttle import LogThrottle

pytestmark = pytest.mark.timeout(10)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def record(msg: str, name: str = "asyncio") -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, (), None)


def test_a_burst_passes_then_the_rate_applies_and_drops_are_counted() -> None:
    """Burst 3, 1/s: 3 of 100 pass at once; a second later one more passes, saying 97 were dropped."""
    clock = Clock()
    throttle = LogThrottle(rate=1, burst=3, clock=clock)
    passed = [
        throttle.filter(record("socket.accept() out of system resource\nsocket: fd=6")) for _ in range(100)
    ]
    assert passed.count(True) == 3
    assert passed[:3] == [True, True, True]
    clock.now = 1.0
    late = record("socket.accept() out of system resource\nsocket: fd=6")
    assert throttle.filter(late)
    assert late.suppressed == 97  # type: ignore[attr-defined]
    assert not throttle.filter(record("socket.accept() out of system resource\nsocket: fd=6"))


def test_each_kind_of_message_has_its_own_bucket() -> None:
    """A flood of one message does not silence another, nor the same text from another logger."""
    throttle = LogThrottle(rate=1, burst=1, clock=Clock())
    assert throttle.filter(record("request refused"))
    assert not throttle.filter(record("request refused"))
    assert throttle.filter(record("stopping"))
    assert throttle.filter(record("request refused", name="session_proxy.guards"))


def test_the_kind_is_the_first_line_so_a_varying_tail_shares_a_bucket() -> None:
    """asyncio appends the socket to the message; the same first line is the same kind."""
    throttle = LogThrottle(rate=1, burst=1, clock=Clock())
    assert throttle.filter(record("socket.accept() out of system resource\nsocket: fd=6"))
    assert not throttle.filter(record("socket.accept() out of system resource\nsocket: fd=7"))


def test_install_filters_the_network_driven_loggers_and_uninstall_undoes_it() -> None:
    """Installed, the throttle is on the asyncio logger; uninstalled, it is gone."""
    throttle = LogThrottle()
    throttle.install()
    try:
        assert throttle in logging.getLogger("asyncio").filters
        assert throttle in logging.getLogger("aiohttp.server").filters
    finally:
        throttle.uninstall()
    assert throttle not in logging.getLogger("asyncio").filters
