"""``projectionist demo``: the upstream example's 1 -> 4 workers story, live, then verified."""

from __future__ import annotations

from projectionist.demo.sample_projection import ScalableProjection

__all__ = ["ScalableProjection"]
