"""``projectionist demo``: the upstream example's "scaling from 1 to N workers", replayed live and verified.

It runs on a dedicated ``projectionist_demo`` database, never the user's own.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from enum import Enum
from types import FrameType, TracebackType

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from rich.console import Console
from rich.live import Live
from rich.table import Table

from projectionist.consume.checkpoints import group_partitions, load_checkpoint, register_group
from projectionist.consume.partition_indexes import create_indexes
from projectionist.consume.status import WorkerStatus, read_status
from projectionist.demo.fleet import BackgroundAppender, DemoFleet, RateMeter
from projectionist.demo.sample_events import append_sample_events
from projectionist.demo.sample_projection import ScalableProjection
from projectionist.demo.verify import Check, format_verification, verify
from projectionist.errors import ConfigError, ProjectionistError, one_line
from projectionist.partitioning import Partition
from projectionist.settings import Settings
from projectionist.store.connection import Connection, connect, database_url, embedded_server
from projectionist.store.schema import migrate

DEMO_DATABASE = "projectionist_demo"
# Fixed from the start, as in the upstream example's "Scaling Up (1 -> N)": workers are
# added, the partition count never changes (projectionist refuses that).
TOTAL_WORKERS = 4
_TICK = 0.25
_PLAIN_EVERY = 2.0
# A worker whose oldest unprocessed event is younger than this counts as live.
_LIVE_LAG_SECONDS = 1.0
_DRAIN_TIMEOUT = 45.0
_STOP_TIMEOUT = 10.0
_PROJECTION = ScalableProjection.name


class _DemoFailed(Exception):
    """A part of the demo itself broke (a worker died, the appender failed)."""


@dataclass(frozen=True, slots=True)
class _Row:
    worker_id: int
    state: str
    status: WorkerStatus | None
    rate: float
    share: float


class DemoOutcome(Enum):
    """How a demo ended: the verification passed or failed, or it was interrupted."""

    PASSED = "passed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True, slots=True)
class _Snapshot:
    elapsed: float
    phase: str
    appended: int
    append_rate: float
    rows: tuple[_Row, ...]

    @property
    def caught_up(self) -> bool:
        processed = sum(r.status.events_processed for r in self.rows if r.status)
        return processed == self.appended and all(r.status and r.status.lag_events == 0 for r in self.rows)


def run_demo(
    settings: Settings,
    *,
    events: int,
    aggregates: int,
    step_seconds: float,
    rate: float,
    database: str = DEMO_DATABASE,
    verify_only: bool = False,
    elastic: bool = False,
) -> DemoOutcome:
    """Run the demo (or only verify the last run's database); ``elastic``: with elastic workers."""
    if not step_seconds > 0:
        raise ConfigError(f"--step-seconds={step_seconds} must be greater than 0")
    if not rate >= 0:
        raise ConfigError(f"--rate={rate} must not be negative")
    console = Console(highlight=False)
    embedded = None if settings.database_url else embedded_server(settings.data_dir)
    started_server = embedded is not None and not embedded.is_running()
    server_url = ""
    try:
        with _sigterm_as_interrupt(), contextlib.ExitStack() as held:
            server_url = database_url(settings)
            held.enter_context(_only_demo_on(server_url, database))
            url = _demo_database(server_url, database, create=not verify_only)
            if verify_only:
                try:
                    conn = connect(url, autocommit=True)
                except psycopg.OperationalError as e:
                    raise ProjectionistError(
                        f"cannot open the demo database {database!r} (run `projectionist demo` first): "
                        + one_line(e)
                    ) from e
                with conn:
                    result = verify(conn, group_partitions(conn, _PROJECTION) or TOTAL_WORKERS)
                for line in format_verification(result):
                    console.print(line, markup=False, soft_wrap=True)
                return DemoOutcome.PASSED if result.ok else DemoOutcome.FAILED
            if elastic:
                from projectionist.demo.elastic import ElasticDemo

                passed = ElasticDemo(console, url, events, aggregates, step_seconds, rate).run()
                return DemoOutcome.PASSED if passed else DemoOutcome.FAILED
            return _Demo(console, url, events, aggregates, step_seconds, rate).run()
    except KeyboardInterrupt:
        console.print("interrupted: every worker was stopped", markup=False, soft_wrap=True)
        return DemoOutcome.INTERRUPTED
    finally:
        if started_server and embedded is not None:
            others = _other_clients(server_url)
            if others:
                # Someone began to use the server the demo started (a worker,
                # psql, a second demo): stopping it would cut them off.
                console.print(
                    f"left the embedded server running: {others} other connection(s) use it; "
                    "`projectionist db stop` stops it",
                    markup=False,
                    soft_wrap=True,
                )
            else:
                embedded.stop()


# Any constant works; with the demo database's name it keys the lock below.
_DEMO_LOCK_PREFIX = "projectionist demo "


def demo_lock_key(database: str) -> int:
    """The advisory lock one demo holds on ``database`` for as long as it runs."""
    return int.from_bytes(
        hashlib.blake2b((_DEMO_LOCK_PREFIX + database).encode(), digest_size=8).digest(), "big", signed=True
    )


@contextlib.contextmanager
def _only_demo_on(server_url: str, database: str) -> Iterator[None]:
    """Refuse to start while another demo uses ``database``: it would drop that demo's database.

    A session lock held on a connection kept open until the demo ends; a
    killed demo's lock goes with its connection. Advisory locks belong to one
    database, so every demo takes it in the same one, ``postgres``, whatever
    database its DATABASE_URL names (never the demo's, which is dropped).
    """
    try:
        conn = connect(
            make_conninfo(server_url, dbname="postgres"), autocommit=True, application_name=_LOCK_APP
        )
    except psycopg.Error as e:
        raise ProjectionistError(
            "cannot connect to the server's postgres database for the demo's lock: " + one_line(e)
        ) from e
    with conn:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (demo_lock_key(database),)).fetchone()
        if not row or not row[0]:
            raise ProjectionistError(
                f"another demo is using the database {database!r} on this server; "
                "wait for it to end, or give this one another --database"
            )
        yield


_LOCK_APP = "projectionist demo lock"
# Backends of connections the demo just closed (its workers', its lock's)
# can outlive them by a moment; anyone else's are still there after this.
_OTHERS_SETTLE_SECONDS = 3.0


def _other_clients(server_url: str) -> int:
    """Client connections to the server other than this check's own, once the demo's have gone."""
    if not server_url:
        return 0
    deadline = time.monotonic() + _OTHERS_SETTLE_SECONDS
    try:
        with connect(server_url, autocommit=True) as conn:
            while True:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
                ).fetchone()
                others = int(row[0]) if row else 0
                if others == 0 or time.monotonic() > deadline:
                    return others
                time.sleep(0.1)
    except psycopg.Error:
        return 0  # the server is not answering: nobody can be using it


def _demo_database(server_url: str, name: str, *, create: bool) -> str:
    """The URL of database ``name`` on the server of ``server_url``, (re)created when ``create``."""
    if conninfo_to_dict(server_url).get("dbname") == name:
        raise ConfigError(f"the demo database {name!r} must not be the one DATABASE_URL points to")
    if create:
        try:
            with connect(server_url, autocommit=True) as admin:
                # FORCE also ends connections of workers a killed earlier run left behind.
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
                admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.Error as e:
            raise ProjectionistError(f"cannot create the demo database {name!r}: {one_line(e)}") from e
    return make_conninfo(server_url, dbname=name)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C, so the cleanup in ``finally`` blocks runs for it too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Demo:
    def __init__(
        self, console: Console, url: str, events: int, aggregates: int, step_seconds: float, rate: float
    ) -> None:
        self.console = console
        self.url = url
        self.events = events
        self.aggregates = aggregates
        self.step_seconds = step_seconds
        self.rate = rate
        self.fleet = DemoFleet(url, TOTAL_WORKERS)
        self.appender = BackgroundAppender(url, rate=rate, aggregates=aggregates) if rate > 0 else None
        self.initial = 0
        self.started = 0.0
        self._rates = [RateMeter() for _ in range(TOTAL_WORKERS)]
        self._append_rate = RateMeter()

    def say(self, text: str) -> None:
        self.console.print(text, markup=False, soft_wrap=True)

    def run(self) -> DemoOutcome:
        try:
            self._prepare()
            return self._scale_and_verify()
        except _DemoFailed as e:
            self.say(f"FAIL: {e}")
            return DemoOutcome.FAILED
        finally:
            # Whatever happened (Ctrl-C included), no worker outlives the demo:
            # a graceful SIGTERM first, and SIGKILL if even that is interrupted.
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
            # Every partition gets its checkpoint at the start of the store now,
            # exactly as its worker would on first start, so the table can show
            # the lag of partitions that have no worker yet.
            register_group(conn, _PROJECTION, TOTAL_WORKERS)
            for k in range(TOTAL_WORKERS):
                load_checkpoint(conn, _PROJECTION, Partition(k, TOTAL_WORKERS))
            self.say(f"appending {self.events:,} sample events to {self.aggregates} aggregates ...")
            t0 = time.monotonic()
            for done in append_sample_events(
                conn, count=self.events, aggregates=self.aggregates, batch_size=500
            ):
                self.initial = done
            elapsed = max(time.monotonic() - t0, 1e-6)
            self.say(f"appended {self.initial:,} events in {elapsed:.1f}s ({self.initial / elapsed:,.0f}/s)")
            # What `make up` does too: each worker then reads only its own rows.
            t0 = time.monotonic()
            create_indexes(conn, TOTAL_WORKERS)
            self.say(f"built the {TOTAL_WORKERS} partition indexes in {time.monotonic() - t0:.1f}s")

    def _scale_and_verify(self) -> DemoOutcome:
        self.say(
            f"starting worker 0 of {TOTAL_WORKERS}, adding one every {self.step_seconds:g}s "
            f"while appending {self.rate:,.0f} events/s in the background"
        )
        if self.appender is not None:
            self.appender.start()
        self.started = time.monotonic()
        self.fleet.start(0)
        with _Display(self.console) as display:
            self._watch(display, self._scale_up, timeout=None, final=False)
            if self.appender is not None:
                try:
                    self.appender.stop()
                except psycopg.Error as e:
                    raise _DemoFailed(f"the background appender failed: {e}") from e
            drain_started = time.monotonic()
            last = self._watch(
                display, lambda s: "draining" if not s.caught_up else None, _DRAIN_TIMEOUT, final=True
            )
        drain_time = time.monotonic() - drain_started
        drain = Check(
            "all workers caught up (lag 0)",
            last.caught_up,
            f"{drain_time:.1f}s after the appender stopped at {last.appended:,} events"
            if last.caught_up
            else f"still behind after {_DRAIN_TIMEOUT:g}s",
        )
        codes = self.fleet.stop(_STOP_TIMEOUT)
        clean = all(c == 0 for c in codes.values()) and len(codes) == TOTAL_WORKERS
        stopped = Check(
            "workers exited 0 on SIGTERM",
            clean,
            "exit codes " + ", ".join(f"worker {k}: {c}" for k, c in sorted(codes.items())),
        )
        with connect(self.url, autocommit=True) as conn:
            result = verify(conn, TOTAL_WORKERS).with_check(drain).with_check(stopped)
        for k, code in sorted(codes.items()):
            if code != 0:
                self.say(f"worker {k} output:\n{self.fleet.output(k)}")
        self.say("")
        for line in format_verification(result):
            self.say(line)
        return DemoOutcome.PASSED if result.ok else DemoOutcome.FAILED

    def _scale_up(self, snap: _Snapshot) -> str | None:
        """Start the next worker when its step comes; the phase ends one step after the last."""
        due = min(TOTAL_WORKERS, int(snap.elapsed // self.step_seconds) + 1)
        for k in range(len(self.fleet.procs), due):
            self.fleet.start(k)
        if snap.elapsed >= TOTAL_WORKERS * self.step_seconds:
            return None
        if due < TOTAL_WORKERS:
            return f"worker {due} starts in {due * self.step_seconds - snap.elapsed:.1f}s"
        return f"all {TOTAL_WORKERS} workers running; stopping the appender in " + (
            f"{TOTAL_WORKERS * self.step_seconds - snap.elapsed:.1f}s"
        )

    def _watch(
        self,
        display: _Display,
        phase: Callable[[_Snapshot], str | None],
        timeout: float | None,
        *,
        final: bool,
    ) -> _Snapshot:
        """Refresh the table every tick until ``phase`` returns ``None`` (or the timeout)."""
        began = time.monotonic()
        with connect(self.url, application_name="projectionist:demo", autocommit=True) as conn:
            while True:
                snap = self._snapshot(conn)
                text = phase(snap)
                died = self.fleet.exited()
                if died:
                    k, code = min(died.items())
                    raise _DemoFailed(f"worker {k} exited early with code {code}:\n{self.fleet.output(k)}")
                done = text is None or (timeout is not None and time.monotonic() - began > timeout)
                # The last table of the run is always printed, even between plain refreshes.
                display.show(replace(snap, phase=text or ""), force=done and final)
                if done:
                    return snap
                time.sleep(_TICK)

    def _snapshot(self, conn: Connection) -> _Snapshot:
        now = time.monotonic()
        appended = self.initial + (self.appender.appended if self.appender else 0)
        statuses = {w.worker_id: w for w in read_status(conn, _PROJECTION).workers}
        total = sum(w.events_processed for w in statuses.values()) or 1
        rows = []
        for k in range(TOTAL_WORKERS):
            status = statuses.get(k)
            processed = status.events_processed if status else 0
            rate = self._rates[k].update(now, processed)
            rows.append(_Row(k, self._state(k, status), status, rate, processed / total))
        append_rate = self._append_rate.update(now, appended)
        return _Snapshot(now - self.started, "", appended, append_rate, tuple(rows))

    def _state(self, k: int, status: WorkerStatus | None) -> str:
        proc = self.fleet.procs.get(k)
        if proc is None:
            return "not started"
        if proc.returncode is not None:
            return f"exited ({proc.returncode})"
        if status is None or not status.live:
            return "starting"
        return "live" if status.lag_seconds < _LIVE_LAG_SECONDS else "catching up"


_STATE_STYLE = {"not started": "red", "starting": "yellow", "catching up": "yellow", "live": "green"}


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


def _header(snap: _Snapshot, separator: str = " | ") -> str:
    phase = f"{separator}{snap.phase}" if snap.phase else ""
    return f"t={snap.elapsed:5.1f}s  appended {snap.appended:,} events ({snap.append_rate:,.0f}/s){phase}"


def _cells(row: _Row) -> list[str]:
    s = row.status
    return [
        str(row.worker_id),
        row.state,
        f"{s.checkpoint_position:,}" if s else "-",
        f"{s.lag_events:,}" if s else "-",
        f"{s.lag_seconds:.2f}" if s else "-",
        f"{row.rate:,.0f}",
        f"{s.events_processed:,}" if s else "0",
        f"{row.share:.1%}",
    ]


_COLUMNS = ("worker", "state", "checkpoint", "lag (events)", "lag (s)", "events/s", "processed", "share")


def _table(snap: _Snapshot) -> Table:
    table = Table(title=f"projectionist demo: 1 -> {TOTAL_WORKERS} workers", caption=_header(snap, "\n"))
    for column in _COLUMNS:
        table.add_column(column, justify="left" if column == "state" else "right")
    for row in snap.rows:
        table.add_row(*_cells(row), style=_STATE_STYLE.get(row.state, "bold red"))
    return table


def _plain(snap: _Snapshot) -> list[str]:
    widths = (6, 12, 11, 12, 8, 9, 10, 7)
    lines = [_header(snap)]
    for cells in [list(_COLUMNS), *(_cells(r) for r in snap.rows)]:
        lines.append(
            "  "
            + "  ".join(
                c.rjust(w) if i != 1 else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
        )
    return lines
