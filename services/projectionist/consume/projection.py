"""The projection contract: what a user implements to build a read model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from psycopg import sql

from projectionist.records import RecordedEvent
from projectionist.store.connection import Connection


@dataclass(frozen=True, slots=True)
class Tx:
    """The open batch transaction a projection writes through.

    Writes made with :meth:`execute` (or ``conn``) commit together with the
    worker's checkpoint, or not at all: that is what makes a same-database read
    model exactly-once.
    """

    conn: Connection
    projection: str
    worker_id: int
    total_workers: int

    def execute(self, query: str | bytes | sql.SQL | sql.Composed, params: Any = None) -> Any:
        return self.conn.execute(query, params)

    def executemany(self, query: str | bytes | sql.SQL | sql.Composed, params_seq: Sequence[Any]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(query, params_seq)


@runtime_checkable
class Projection(Protocol):
    """A read model fed by events.

    ``name`` identifies the projection's checkpoints. ``setup`` runs once per
    connection before any batch (create tables with ``IF NOT EXISTS``).
    ``apply`` is called for each of the worker's events, in order, inside the
    batch transaction; raising rolls the whole batch back and it is retried.

    Optional extras the worker uses when present:
    ``apply_batch(events, tx)`` to handle a whole batch at once (fewer round
    trips), and ``reset(conn)`` to empty the read model for a rebuild.
    """

    name: str

    def setup(self, conn: Connection) -> None: ...

    def apply(self, event: RecordedEvent, tx: Tx) -> None: ...


class BaseProjection:
    """Convenience base: no-op ``setup``/``reset``; subclasses write ``apply``."""

    name: str = "projection"

    def setup(self, conn: Connection) -> None:
        """Create the read model's tables; the default has none."""

    def reset(self, conn: Connection) -> None:
        """Empty the read model; the default has none."""

    def apply(self, event: RecordedEvent, tx: Tx) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def load_projection(spec: str, **kwargs: Any) -> Projection:
    """Instantiate ``package.module:ClassName`` (the ``--projection`` flag).

    The current directory comes first on ``sys.path``, as for uvicorn and
    gunicorn, so a projection in the directory a worker starts from loads
    without installing it.
    """
    import importlib
    import os
    import sys

    from projectionist.errors import ConfigError

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"PROJECTION={spec!r} must look like 'package.module:ClassName'")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"PROJECTION={spec!r}: cannot import {module_name!r} ({e})") from e
    factory = getattr(module, attr, None)
    if factory is None:
        raise ConfigError(f"PROJECTION={spec!r}: {module_name!r} has no attribute {attr!r}")
    instance = factory(**kwargs)
    if not isinstance(instance, Projection):
        raise ConfigError(
            f"PROJECTION={spec!r} does not implement the Projection protocol (name, setup, apply)"
        )
    return instance
