"""The causes the triage rules name, in their order of precedence: one list for the dashboard and the lab.

``deploy/prometheus/rules/projectionist-triage.yml`` computes
``projectionist:partition_cause``, whose ``cause`` label is one of these
names and whose value is the cause's rank; ``docs/operate/triage.md`` says
what to do about each. The tests hold the three to the same list.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Cause:
    """One value of the ``cause`` label: its rank (the series' value), and how the table shows it."""

    name: str
    rank: int
    text: str
    color: str


#: Highest rank first: the order in which the rules test them.
CAUSES = (
    Cause("database_unreachable", 11, "database unreachable", "dark-red"),
    Cause("database_saturated", 10, "database saturated", "dark-red"),
    Cause("no_owner", 9, "no owner", "red"),
    Cause("failing_event", 8, "failing event", "red"),
    Cause("open_transaction", 7, "open transaction", "orange"),
    Cause("slow_apply", 6, "slow apply", "orange"),
    Cause("under_provisioned", 5, "under-provisioned", "orange"),
    Cause("hot_partition", 4, "hot partition", "orange"),
    Cause("polling_only", 3, "polling only", "yellow"),
    Cause("catching_up", 2, "catching up", "blue"),
    Cause("lagging", 1, "lagging", "yellow"),
    Cause("ok", 0, "ok", "green"),
)

BY_NAME = {cause.name: cause for cause in CAUSES}
BY_RANK = {cause.rank: cause for cause in CAUSES}
