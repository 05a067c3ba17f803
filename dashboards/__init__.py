"""Grafana dashboards as code: Python builders (grafana-foundation-sdk) that write provisioned JSON.

``make dashboards`` (``python -m dashboards``) regenerates the JSON in
``compose/grafana/dashboards/``; ``python -m dashboards --check`` fails when
the committed JSON differs from what this code generates. ``make dashboards``
also runs ``python -m dashboards.manifests``, which writes the Kubernetes
monitoring manifests (``manifests``) from those dashboards and the alert rules
(``rules``, which also holds the alerts' runbook links).
"""

from __future__ import annotations

from dashboards.generate import DASHBOARDS, OUTPUT_DIR, render_all

__all__ = ["DASHBOARDS", "OUTPUT_DIR", "render_all"]
