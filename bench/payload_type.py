"""Why the store keeps payloads as ``json`` text, not ``jsonb`` (migration 0004): the server's side.

``python -m bench.payload_type`` loads the benchmark's events once, copies
them into two tables of the events table's shape that differ only in the type
of ``payload`` and ``metadata``, and times on the server, with ``EXPLAIN
(ANALYZE, SERIALIZE BINARY)``, the two things a store does with a payload:

- the worker's read: every row in ``(transaction_id, global_position)`` order,
  with the columns in the form the reader selects them (payloads as text);
- the append's share: inserting the same rows again, payload text in, which
  is where the type parses them.

The tables take turns, and each figure is the median of the repetitions.
Server time only: the client decodes the same text either way.
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections.abc import Sequence

import psycopg
from psycopg import sql

from bench.data import batched_plan
from bench.ours import Projectionist
from bench.results import markdown_table
from bench.server import BenchServer

TYPES = ("jsonb", "json")

_READ = sql.SQL(
    "EXPLAIN (ANALYZE, SERIALIZE BINARY) "
    "SELECT global_position, transaction_id::text AS txid, event_id, aggregate_id, aggregate_version, "
    "event_type, payload::text, metadata::text, created_at FROM {t} "
    "WHERE (transaction_id, global_position) > ('0'::xid8, 0) "
    "ORDER BY {t}.transaction_id, {t}.global_position"
)
# The append's share: the insert into the table, from rows whose payloads are text.
_APPEND = sql.SQL(
    "EXPLAIN (ANALYZE) INSERT INTO {t} (global_position, event_id, aggregate_id, aggregate_version, "
    "partition_hash, event_type, payload, metadata) "
    "SELECT global_position, event_id, aggregate_id, aggregate_version, partition_hash, event_type, "
    "payload_text::{type}, metadata_text::{type} FROM staged"
)


def _execution_ms(conn: psycopg.Connection[tuple[str]], query: sql.Composed) -> float:
    plan = "\n".join(row[0] for row in conn.execute(query))
    found = re.search(r"Execution Time: ([\d.]+) ms", plan)
    if found is None:
        raise RuntimeError(f"no execution time in the plan:\n{plan}")
    return float(found[1])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.payload_type", description=__doc__)
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--reps", type=int, default=9)
    args = p.parse_args(argv)
    with BenchServer() as server:
        url = server.fresh_database("bench_payload_type")
        store = Projectionist(url)
        store.setup()
        store.append_batches(batched_plan(args.events).transactions)
        read_ms: dict[str, list[float]] = {t: [] for t in TYPES}
        append_ms: dict[str, list[float]] = {t: [] for t in TYPES}
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE staged AS SELECT global_position, event_id, aggregate_id, aggregate_version, "
                "partition_hash, event_type, payload::text AS payload_text, metadata::text AS metadata_text "
                "FROM events"
            )
            for t in TYPES:
                table = sql.Identifier(f"events_{t}")
                conn.execute(sql.SQL("CREATE TABLE {} (LIKE events INCLUDING ALL)").format(table))
                conn.execute(
                    sql.SQL(
                        "ALTER TABLE {} ALTER payload TYPE {type} USING payload::{type}, "
                        "ALTER metadata DROP DEFAULT, ALTER metadata TYPE {type} USING metadata::{type}, "
                        "ALTER global_position DROP IDENTITY"
                    ).format(table, type=sql.SQL(t))
                )
            for rep in range(args.reps + 1):  # the first round is a warm-up
                for t in TYPES if rep % 2 else reversed(TYPES):
                    table = sql.Identifier(f"events_{t}")
                    conn.execute(sql.SQL("TRUNCATE {}").format(table))
                    appended = _execution_ms(conn, _APPEND.format(t=table, type=sql.SQL(t)))
                    conn.execute(sql.SQL("VACUUM ANALYZE {}").format(table))
                    read = _execution_ms(conn, _READ.format(t=table))
                    if rep:
                        append_ms[t].append(appended)
                        read_ms[t].append(read)
            # Both tables still hold the last round's rows.
            size = {
                t: float(
                    conn.execute(  # type: ignore[index]
                        sql.SQL("SELECT avg(pg_column_size(payload)) FROM {}").format(
                            sql.Identifier(f"events_{t}")
                        )
                    ).fetchone()[0]
                )
                for t in TYPES
            }
        version = server.setting("server_version")
    per_row = 1000 / args.events
    rows = [
        [
            t,
            f"{statistics.median(read_ms[t]):.0f}",
            f"{statistics.median(read_ms[t]) * per_row:.2f}",
            f"{statistics.median(append_ms[t]):.0f}",
            f"{statistics.median(append_ms[t]) * per_row:.2f}",
            f"{size[t]:.0f}",
        ]
        for t in TYPES
    ]
    print(f"PostgreSQL {version}, {args.events:,} events, median of {args.reps} repetitions\n")
    print(
        "\n".join(
            markdown_table(
                ["payload type", "read (ms)", "read µs/row", "insert (ms)", "insert µs/row", "payload bytes"],
                rows,
            )
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
