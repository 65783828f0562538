"""Commands under the workspace supervisor: its header, its probe, and ending without a kill exec.

The execution is the wrapper's (the same markers, read the same way); what differs is how an
early end is asked for. The shell wrapper is ended by a second exec; the supervisor reads
``END_REQUEST`` on its own stdin after the command's stdin bytes, so the request goes down the
same stream once the feeder has sent those bytes (the supervisor reads its stdin whole, so they
always go through). A stream that cannot take it is closed: stdin EOF is the supervisor's
dead-man switch, which ends the command the same way.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from ..base import ExecSpec, ExitStatus
from .execution import KubernetesExecution
from .image_probe import EXEC_NOT_FOUND, ImageTools, Inconclusive
from .supervisor_protocol import END_REQUEST, VERSION_LINE, encode_header

# The supervisor's own deadline is a backstop, later than the proxy's, so the proxy's wins.
BACKSTOP_MARGIN: Final = 5.0
FEEDER_WAIT: Final = 5.0


def supervisor_header(spec: ExecSpec, nonce: str, *, now: float, grace: float) -> bytes:
    """The header for ``spec``, its backstop ``BACKSTOP_MARGIN`` after the request's deadline
    and the kill grace."""
    return encode_header(
        nonce=nonce,
        argv=spec.argv,
        workdir=spec.workdir,
        env=spec.env,
        stdin_length=len(spec.stdin or b""),
        deadline=max(1.0, spec.deadline - now) + grace + BACKSTOP_MARGIN,
        grace=grace,
    )


def read_supervisor_probe(output: bytes, status: ExitStatus | None) -> ImageTools | Inconclusive:
    """What a bare ``SUPERVISOR --version`` exec (in an image without /bin/sh) says."""
    if status is not None and status.reason == "exited" and status.exit_code == 0 and output == VERSION_LINE:
        return ImageTools(has_shell=False, missing=(), supervisor=True)
    if status is None:
        return Inconclusive("the supervisor probe's stream ended without a status")
    message = status.message or ""
    if "container not found" in message:
        return Inconclusive(message, container_lost=True)
    if status.reason == "exited" or EXEC_NOT_FOUND.search(message):  # ran but not ours, or absent
        return ImageTools(has_shell=False, missing=())
    return Inconclusive(message or f"the supervisor probe exited with {status.exit_code}")


class SupervisedExecution(KubernetesExecution):
    """A command under the workspace supervisor: an early end is a request on its stdin."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, kill_group=self._request_end, **kwargs)

    async def _request_end(self, pgid: int, grace: float) -> None:
        """TERM, grace, KILL for the command and every descendant, done by the supervisor."""
        if self._feeder is not None:
            await asyncio.wait({self._feeder}, timeout=FEEDER_WAIT)
        fed = self._feeder is None or self._feeder.done()
        if not fed or not await self._stream.send_stdin(END_REQUEST):
            await self._stream.close()  # the dead-man switch ends it instead
