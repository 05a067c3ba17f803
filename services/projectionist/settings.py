"""One typed settings object, parsed once from the environment and overridden by flags.

Invalid values raise :class:`ConfigError` with a one-line message naming the
variable; the CLI turns that into exit code 2.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from psycopg.conninfo import conninfo_to_dict

from projectionist.errors import ConfigError

#: Partition counts and ids are int4 in the database and in the ownership lock keys.
MAX_TOTAL_WORKERS = 2**31 - 1
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# A StatefulSet pod is named <statefulset>-<ordinal>; the ordinal is the worker id.
_POD_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?-(?P<ordinal>\d+)$")


def parse_worker_id(raw: str, name: str = "WORKER_ID") -> int:
    """Parse ``3`` or a StatefulSet pod name such as ``projection-worker-3``."""
    value = raw.strip()
    if re.fullmatch(r"-?\d+", value):
        number = int(value)
    else:
        match = _POD_NAME.match(value)
        if match is None:
            raise ConfigError(
                f"{name}={raw!r} is not a number or a StatefulSet pod name like 'projection-worker-3'"
            )
        number = int(match.group("ordinal"))
    if number < 0:
        raise ConfigError(f"{name}={raw!r} must not be negative")
    return number


def parse_positive_int(raw: str, name: str) -> int:
    try:
        number = int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if number < 1:
        raise ConfigError(f"{name}={raw!r} must be at least 1")
    return number


def parse_positive_float(raw: str, name: str) -> float:
    try:
        number = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    # Not infinity either: a timeout or interval of "inf" would wait forever.
    if not (0 < number < math.inf):
        raise ConfigError(f"{name}={raw!r} must be a finite number greater than 0")
    return number


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a projectionist process can be configured with.

    ``database_url`` ``None`` means: use the embedded PostgreSQL in ``data_dir``.
    """

    database_url: str | None = None
    data_dir: Path = Path(".projectionist")
    worker_id: int | None = None
    total_workers: int = 1
    projection: str = "projectionist.demo.sample_projection:ScalableProjection"
    batch_size: int = 500
    poll_interval: float = 1.0
    metrics_port: int | None = None
    log_level: str = "INFO"
    #: Switch the projection to this TOTAL_WORKERS once the old group has stopped.
    rescale: bool = False
    #: What to do with an event that still fails after ``max_retries``: stop or park.
    poison_policy: str = "stop"
    max_retries: int = 5

    def __post_init__(self) -> None:
        if self.database_url is not None:
            try:
                conninfo_to_dict(self.database_url)
            except Exception:
                # Neither the URL nor libpq's message, which quotes parts of it:
                # it may hold a password.
                raise ConfigError(
                    "DATABASE_URL is not a valid connection string (a postgresql:// URL or key=value pairs)"
                ) from None
        if self.total_workers > MAX_TOTAL_WORKERS:
            raise ConfigError(f"TOTAL_WORKERS={self.total_workers} must be at most {MAX_TOTAL_WORKERS}")
        if self.worker_id is not None and self.worker_id >= self.total_workers:
            raise ConfigError(
                f"WORKER_ID={self.worker_id} must be less than TOTAL_WORKERS={self.total_workers}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"BATCH_SIZE={self.batch_size} must be at least 1")
        if self.poison_policy not in ("stop", "park"):
            raise ConfigError(f"POISON_POLICY={self.poison_policy!r} must be 'stop' or 'park'")
        if self.max_retries < 1:
            raise ConfigError(f"MAX_RETRIES={self.max_retries} must be at least 1")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"METRICS_PORT={self.metrics_port} is not a TCP port")
        if not (self.poll_interval > 0 and math.isfinite(self.poll_interval)):
            raise ConfigError(f"POLL_INTERVAL={self.poll_interval} must be a finite number greater than 0")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"LOG_LEVEL={self.log_level!r} must be one of {', '.join(LOG_LEVELS)}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Parse the environment; keyword ``overrides`` (command-line flags) win when not ``None``.

        Flags are merged before validation, so ``--total-workers 8`` can fix an
        environment whose ``WORKER_ID`` only fits the larger group.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        if env.get("DATABASE_URL"):
            values["database_url"] = env["DATABASE_URL"]
        if env.get("PROJECTIONIST_DATA_DIR"):
            values["data_dir"] = Path(env["PROJECTIONIST_DATA_DIR"])
        if env.get("TOTAL_WORKERS", "").strip():
            values["total_workers"] = parse_positive_int(env["TOTAL_WORKERS"], "TOTAL_WORKERS")
        if env.get("WORKER_ID", "").strip():
            values["worker_id"] = parse_worker_id(env["WORKER_ID"])
        if env.get("PROJECTION"):
            values["projection"] = env["PROJECTION"]
        if env.get("BATCH_SIZE", "").strip():
            values["batch_size"] = parse_positive_int(env["BATCH_SIZE"], "BATCH_SIZE")
        if env.get("POLL_INTERVAL", "").strip():
            values["poll_interval"] = parse_positive_float(env["POLL_INTERVAL"], "POLL_INTERVAL")
        if env.get("METRICS_PORT", "").strip():
            try:
                values["metrics_port"] = int(env["METRICS_PORT"])
            except ValueError:
                raise ConfigError(f"METRICS_PORT={env['METRICS_PORT']!r} is not an integer") from None
        if env.get("RESCALE", "").strip():
            raw = env["RESCALE"].strip().lower()
            if raw not in ("1", "0", "true", "false", "yes", "no"):
                raise ConfigError(f"RESCALE={env['RESCALE']!r} must be 1/0, true/false or yes/no")
            values["rescale"] = raw in ("1", "true", "yes")
        if env.get("POISON_POLICY", "").strip():
            values["poison_policy"] = env["POISON_POLICY"].strip().lower()
        if env.get("MAX_RETRIES", "").strip():
            values["max_retries"] = parse_positive_int(env["MAX_RETRIES"], "MAX_RETRIES")
        if env.get("LOG_LEVEL"):
            values["log_level"] = env["LOG_LEVEL"].upper()
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def override(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied; ``None`` means "keep the current value"."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})
