"""The incident lab: staged incidents that the dashboard must name the cause of, against a live fleet.

``python -m incidents`` (``make incidents``) stages each incident of
:mod:`incidents.catalog` against four real workers under append load, with
the append API, postgres_exporter and a real Prometheus that loads the
shipped rules with their time scaled down (:mod:`incidents.scaling`). For
each it checks, through Prometheus's HTTP API, that the right alerts fire and
no others, that the triage table names the cause, and that everything
resolves with nothing lost or applied twice (:mod:`incidents.run`); it draws
the dashboard's panels into ``out/incidents/<incident>.png``
(:mod:`incidents.render`) and writes the table (:mod:`incidents.report`).
It reuses the chaos suite's server, fleet, load and checks.
"""

from __future__ import annotations

from incidents.catalog import BY_SLUG, INCIDENTS, Incident, select
from incidents.lab import FACTOR, FULL, INTERVAL, QUICK, Lab, Profile
from incidents.report import IncidentResult, render_markdown, render_table
from incidents.run import run_incident

__all__ = [
    "BY_SLUG",
    "FACTOR",
    "FULL",
    "INCIDENTS",
    "INTERVAL",
    "QUICK",
    "Incident",
    "IncidentResult",
    "Lab",
    "Profile",
    "render_markdown",
    "render_table",
    "run_incident",
    "select",
]
