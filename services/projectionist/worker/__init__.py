"""The worker runtime: one partition's loop and the multi-partition supervisor."""

from __future__ import annotations

from projectionist.worker.supervisor import Supervisor
from projectionist.worker.worker import Worker

__all__ = [
    "Supervisor",
    "Worker",
]
