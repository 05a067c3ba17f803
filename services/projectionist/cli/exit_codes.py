"""The ``projectionist`` command's exit codes."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    #: Done, or stopped as asked (SIGTERM, or a first Ctrl-C).
    OK = 0
    #: A runtime failure: the database, a projection, a failed verification.
    ERROR = 1
    #: A usage or configuration error; the message names the flag or variable.
    CONFIG = 2
    #: Interrupted: a second signal, or a Ctrl-C the command could not finish cleanly on.
    INTERRUPTED = 130
