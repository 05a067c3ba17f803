"""What a command does with the database before it starts: find it, and migrate it if asked to."""

from __future__ import annotations

from projectionist.settings import Settings
from projectionist.store.connection import connect, database_url
from projectionist.store.schema import migrate


def prepared_database(settings: Settings) -> str:
    """The database's URL, migrated first if ``settings.migrate``.

    Without it nothing connects here: a worker must start, and report not
    ready, while the database is down. Once connected, a worker refuses an
    unmigrated database (:func:`~projectionist.store.schema.require_migrated`).
    """
    url = database_url(settings)
    if settings.migrate:
        with connect(url, autocommit=True) as conn:
            migrate(conn)
    return url
