"""Connections: where the database is, and how projectionist connects to it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import TupleRow

from projectionist.settings import Settings

log = logging.getLogger(__name__)

Connection = psycopg.Connection[TupleRow]
#: What the ``*_async`` functions take: an asyncio connection, e.g. from an AsyncConnectionPool.
AsyncConnection = psycopg.AsyncConnection[TupleRow]

#: The channel appends notify on; workers LISTEN on it to wake up promptly.
NOTIFY_CHANNEL = "projectionist_events"


def embedded_server(data_dir: Path) -> Any:
    """The embedded server for ``data_dir``, reusing its port when it is already running."""
    from projectionist.store.embedded import EmbeddedPostgres

    pg_dir = data_dir / "pg"
    port: int | None = None
    pid_file = pg_dir / "postmaster.pid"
    if pid_file.exists():
        lines = pid_file.read_text().splitlines()
        if len(lines) > 3 and lines[3].strip().isdigit():
            port = int(lines[3])
    return EmbeddedPostgres(pg_dir, port=port)


def database_url(settings: Settings) -> str:
    """``DATABASE_URL`` if set; otherwise start (or reuse) the embedded server."""
    if settings.database_url:
        return settings.database_url
    server = embedded_server(settings.data_dir)
    if not server.is_running():
        log.info("DATABASE_URL is not set: starting embedded PostgreSQL in %s", server.data_dir)
    server.start()
    return str(server.url)


def connect(url: str, *, application_name: str = "projectionist", autocommit: bool = False) -> Connection:
    """A new connection. ``application_name`` shows up in ``pg_stat_activity``."""
    return psycopg.connect(
        url,
        autocommit=autocommit,
        application_name=application_name,
        # Keepalives let a worker notice a vanished server within seconds
        # instead of waiting for the kernel's two-hour default.
        keepalives=1,
        keepalives_idle=5,
        keepalives_interval=2,
        keepalives_count=3,
        # Keepalives probe only an idle connection. A worker that is sending
        # (a batch's commit, a read) to a server whose network vanished would
        # retransmit for the kernel's ~15 minutes before its call failed.
        tcp_user_timeout=10_000,
        connect_timeout=5,
        # And the server side: a worker whose machine or network vanished
        # (no FIN, unlike kill -9) would keep its session, hence its
        # partition's ownership lock, for the server's two-hour keepalive
        # default; these let a standby take over within about 15 s.
        options="-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 "
        "-c tcp_keepalives_count=3 -c tcp_user_timeout=10000",
    )


# SQLSTATEs the server sends as it ends the session: admin, crash and
# immediate shutdown, cannot connect now, idle session timeout, and idle in
# transaction timeout (25P03, which psycopg raises as an InternalError).
# 57014 (query_canceled, statement_timeout) is in the same class but ends
# only the statement, so it is not here.
_SESSION_ENDED = frozenset({"57P01", "57P02", "57P03", "57P05", "25P03"})


def connection_lost(error: BaseException, conn: Connection | None) -> bool:
    """Whether ``error`` ended the session (reconnect), rather than failing one statement."""
    if not isinstance(error, psycopg.Error):
        return False
    state = error.sqlstate or ""
    return (conn is not None and conn.closed) or state.startswith("08") or state in _SESSION_ENDED
