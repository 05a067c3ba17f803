"""The fault-injection suite: real worker processes, real PostgreSQL, real faults, under load.

``python -m chaos`` (``make chaos``) runs every scenario and prints a table:
scenario, faults injected, events, lost, duplicated, recovery time. Each
scenario is also a test in ``tests/test_chaos.py`` with shorter timings.

The pieces, one module each:

* :mod:`chaos.server`: a PostgreSQL cluster of the suite's own, which it may
  stop and start (the shared test server is never restarted);
* :mod:`chaos.fleet`: ``projectionist worker`` subprocesses, and a prober
  that records every change of each one's ``/readyz``;
* :mod:`chaos.load`: the append load, which rides out restarts and dropped
  connections;
* :mod:`chaos.checks`: the reference fold and the other database checks;
* :mod:`chaos.scenarios`: the faults and what must hold after each;
* :mod:`chaos.report`: the table.
"""

from __future__ import annotations

from chaos.report import ScenarioResult, render_markdown, render_table
from chaos.scenarios import CI, FULL, SCENARIOS, Profile, run_scenario
from chaos.server import ChaosServer

__all__ = [
    "CI",
    "FULL",
    "SCENARIOS",
    "ChaosServer",
    "Profile",
    "ScenarioResult",
    "render_markdown",
    "render_table",
    "run_scenario",
]
