"""``make bench``: projectionist against raw psycopg, ``eventsourcing`` and Message DB, side by side.

Every workload runs against the same PostgreSQL server in the same run, one
database per contestant, so the ratios compare like with like. ``python -m
bench --help`` lists the options. ``out/bench/latest.md`` holds the last
table; ``--publish`` copies it to ``docs/results/benchmark.md``.
"""
