"""The sample projection's former import path, ``projectionist.sample:ScalableProjection``.

Deployed ``PROJECTION`` settings name it; new ones name
``projectionist.demo:ScalableProjection``.
"""

from __future__ import annotations

from projectionist.demo.sample_projection import READ_MODEL_TABLE, ScalableProjection

__all__ = ["READ_MODEL_TABLE", "ScalableProjection"]
