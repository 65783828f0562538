"""What the workspace image offers the wrapper, learned once per pod by a short exec.

Only a conclusive answer is kept: the probe exited (its output names the missing tools), or
the runtime said ``/bin/sh`` does not exist. A stream that ended without a status, a probe that
hung, or any other failure says nothing about the image and is never cached.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from ...models import Guarantees
from ..base import ExitStatus
from .wrapper import SHELL

NO_GUARANTEES: Final = Guarantees(workdir=False, env=False, stdin=False, kill=False, runner="none")
SUPERVISOR_GUARANTEES: Final = Guarantees(workdir=True, env=True, stdin=True, kill=True, runner="supervisor")
# The shell probe's token for a workspace supervisor that answered with its protocol version.
SUPERVISOR_FOUND: Final = "+supervisor"
# How runtimes say that the program of an exec does not exist (runc/crun wording).
EXEC_NOT_FOUND: Final = re.compile(r"executable file not found|no such file or directory", re.IGNORECASE)


@dataclass(frozen=True)
class ImageTools:
    """What the workspace image offers the wrapper, and whether the pod carries the supervisor."""

    has_shell: bool
    missing: tuple[str, ...]
    supervisor: bool = False

    @property
    def wrapped(self) -> bool:
        """Commands run under the supervisor or the shell wrapper (else: a bare exec)."""
        return self.supervisor or self.has_shell

    @property
    def guarantees(self) -> Guarantees:
        if self.supervisor:
            return SUPERVISOR_GUARANTEES
        if not self.has_shell:
            return NO_GUARANTEES
        complete = not self.missing
        return Guarantees(
            workdir=True, env=True, stdin="head" not in self.missing, kill=complete, runner="shell"
        )


@dataclass(frozen=True)
class Inconclusive:
    """The probe did not tell: ``container_lost`` when the container was not there at all."""

    message: str
    container_lost: bool = False


def read_probe(output: bytes, status: ExitStatus | None) -> ImageTools | Inconclusive:
    """What a finished probe says about the image."""
    if status is None:
        return Inconclusive("the probe's stream ended without a status")
    if status.reason == "exited":  # the shell ran (a non-zero exit still proves that)
        words = output.decode(errors="replace").split()
        missing = tuple(word for word in words if word != SUPERVISOR_FOUND)
        return ImageTools(has_shell=True, missing=missing, supervisor=SUPERVISOR_FOUND in words)
    message = status.message or f"the probe exited with {status.exit_code}"
    if "container not found" in message:
        return Inconclusive(message, container_lost=True)
    if status.reason == "error" and SHELL in message and EXEC_NOT_FOUND.search(message):
        return ImageTools(has_shell=False, missing=())
    return Inconclusive(message)
