"""Message DB, installed from the npm package ``@eventide/message-db`` into its own database.

``npm pack`` fetches the package (cached under ``~/.cache/projectionist-bench``);
its ``database/install.sh`` runs a fixed list of SQL files with psql, and
:data:`INSTALL_ORDER` replays that list, in that order, through psycopg. Two
departures, both harmless: the ``pgcrypto`` extension is skipped when the server
lacks it (Message DB only uses its ``gen_random_uuid()``, which is built into
PostgreSQL since 13), and the database gets ``search_path = message_store,
public``, because Message DB's functions call each other unqualified.

Writes use ``write_message`` (which takes a per-category advisory lock), reads
use ``get_category_messages``; the ``data`` column comes back as text, and it
is JSON-decoded here because any consumer has to.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench.contestants import Contestant, Unavailable, Writer, paged_catch_up
from bench.data import (
    EVENT_TYPE,
    MDB_CATEGORY,
    PEER_CHECKPOINT_DDL,
    READ_MODEL_DDL,
    Event,
)

PACKAGE = "@eventide/message-db"
VERSION = "1.3.1"

# database/install.sh of 1.3.1, flattened: install.sh itself, then the
# install-functions.sh, install-indexes.sh, install-views.sh and
# install-privileges.sh it sources.
INSTALL_ORDER = [
    "roles/message-store.sql",
    "schema/message-store.sql",
    "extensions/pgcrypto.sql",
    "tables/messages.sql",
    "types/message.sql",
    "functions/message-store-version.sql",
    "functions/hash-64.sql",
    "functions/acquire-lock.sql",
    "functions/category.sql",
    "functions/is-category.sql",
    "functions/id.sql",
    "functions/cardinal-id.sql",
    "functions/stream-version.sql",
    "functions/write-message.sql",
    "functions/get-stream-messages.sql",
    "functions/get-category-messages.sql",
    "functions/get-last-stream-message.sql",
    "indexes/messages-id.sql",
    "indexes/messages-stream.sql",
    "indexes/messages-category.sql",
    "views/stream-summary.sql",
    "views/type-summary.sql",
    "views/stream-type-summary.sql",
    "views/type-stream-summary.sql",
    "views/category-type-summary.sql",
    "views/type-category-summary.sql",
    "privileges/schema.sql",
    "privileges/table.sql",
    "privileges/sequence.sql",
    "privileges/functions.sql",
    "privileges/views.sql",
]

WRITE = "SELECT message_store.write_message(%s, %s, %s, %s::jsonb)"
READ = "SELECT * FROM message_store.get_category_messages(%s, %s, %s)"
READ_MEMBER = "SELECT * FROM message_store.get_category_messages(%s, %s, %s, NULL, %s, %s)"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "projectionist-bench"


def fetch_package() -> Path:
    """The unpacked package's ``database`` directory, fetched with ``npm pack`` on first use."""
    root = cache_dir() / f"message-db-{VERSION}"
    database = root / "package" / "database"
    if (database / "install.sh").exists():
        return database
    npm = shutil.which("npm")
    if npm is None:
        raise Unavailable("npm is not installed (apt-get install npm), so Message DB cannot be fetched")
    root.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            [npm, "pack", f"{PACKAGE}@{VERSION}", "--silent"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise Unavailable("npm pack timed out") from None
    if proc.returncode != 0:
        raise Unavailable(f"npm pack {PACKAGE}@{VERSION} failed: {proc.stderr.strip()[-300:]}")
    tarballs = sorted(root.glob("*.tgz"))
    if not tarballs:
        raise Unavailable("npm pack produced no tarball")
    with tarfile.open(tarballs[-1]) as tar:
        tar.extractall(root, filter="data")
    if not (database / "install.sh").exists():
        raise Unavailable("the Message DB package has no database/install.sh")
    return database


def install(url: str, dbname: str) -> None:
    database = fetch_package()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET client_min_messages = warning")  # install.sh's PGOPTIONS
        for name in INSTALL_ORDER:
            text = (database / name).read_text()
            try:
                conn.execute(text.encode())
            except psycopg.Error as e:
                if name == "extensions/pgcrypto.sql":
                    continue  # gen_random_uuid() is built in since PostgreSQL 13
                raise Unavailable(f"installing {name} failed: {e}") from e
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET search_path = message_store, public").format(
                sql.Identifier(dbname)
            )
        )


def stream(aggregate: str) -> str:
    return f"{MDB_CATEGORY}-{aggregate}"


class _MdbWriter(Writer):
    def __init__(self, mdb: MessageDB) -> None:
        self.conn = mdb.connect()

    def write(self, aggregate: str, body: dict[str, Any]) -> None:
        self.conn.execute(WRITE, (str(uuid.uuid4()), stream(aggregate), EVENT_TYPE, json.dumps(body)))

    def close(self) -> None:
        self.conn.close()


def decode(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A message row with ``data`` and ``metadata`` decoded from text to objects."""
    return (
        *row[:5],
        json.loads(row[5]) if row[5] is not None else None,
        json.loads(row[6]) if row[6] else None,
    )


class MessageDB(Contestant):
    key = "messagedb"
    label = f"Message DB {VERSION}"

    def __init__(self, url: str, dbname: str) -> None:
        super().__init__(url)
        self.dbname = dbname

    def setup(self) -> None:
        install(self.url, self.dbname)
        with self.connect() as conn:
            conn.execute(READ_MODEL_DDL)
            conn.execute(PEER_CHECKPOINT_DDL)

    def events_table(self) -> str:
        return "message_store.messages"

    def reset(self) -> None:
        with self.connect() as conn:
            conn.execute(
                "TRUNCATE message_store.messages, bench_read_model, bench_checkpoint RESTART IDENTITY"
            )

    def append_batches(self, transactions: list[list[Event]]) -> float:
        with self.connect() as conn:
            started = time.perf_counter()
            for txn in transactions:
                with conn.transaction(), conn.cursor() as cur:
                    # Pipelined like raw's executemany: the best a client can do with write_message.
                    cur.executemany(
                        WRITE,
                        [(str(uuid.uuid4()), stream(agg), EVENT_TYPE, json.dumps(body)) for agg, body in txn],
                    )
            return time.perf_counter() - started

    def writer(self, thread: int, events: list[Event]) -> Writer:
        return _MdbWriter(self)

    def catch_up(self, *, read_model: bool, batch_size: int, name: str) -> tuple[int, float]:
        with self.connect() as conn:
            return paged_catch_up(
                conn,
                read_model=read_model,
                name=name,
                first=1,
                read_page=lambda p: [decode(r) for r in conn.execute(READ, (MDB_CATEGORY, p, batch_size))],
                position_of=lambda r: int(r[4]),
                next_from=lambda r: int(r[4]) + 1,
                model_rows=lambda rows: [(r[1].split("-", 1)[1], r[4]) for r in rows],
            )
