"""What the scaling experiment measures once a second: head, per-partition progress and lag, CPU.

Progress and lag come from :func:`projectionist.consume.status.read_status`. A
partition whose worker never started has no checkpoint row yet, so its lag
is counted here directly: every event of the partition.
CPU time comes from ``/proc``, per role (API, Locust, workers, PostgreSQL),
to show where a small machine's cores go.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from projectionist.consume.status import read_status
from projectionist.demo.sample_projection import ScalableProjection
from projectionist.store.connection import Connection

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

_UNSTARTED_LAG = """
SELECT partition_hash %% %(total)s AS k, count(*),
       coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8
FROM events GROUP BY 1
"""


@dataclass(frozen=True, slots=True)
class PartitionSample:
    worker_id: int
    processed: int
    lag_events: int
    lag_seconds: float


@dataclass(frozen=True, slots=True)
class StoreSample:
    head: int
    partitions: tuple[PartitionSample, ...]

    @property
    def lag_events(self) -> int:
        return sum(p.lag_events for p in self.partitions)

    @property
    def lag_seconds(self) -> float:
        return max((p.lag_seconds for p in self.partitions), default=0.0)


def sample_store(
    conn: Connection, total_workers: int, projection: str = ScalableProjection.name
) -> StoreSample:
    status = read_status(conn, projection)
    found = {w.worker_id: w for w in status.workers if w.total_workers == total_workers}
    unstarted: dict[int, tuple[int, float]] = {}
    if len(found) < total_workers:
        unstarted = {
            int(k): (int(n), float(age))
            for k, n, age in conn.execute(_UNSTARTED_LAG, {"total": total_workers})
        }
    partitions = []
    for k in range(total_workers):
        if k in found:
            w = found[k]
            partitions.append(PartitionSample(k, w.events_processed, w.lag_events, w.lag_seconds))
        else:
            n, age = unstarted.get(k, (0, 0.0))
            partitions.append(PartitionSample(k, 0, n, round(age, 3)))
    return StoreSample(status.head_position, tuple(partitions))


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses; fields follow the last ")".
    return raw[raw.rindex(")") + 2 :].split()


def process_cpu_seconds(pid: int, *, with_children: bool = False) -> float:
    """utime + stime of ``pid`` (plus its reaped children's, if asked), in seconds; 0 if gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    ticks = int(fields[11]) + int(fields[12])
    if with_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _CLOCK_TICKS


def postgres_cpu_seconds(postmaster_pid: int | None) -> float:
    """CPU of the server: the postmaster with its exited backends, plus every live backend."""
    if postmaster_pid is None:
        return 0.0
    total = process_cpu_seconds(postmaster_pid, with_children=True)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and int(fields[1]) == postmaster_pid:
            total += process_cpu_seconds(int(entry.name))
    return total


def postmaster_pid(conn: Connection) -> int | None:
    """The server's postmaster, when it runs on this machine (None for a remote server)."""
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    if row is None:
        return None
    fields = _stat_fields(int(row[0]))
    return int(fields[1]) if fields is not None else None


def system_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of all cores since boot, from /proc/stat."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in first[:8]]  # guest time is already counted in user time
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / _CLOCK_TICKS, sum(values) / _CLOCK_TICKS


class CpuTracker:
    """Cumulative CPU seconds per role, remembering processes that have exited since.

    A stopped worker's CPU time would vanish from ``/proc`` with it, so the
    last value seen for each process is kept.
    """

    def __init__(self, postmaster: int | None) -> None:
        self.postmaster = postmaster
        self._last: dict[int, float] = {}

    def read(self, pids: Mapping[str, Iterable[int]]) -> dict[str, float]:
        cpu: dict[str, float] = {}
        for role, role_pids in pids.items():
            total = 0.0
            for pid in role_pids:
                seen = max(self._last.get(pid, 0.0), process_cpu_seconds(pid))
                self._last[pid] = seen
                total += seen
            cpu[role] = total
        cpu["postgres"] = postgres_cpu_seconds(self.postmaster)
        return cpu
