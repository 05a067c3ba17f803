"""One Message DB consumer-group member, run as its own process by the partitioned workload.

``python -m bench.member URL MEMBER SIZE BATCH GATE_KEY APP_NAME`` waits at the
start gate (see :mod:`bench.projections`), reads its share of the category with
``get_category_messages(..., consumer_group_member, consumer_group_size)``
until a read comes back empty, and prints ``{"events": n, "finished": t}``.
"""

from __future__ import annotations

import json
import sys
import time

import psycopg

from bench.data import MDB_CATEGORY
from bench.mdb import READ_MEMBER, decode


def main(argv: list[str]) -> int:
    url, member, size, batch, gate, app_name = argv
    with psycopg.connect(url, autocommit=True, application_name=app_name) as conn:
        conn.execute("SELECT pg_advisory_lock_shared(%s)", (int(gate),))
        conn.execute("SELECT pg_advisory_unlock_shared(%s)", (int(gate),))
        position = 1
        total = 0
        while True:
            rows = [
                decode(r)
                for r in conn.execute(
                    READ_MEMBER, (MDB_CATEGORY, position, int(batch), int(member), int(size))
                )
            ]
            if not rows:
                break
            total += len(rows)
            position = rows[-1][4] + 1
        finished = time.time()
    print(json.dumps({"events": total, "finished": finished}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
