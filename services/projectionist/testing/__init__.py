"""Helpers shared by the tests, the chaos suite, the benchmarks and the experiments.

One copy of each: free ports, child processes, polling, and a real
PostgreSQL with databases of its own. They ship in the wheel on purpose, so
that projects testing their own projections can use them too.
"""

from __future__ import annotations

from projectionist.testing.databases import TEST_SERVER_SETTINGS, PostgresServer, wait_until_readable
from projectionist.testing.ports import free_port
from projectionist.testing.processes import (
    ChildProcess,
    HarnessError,
    child_env,
    projectionist_command,
    python_module,
    start_api,
    stop_all,
    wait_for_http,
)
from projectionist.testing.waiting import WaitTimeout, poll_until, wait_for

__all__ = [
    "TEST_SERVER_SETTINGS",
    "ChildProcess",
    "HarnessError",
    "PostgresServer",
    "WaitTimeout",
    "child_env",
    "free_port",
    "poll_until",
    "projectionist_command",
    "python_module",
    "start_api",
    "stop_all",
    "wait_for",
    "wait_for_http",
    "wait_until_readable",
]
