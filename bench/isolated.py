"""Run one catch-up in a fresh process: ``python -m bench.isolated '<json spec>'``.

Catch-up is what a consumer process does, so every catch-up (workload 3 and
the telemetry comparison) runs in a process of its own, started for that one
run: no contestant inherits the benchmark's heap, threads or another library's
connection pools, and each starts as a real worker would. The clock covers the
catch-up loop only, not the process start. Every contestant's process runs
with the garbage-collector settings of ``projectionist worker``
(projectionist.worker.gc_tuning). The result is one JSON line:
``{"events": n, "seconds": s, "cpu": c}``.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from typing import Any

from bench.contestants import Contestant
from bench.procs import ROOT, bench_env
from projectionist.worker.gc_tuning import tune_for_throughput


def build(spec: dict[str, Any]) -> Contestant:
    key, url = spec["contestant"], spec["url"]
    if key == "raw":
        from bench.raw import Raw

        return Raw(url)
    if key == "projectionist":
        from bench.ours import Projectionist

        return Projectionist(url)
    if key == "eventsourcing":
        from bench.es import EventSourcing

        es = EventSourcing(url)
        es.setup()  # builds the Application (its tables exist already)
        return es
    if key == "messagedb":
        from bench.mdb import MessageDB

        return MessageDB(url, spec["dbname"])
    raise ValueError(f"unknown contestant {key!r}")


def run_catch_up(spec: dict[str, Any]) -> tuple[int, float, float]:
    """Run the child; return (events, seconds, client CPU seconds) or raise with its last words.

    Client CPU is the child's ``process_time`` over the timed part, all its
    threads included: unlike wall time, a busy machine barely moves it.
    """
    proc = subprocess.run(
        [sys.executable, "-m", "bench.isolated", json.dumps(spec)],
        env=bench_env(spec["url"]),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"catch-up process exited with {proc.returncode}: {last}")
    result = json.loads(lines[-1])
    return int(result["events"]), float(result["seconds"]), float(result["cpu"])


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    contestant = build(spec)
    with contextlib.ExitStack() as stack:
        extra: dict[str, Any] = {}
        if spec.get("telemetry") is not None:
            from bench.telemetry_slot import catch_up_kwargs

            extra = stack.enter_context(
                catch_up_kwargs(spec["url"], spec["name"], with_telemetry=bool(spec["telemetry"]))
            )

        def catch_up(name: str) -> tuple[int, float]:
            return contestant.catch_up(
                read_model=spec["read_model"], batch_size=spec["batch_size"], name=name, **extra
            )

        # Warm-up in this same process: lazy imports, first-use caches, the
        # exporter's first batch. What is timed next is the steady state a
        # long-running consumer lives in.
        catch_up(spec["name"] + "_warm")
        with contestant.connect() as conn:
            conn.execute("TRUNCATE bench_read_model")
        # The collector settings `projectionist worker` runs with, for every
        # contestant alike: what is compared is the stores, not GC settings.
        tune_for_throughput()
        cpu_started = time.process_time()
        events, seconds = catch_up(spec["name"])
        cpu = time.process_time() - cpu_started
    contestant.close()
    print(json.dumps({"events": events, "seconds": seconds, "cpu": cpu}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
