"""Grafana dashboards as code: Python builders (grafana-foundation-sdk) that write provisioned JSON.

``make dashboards`` (``python -m dashboards``) regenerates the JSON in
``compose/grafana/dashboards/``; ``python -m dashboards --check`` fails when
the committed JSON differs from what this code generates.
"""

from __future__ import annotations

from dashboards.generate import DASHBOARDS, OUTPUT_DIR, render_all

__all__ = ["DASHBOARDS", "OUTPUT_DIR", "render_all"]
