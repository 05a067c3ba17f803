"""The worker runtime: one partition's loop, the multi-partition supervisor, and the elastic member."""

from __future__ import annotations

from projectionist.worker.elastic import ElasticWorker
from projectionist.worker.supervisor import Supervisor
from projectionist.worker.worker import Worker

__all__ = [
    "ElasticWorker",
    "Supervisor",
    "Worker",
]
