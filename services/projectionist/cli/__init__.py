"""The ``projectionist`` command."""

from __future__ import annotations

from projectionist.cli._main import main

__all__ = ["main"]
