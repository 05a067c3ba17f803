"""``projectionist demo --elastic``: the 1 -> 4 workers story with no worker ids, then one worker leaves.

Every worker is ``projectionist worker --elastic``; nobody tells it which
partitions to take. The live table shows, partition by partition, which
worker owns it, and marks the partitions that just moved: as each worker
joins, and at the end, when one of them leaves. The verification is the
static demo's, over the group's partitions.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType

import psycopg
from rich.console import Console
from rich.live import Live
from rich.table import Table

from projectionist.consume.checkpoints import load_checkpoint, register_group
from projectionist.consume.membership import ranges, read_membership
from projectionist.consume.partition_indexes import create_indexes
from projectionist.consume.status import WorkerStatus, read_status
from projectionist.demo.fleet import BackgroundAppender, RateMeter
from projectionist.demo.sample_events import append_sample_events
from projectionist.demo.sample_projection import ScalableProjection
from projectionist.demo.verify import Check, format_verification, verify
from projectionist.partitioning import Partition
from projectionist.store.connection import Connection, connect
from projectionist.store.schema import migrate
from projectionist.testing import ChildProcess, child_env, projectionist_command, stop_all

#: Workers the story ends with, before one leaves.
WORKERS = 4
#: The group's partitions: more than the workers, so every join moves a few of them.
PARTITIONS = 8
_PROJECTION = ScalableProjection.name
_TICK = 0.25
_PLAIN_EVERY = 2.0
_DRAIN_TIMEOUT = 45.0
_STOP_TIMEOUT = 10.0
#: A partition that changed owner is marked as moved for this long.
_MOVED_FOR = 2.0
_LIVE_LAG_SECONDS = 1.0


class DemoFailed(Exception):
    """A part of the demo itself broke (a worker died, the appender failed)."""


class ElasticFleet:
    """``projectionist worker --elastic`` subprocesses, named worker 1, 2, ... in the order they start."""

    def __init__(self, database_url: str) -> None:
        self.procs: dict[str, ChildProcess] = {}
        self.left: dict[str, int] = {}
        self._env = child_env({"DATABASE_URL": database_url})
        self._log_dir = Path(tempfile.mkdtemp(prefix="projectionist-demo-"))

    def start(self) -> str:
        name = f"worker {len(self.procs) + len(self.left) + 1}"
        args = ("worker", "--elastic", "--partitions", str(PARTITIONS), "--rebalance-interval", "0.25")
        self.procs[name] = ChildProcess(
            name,
            projectionist_command(*args, "--log-level", "WARNING"),
            env=self._env,
            log_path=self._log_dir / f"{name.replace(' ', '-')}.log",
        )
        return name

    def leave(self, name: str, timeout: float) -> int:
        """SIGTERM one worker: it finishes its batches, releases its partitions and exits."""
        code = self.procs.pop(name).stop(timeout)
        self.left[name] = code
        return code

    def names_by_pid(self) -> dict[int, str]:
        return {p.pid: name for name, p in self.procs.items()}

    def running(self) -> bool:
        return any(p.alive() for p in self.procs.values())

    def exited(self) -> dict[str, int]:
        codes = {name: p.returncode for name, p in self.procs.items()}
        return {name: c for name, c in codes.items() if c is not None}

    def stop(self, timeout: float) -> dict[str, int]:
        codes = stop_all(self.procs.values(), timeout)
        return {**self.left, **{name: codes[p.name] for name, p in self.procs.items()}}

    def output(self, name: str, limit: int = 2000) -> str:
        proc = self.procs.get(name)
        return proc.output(limit) if proc is not None else ""

    def close(self) -> None:
        for proc in self.procs.values():
            proc.close()
        shutil.rmtree(self._log_dir, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class _Row:
    partition: int
    owner: str
    moved: bool
    state: str
    status: WorkerStatus | None
    rate: float
    share: float


@dataclass(frozen=True, slots=True)
class _Snapshot:
    elapsed: float
    phase: str
    appended: int
    append_rate: float
    rows: tuple[_Row, ...]
    #: Worker name -> the partitions it owns.
    members: tuple[tuple[str, tuple[int, ...]], ...]
    moves: int

    @property
    def caught_up(self) -> bool:
        processed = sum(r.status.events_processed for r in self.rows if r.status)
        return processed == self.appended and all(r.status and r.status.lag_events == 0 for r in self.rows)


class ElasticDemo:
    """The story: 1 worker, then 2, 3 and 4 joining a step apart, then one leaving; then verified."""

    def __init__(
        self, console: Console, url: str, events: int, aggregates: int, step_seconds: float, rate: float
    ) -> None:
        self.console = console
        self.url = url
        self.events = events
        self.aggregates = aggregates
        self.step_seconds = step_seconds
        self.fleet = ElasticFleet(url)
        self.appender = BackgroundAppender(url, rate=rate, aggregates=aggregates) if rate > 0 else None
        self.rate = rate
        self.initial = 0
        self.started = 0.0
        self.leaver: str | None = None
        self._rates = [RateMeter() for _ in range(PARTITIONS)]
        self._append_rate = RateMeter()
        self._owners: dict[int, str] = {}
        self._moved_at: dict[int, float] = {}
        self._moves = 0

    def say(self, text: str) -> None:
        self.console.print(text, markup=False, soft_wrap=True)

    def run(self) -> bool:
        """True when the verification passed."""
        try:
            self._prepare()
            return self._story()
        except DemoFailed as e:
            self.say(f"FAIL: {e}")
            return False
        finally:
            try:
                if self.appender is not None:
                    with contextlib.suppress(Exception):
                        self.appender.stop()
                if self.fleet.running():
                    self.fleet.stop(_STOP_TIMEOUT)
            finally:
                self.fleet.close()

    def _prepare(self) -> None:
        with connect(self.url, autocommit=True) as conn:
            migrate(conn)
            ScalableProjection().setup(conn)
            # The group and its checkpoints exist before any worker, so the
            # table can show the lag of partitions nobody owns yet.
            register_group(conn, _PROJECTION, PARTITIONS)
            for k in range(PARTITIONS):
                load_checkpoint(conn, _PROJECTION, Partition(k, PARTITIONS))
            self.say(f"appending {self.events:,} sample events to {self.aggregates} aggregates ...")
            t0 = time.monotonic()
            for done in append_sample_events(
                conn, count=self.events, aggregates=self.aggregates, batch_size=500
            ):
                self.initial = done
            elapsed = max(time.monotonic() - t0, 1e-6)
            self.say(f"appended {self.initial:,} events in {elapsed:.1f}s ({self.initial / elapsed:,.0f}/s)")
            t0 = time.monotonic()
            create_indexes(conn, PARTITIONS)
            self.say(f"built the {PARTITIONS} partition indexes in {time.monotonic() - t0:.1f}s")

    def _story(self) -> bool:
        self.say(
            f"starting 1 elastic worker (no WORKER_ID) on a group of {PARTITIONS} partitions, adding one "
            f"every {self.step_seconds:g}s up to {WORKERS}, then one leaves; appending {self.rate:,.0f} "
            "events/s in the background"
        )
        if self.appender is not None:
            self.appender.start()
        self.started = time.monotonic()
        self.fleet.start()
        with _Display(self.console) as display:
            self._watch(display, self._scale, timeout=None, final=False)
            if self.appender is not None:
                try:
                    self.appender.stop()
                except psycopg.Error as e:
                    raise DemoFailed(f"the background appender failed: {e}") from e
            drain_started = time.monotonic()
            last = self._watch(
                display, lambda s: "draining" if not s.caught_up else None, _DRAIN_TIMEOUT, final=True
            )
        drain = Check(
            "all partitions caught up (lag 0)",
            last.caught_up,
            f"{time.monotonic() - drain_started:.1f}s after the appender stopped at {last.appended:,} events"
            if last.caught_up
            else f"still behind after {_DRAIN_TIMEOUT:g}s",
        )
        codes = self.fleet.stop(_STOP_TIMEOUT)
        stopped = Check(
            "workers exited 0 on SIGTERM (the one that left too)",
            all(c == 0 for c in codes.values()) and len(codes) == WORKERS,
            "exit codes " + ", ".join(f"{name}: {c}" for name, c in sorted(codes.items())),
        )
        moved = Check(
            "partitions moved as workers joined and left, no worker id given",
            self._moves >= PARTITIONS - PARTITIONS // WORKERS,
            f"{self._moves} moves",
        )
        with connect(self.url, autocommit=True) as conn:
            result = verify(conn, PARTITIONS).with_check(drain).with_check(stopped).with_check(moved)
        self.say("")
        for line in format_verification(result, unit="partition"):
            self.say(line)
        return result.ok

    def _scale(self, snap: _Snapshot) -> str | None:
        """Start the next worker when its step comes; after the last, one leaves; then the phase ends."""
        step = self.step_seconds
        due = min(WORKERS, int(snap.elapsed // step) + 1)
        started = len(self.fleet.procs) + len(self.fleet.left)
        for _ in range(started, due):
            self.fleet.start()
        leave_at = (WORKERS + 1) * step
        if snap.elapsed >= leave_at and self.leaver is None:
            self.leaver = "worker 2"
            code = self.fleet.leave(self.leaver, _STOP_TIMEOUT)
            if code != 0:
                raise DemoFailed(f"{self.leaver} exited with {code} on SIGTERM")
        if snap.elapsed >= leave_at + step:
            return None
        if due < WORKERS:
            return f"worker {due + 1} joins in {due * step - snap.elapsed:.1f}s"
        if self.leaver is None:
            return f"all {WORKERS} workers running; worker 2 leaves in {leave_at - snap.elapsed:.1f}s"
        return "worker 2 left; its partitions moved to the others; stopping the appender in " + (
            f"{leave_at + step - snap.elapsed:.1f}s"
        )

    def _watch(
        self,
        display: _Display,
        phase: Callable[[_Snapshot], str | None],
        timeout: float | None,
        *,
        final: bool,
    ) -> _Snapshot:
        began = time.monotonic()
        with connect(self.url, application_name="projectionist:demo", autocommit=True) as conn:
            while True:
                snap = self._snapshot(conn)
                text = phase(snap)
                died = self.fleet.exited()
                if died:
                    name, code = min(died.items())
                    raise DemoFailed(f"{name} exited early with code {code}:\n{self.fleet.output(name)}")
                done = text is None or (timeout is not None and time.monotonic() - began > timeout)
                display.show(replace(snap, phase=text or ""), force=done and final)
                if done:
                    return snap
                time.sleep(_TICK)

    def _snapshot(self, conn: Connection) -> _Snapshot:
        now = time.monotonic()
        appended = self.initial + (self.appender.appended if self.appender else 0)
        statuses = {w.worker_id: w for w in read_status(conn, _PROJECTION).workers}
        group = read_membership(conn, _PROJECTION, PARTITIONS)
        names = self.fleet.names_by_pid()
        owners: dict[int, str] = {}
        members: list[tuple[str, tuple[int, ...]]] = []
        for m in group.members:
            pid = m.name.rsplit(":", 1)[-1]
            name = names.get(int(pid), m.name) if pid.isdigit() else m.name
            members.append((name, m.owned))
            owners.update({k: name for k in m.owned})
        for k, name in owners.items():
            if k in self._owners and self._owners[k] != name:
                self._moves += 1
                self._moved_at[k] = now
            self._owners[k] = name
        total = sum(w.events_processed for w in statuses.values()) or 1
        rows = []
        for k in range(PARTITIONS):
            status = statuses.get(k)
            processed = status.events_processed if status else 0
            rows.append(
                _Row(
                    k,
                    owners.get(k, "-"),
                    now - self._moved_at.get(k, -1e9) < _MOVED_FOR,
                    _state(k in owners, status),
                    status,
                    self._rates[k].update(now, processed),
                    processed / total,
                )
            )
        return _Snapshot(
            now - self.started,
            "",
            appended,
            self._append_rate.update(now, appended),
            tuple(rows),
            tuple(sorted(members)),
            self._moves,
        )


def _state(owned: bool, status: WorkerStatus | None) -> str:
    if not owned:
        return "unowned"
    if status is None:
        return "starting"
    return "live" if status.lag_seconds < _LIVE_LAG_SECONDS else "catching up"


_STATE_STYLE = {"unowned": "red", "starting": "yellow", "catching up": "yellow", "live": "green"}
_COLUMNS = (
    "partition",
    "owner",
    "state",
    "checkpoint",
    "lag (events)",
    "lag (s)",
    "events/s",
    "processed",
    "share",
)


def _header(snap: _Snapshot, separator: str = " | ") -> str:
    members = ", ".join(f"{name}: {ranges(owned)}" for name, owned in snap.members) or "none yet"
    phase = f"{separator}{snap.phase}" if snap.phase else ""
    return (
        f"t={snap.elapsed:5.1f}s  appended {snap.appended:,} events ({snap.append_rate:,.0f}/s)  "
        f"moves so far: {snap.moves}{separator}members: {members}{phase}"
    )


def _cells(row: _Row) -> list[str]:
    s = row.status
    return [
        str(row.partition),
        row.owner + (" (moved)" if row.moved else ""),
        row.state,
        f"{s.checkpoint_position:,}" if s else "-",
        f"{s.lag_events:,}" if s else "-",
        f"{s.lag_seconds:.2f}" if s else "-",
        f"{row.rate:,.0f}",
        f"{s.events_processed:,}" if s else "0",
        f"{row.share:.1%}",
    ]


def _table(snap: _Snapshot) -> Table:
    table = Table(
        title=f"projectionist demo --elastic: 1 -> {WORKERS} workers, {PARTITIONS} partitions",
        caption=_header(snap, "\n"),
    )
    for column in _COLUMNS:
        table.add_column(column, justify="left" if column in ("owner", "state") else "right")
    for row in snap.rows:
        style = "bold magenta" if row.moved else _STATE_STYLE.get(row.state, "bold red")
        table.add_row(*_cells(row), style=style)
    return table


def _plain(snap: _Snapshot) -> list[str]:
    widths = (9, 20, 11, 11, 12, 8, 9, 10, 7)
    lines = [_header(snap)]
    for cells in [list(_COLUMNS), *(_cells(r) for r in snap.rows)]:
        lines.append(
            "  "
            + "  ".join(
                c.ljust(w) if i in (1, 2) else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
        )
    return lines


class _Display:
    """A rich live table on a terminal; a plain table every couple of seconds otherwise (CI, pipes)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = Live(console=console, refresh_per_second=4) if console.is_terminal else None
        self._last_plain = float("-inf")

    def __enter__(self) -> _Display:
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.live is not None:
            self.live.stop()

    def show(self, snap: _Snapshot, *, force: bool = False) -> None:
        if self.live is not None:
            self.live.update(_table(snap))
        elif force or time.monotonic() - self._last_plain >= _PLAIN_EVERY:
            self._last_plain = time.monotonic()
            print("\n".join(_plain(snap)), flush=True)
