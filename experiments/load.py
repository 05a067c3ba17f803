"""``make load``: a headless Locust run with CSV and HTML reports, judged against thresholds.

By default it brings up everything it needs: a fresh ``projectionist_load``
database (on ``DATABASE_URL``'s server, or the embedded one) and an API
process on a free port. Point ``--host`` at a running API to load that
instead. Exit code: Locust's, which is 1 when the error ratio or p95 passed
its threshold (see ``loadtest/locust_setup.py``), else 0.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from projectionist.errors import ProjectionistError
from projectionist.settings import Settings
from projectionist.store.connection import connect, database_url
from projectionist.store.schema import migrate
from projectionist.testing import (
    ChildProcess,
    HarnessError,
    PostgresServer,
    child_env,
    free_port,
    python_module,
    start_api,
    wait_for_http,
)
from projectionist.testing.reports import OUT

LOAD_DATABASE = "projectionist_load"
SHAPES = {"constant": "shape_constant_rate.py", "step": "shape_step_ramp.py"}
LOCUSTFILES = {"http": "locustfile.py", "db": "locustfile_db.py"}


def build_parser() -> argparse.ArgumentParser:
    env = os.environ
    p = argparse.ArgumentParser(prog="make load", description=__doc__)
    p.add_argument("--target", choices=sorted(LOCUSTFILES), default=env.get("LOAD_TARGET") or "http")
    p.add_argument("--shape", choices=sorted(SHAPES), default=env.get("LOAD_SHAPE") or "constant")
    p.add_argument("--host", default=env.get("LOAD_HOST") or None, help="a running API (env LOAD_HOST)")
    p.add_argument(
        "--database-url",
        default=env.get("LOAD_DATABASE_URL") or None,
        help="use this database as it is (migrated if needed) instead of a fresh projectionist_load",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path(env.get("LOAD_OUT") or OUT / "load"),
        help=f"where to write the reports (env LOAD_OUT, default {OUT / 'load'})",
    )
    p.add_argument("--locust-dir", type=Path, default=Path("loadtest"))
    p.add_argument("--name", default="load", help="file name prefix of the reports (default load)")
    # These override the LOAD_* variables the locustfiles read.
    p.add_argument("--duration", help="seconds (LOAD_DURATION)")
    p.add_argument("--users", help="LOAD_USERS")
    p.add_argument("--rate", help="requests/s of all users together, 0 = unpaced (LOAD_RATE)")
    p.add_argument("--batch-size", help="events per request (LOAD_BATCH_SIZE)")
    p.add_argument("--max-error-ratio", help="LOAD_MAX_ERROR_RATIO (default 0.01)")
    p.add_argument("--max-p95-ms", help="LOAD_MAX_P95_MS (default 500)")
    p.add_argument("--metrics-port", help="Locust's Prometheus exporter port, 0 = off (LOAD_METRICS_PORT)")
    return p


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    names = {
        "duration": "LOAD_DURATION",
        "users": "LOAD_USERS",
        "rate": "LOAD_RATE",
        "batch_size": "LOAD_BATCH_SIZE",
        "max_error_ratio": "LOAD_MAX_ERROR_RATIO",
        "max_p95_ms": "LOAD_MAX_P95_MS",
        "metrics_port": "LOAD_METRICS_PORT",
    }
    return {var: str(getattr(args, attr)) for attr, var in names.items() if getattr(args, attr) is not None}


def locust_command(
    locust_dir: Path, target: str, shape: str, out: Path, name: str, host: str | None, run_time: float
) -> list[str]:
    files = ",".join(str(locust_dir / f) for f in (LOCUSTFILES[target], SHAPES[shape]))
    argv = python_module(
        "locust",
        "-f",
        files,
        "--headless",
        "--csv",
        str(out / name),
        "--html",
        str(out / f"{name}.html"),
        # Written after the last user stopped, so its totals are final; the
        # CSV is rewritten once a second and can miss the last requests.
        "--json-file",
        str(out / name),  # Locust appends ".json"
        # Let a user finish its request when the shape stops, rather than
        # killing it mid-transaction.
        "--stop-timeout",
        "10",
        "--loglevel",
        "INFO",
    )
    if host:
        argv += ["--host", host]
    if run_time > 0:
        argv += ["--run-time", f"{int(run_time)}s"]  # a safety cap; the shape stops first
    return argv


def _duration(raw: str) -> float:
    """LOAD_DURATION as the locustfiles parse it: a finite number of seconds >= 0."""
    try:
        value = float(raw)
    except ValueError:
        raise HarnessError(f"LOAD_DURATION={raw!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise HarnessError(f"LOAD_DURATION={raw!r} must be a number >= 0")
    return value


def _prepare_database(args: argparse.Namespace) -> str:
    if args.database_url:
        url = str(args.database_url)
    else:
        url = PostgresServer(database_url(Settings.from_env())).create_database(LOAD_DATABASE)
    with connect(url, autocommit=True) as conn:
        migrate(conn)
    return url


def run(args: argparse.Namespace) -> int:
    if not (args.locust_dir / LOCUSTFILES[args.target]).exists():
        raise HarnessError(f"no locustfiles in {args.locust_dir}; run from the repository root")
    args.out.mkdir(parents=True, exist_ok=True)
    env = child_env(_overrides(args))
    # Checked before anything is started: a bad value is a message, not a traceback.
    duration = _duration(env.get("LOAD_DURATION") or "60")
    api: ChildProcess | None = None
    host = args.host
    try:
        if args.target == "db" or not host:
            url = _prepare_database(args)
            env["LOAD_DATABASE_URL"] = url
            if args.target == "http":
                port = free_port()
                api = start_api(url, port, args.out / f"{args.name}-api.log")
                host = f"http://127.0.0.1:{port}"
                wait_for_http(f"{host}/readyz", api)
                print(f"API on {host} (log: {api.log_path})", file=sys.stderr)
        argv = locust_command(
            args.locust_dir,
            args.target,
            args.shape,
            args.out,
            args.name,
            host if args.target == "http" else None,
            duration + 60 if duration > 0 else 0,
        )
        code = subprocess.run(argv, env=env, check=False).returncode
        print(
            f"reports: {args.out / args.name}_stats.csv, {args.out / args.name}.html, "
            f"{args.out / args.name}.json (exit code {code})",
            file=sys.stderr,
        )
        return code
    finally:
        if api is not None:
            api.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ProjectionistError as e:
        print(f"make load: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
