"""Every setting, and the one place the environment is read: :meth:`Settings.from_env`.

The option objects are frozen and validated when built, from the environment
or in code; an invalid value raises :class:`ConfigError` naming the variable.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from psycopg.conninfo import conninfo_to_dict

from projectionist.errors import ConfigError

#: Partition counts and ids are int4 in the database and in the ownership lock keys.
MAX_PARTITIONS = 2**31 - 1
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: The sample projection, what a worker runs when ``PROJECTION`` is not set.
DEFAULT_PROJECTION = "projectionist.demo:ScalableProjection"
#: The partition count an elastic worker gives a group it creates when ``PARTITIONS`` is not set:
#: the largest fleet that can share the work (docs/concepts/elastic.md says why 16).
DEFAULT_ELASTIC_PARTITIONS = 16

# A StatefulSet pod is named <statefulset>-<ordinal>; the ordinal is the worker id.
_POD_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?-(?P<ordinal>\d+)$")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class PoisonPolicy(StrEnum):
    """What a worker does with an event that still fails after its retries."""

    #: Stay in front of it, retrying, until the projection is fixed.
    STOP = "stop"
    #: Park it as a dead letter (and its aggregate's later events behind it), and go on.
    PARK = "park"


class WorkerMode(StrEnum):
    """How ``projectionist worker`` finds its partitions."""

    #: ``WORKER_ID`` names the one partition it owns.
    STATIC = "static"
    #: It joins the group and takes its fair share of the partitions, which move as workers come and go.
    ELASTIC = "elastic"


# -- parsers: (raw value, variable name) -> value; each raises ConfigError naming the variable


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


def parse_partitions(raw: str, name: str = "PARTITIONS") -> int:
    number = parse_positive_int(raw, name)
    if number > MAX_PARTITIONS:
        raise ConfigError(f"{name}={raw!r} must be at most {MAX_PARTITIONS}")
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


def parse_port(raw: str, name: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None


def parse_bool(raw: str, name: str) -> bool:
    value = raw.strip().lower()
    if value not in _TRUE + _FALSE:
        raise ConfigError(f"{name}={raw!r} must be 1/0, true/false, yes/no or on/off")
    return value in _TRUE


def parse_poison_policy(raw: str, name: str = "POISON_POLICY") -> PoisonPolicy:
    try:
        return PoisonPolicy(raw.strip().lower())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} must be 'stop' or 'park'") from None


def parse_worker_mode(raw: str, name: str = "WORKER_MODE") -> WorkerMode:
    try:
        return WorkerMode(raw.strip().lower())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} must be 'static' or 'elastic'") from None


def _text(raw: str, name: str) -> str:
    return raw.strip()


def _upper(raw: str, name: str) -> str:
    return raw.strip().upper()


def _path(raw: str, name: str) -> Path:
    return Path(raw.strip())


def _secret(raw: str, name: str) -> str:
    # A secret read from a file often ends in a newline; an all-blank one is
    # kept as it is, for validation to refuse.
    return raw.strip() or raw


def _check_port(value: int | None, name: str) -> None:
    if value is not None and not 0 <= value <= 65535:
        raise ConfigError(f"{name}={value} is not a TCP port")


# -- the option objects


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerOptions:
    """How a worker processes its partition; the same for every partition of a process."""

    #: Most events read and applied in one transaction.
    batch_size: int = 500
    #: Seconds between reads when no wake-up arrives.
    poll_interval: float = 1.0
    #: If the group has another partition count, switch to this one once the old group has stopped.
    rescale: bool = False
    #: What to do with an event that still fails after ``max_retries`` retries of its batch.
    poison_policy: PoisonPolicy = PoisonPolicy.STOP
    max_retries: int = 5
    #: Elastic mode: seconds between looks at the group's members (a join or leave is also notified).
    rebalance_interval: float = 0.5

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"BATCH_SIZE={self.batch_size} must be at least 1")
        if not (self.poll_interval > 0 and math.isfinite(self.poll_interval)):
            raise ConfigError(f"POLL_INTERVAL={self.poll_interval} must be a finite number greater than 0")
        if not (self.rebalance_interval > 0 and math.isfinite(self.rebalance_interval)):
            raise ConfigError(
                f"REBALANCE_INTERVAL={self.rebalance_interval} must be a finite number greater than 0"
            )
        if not isinstance(self.poison_policy, PoisonPolicy):
            object.__setattr__(self, "poison_policy", parse_poison_policy(str(self.poison_policy)))
        if self.max_retries < 1:
            raise ConfigError(f"MAX_RETRIES={self.max_retries} must be at least 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class TelemetryOptions:
    """What a worker process serves and exports. ``metrics_port`` ``None``: no HTTP port, no metrics."""

    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    #: Seconds without a loop tick before ``/healthz`` fails.
    health_max_tick_age: float = 60.0
    #: Lag in events is counted up to this many per partition, so a scrape stays cheap.
    lag_count_cap: int = 10_000
    #: The build's revision, in ``projectionist_build_info``.
    revision: str = "unknown"
    #: Export spans over OTLP/HTTP: an ``OTEL_EXPORTER_OTLP_*ENDPOINT`` is set and the SDK is not off.
    tracing: bool = False

    def __post_init__(self) -> None:
        _check_port(self.metrics_port, "METRICS_PORT")
        if not (self.health_max_tick_age > 0 and math.isfinite(self.health_max_tick_age)):
            raise ConfigError(f"HEALTH_MAX_TICK_AGE={self.health_max_tick_age} must be greater than 0")
        if self.lag_count_cap < 1:
            raise ConfigError(f"LAG_COUNT_CAP={self.lag_count_cap} must be at least 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiSettings:
    """Everything the HTTP append API can be configured with (the database comes from :class:`Settings`)."""

    host: str = "0.0.0.0"
    port: int = 8000
    #: Largest request body accepted; larger ones get 413 before anything is parsed.
    max_body_bytes: int = 1_048_576
    #: Most events one POST may carry.
    max_events: int = 1000
    #: Largest page ``GET /streams/{aggregate_id}`` returns.
    max_page_size: int = 1000
    #: When set, every route but health, readiness, metrics and the OpenAPI document needs it.
    token: str | None = None
    pool_min_size: int = 1
    pool_max_size: int = 10
    #: Seconds a request waits for a pooled connection before it gets 503.
    pool_timeout: float = 5.0

    def __post_init__(self) -> None:
        _check_port(self.port, "API_PORT")
        if self.max_body_bytes < 1:
            raise ConfigError(f"API_MAX_BODY_BYTES={self.max_body_bytes} must be at least 1")
        if self.max_events < 1:
            raise ConfigError(f"API_MAX_EVENTS={self.max_events} must be at least 1")
        if self.max_page_size < 1:
            raise ConfigError(f"max_page_size={self.max_page_size} must be at least 1")
        if self.pool_min_size < 0 or self.pool_max_size < max(self.pool_min_size, 1):
            raise ConfigError(
                f"API_POOL_SIZE={self.pool_max_size} must be at least 1 and at least the minimum "
                f"({self.pool_min_size})"
            )
        if self.token is not None and not self.token.strip():
            raise ConfigError("API_TOKEN must not be blank (unset it to turn authentication off)")
        if self.token is not None and self.token != self.token.strip():
            # HTTP strips a header value's surrounding whitespace: no client could send it.
            raise ConfigError("API_TOKEN must not start or end with whitespace")


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything a projectionist process can be configured with.

    ``database_url`` ``None`` means: use the embedded PostgreSQL in ``data_dir``.
    """

    database_url: str | None = None
    data_dir: Path = Path(".projectionist")
    #: The partition this worker owns (``projectionist worker``).
    worker_id: int | None = None
    #: The partition count of the projection's group. In elastic mode only a group that
    #: does not exist yet takes it, and it defaults to DEFAULT_ELASTIC_PARTITIONS there.
    partitions: int = 1
    #: ``worker``: own WORKER_ID's partition, or join the group elastically.
    worker_mode: WorkerMode = WorkerMode.STATIC
    #: ``module:Class`` of the projection to run.
    projection: str = DEFAULT_PROJECTION
    log_level: str = "INFO"
    #: Apply pending migrations at start-up (``worker``, ``pool``, ``api``); by default
    #: migrating is a step of its own, and an unmigrated database is an error.
    migrate: bool = False
    worker: WorkerOptions = field(default_factory=WorkerOptions)
    telemetry: TelemetryOptions = field(default_factory=TelemetryOptions)
    api: ApiSettings = field(default_factory=ApiSettings)

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
        if not 1 <= self.partitions <= MAX_PARTITIONS:
            raise ConfigError(f"PARTITIONS={self.partitions} must be between 1 and {MAX_PARTITIONS}")
        if self.worker_mode is WorkerMode.ELASTIC and self.worker_id is not None:
            raise ConfigError(
                f"WORKER_ID={self.worker_id} is set, but an elastic worker (WORKER_MODE=elastic or "
                "--elastic) takes its partitions itself: unset WORKER_ID"
            )
        if self.worker_id is not None and self.worker_id >= self.partitions:
            raise ConfigError(
                f"WORKER_ID={self.worker_id} must be less than the partition count "
                f"(PARTITIONS or TOTAL_WORKERS), {self.partitions}"
            )
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"LOG_LEVEL={self.log_level!r} must be one of {', '.join(LOG_LEVELS)}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, /, **flags: Any) -> Settings:
        """Parse the environment (default ``os.environ``); ``flags`` that are not ``None`` win.

        ``flags`` are keyed by :attr:`Variable.flag` (``batch_size``, ``api_port``,
        ...). They are merged before validation, so ``--partitions 8`` can fix
        an environment whose ``WORKER_ID`` only fits the larger group.
        """
        env = os.environ if environ is None else environ
        unknown = set(flags) - {v.flag for v in VARIABLES}
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        sections: dict[str | None, dict[str, Any]] = {None: {}, "worker": {}, "telemetry": {}, "api": {}}
        for variable in VARIABLES:
            value = flags.get(variable.flag)
            if value is None:
                value = variable.read(env)
            if value is not None:
                sections[variable.section][variable.field] = value
        if sections[None].get("worker_mode") is WorkerMode.ELASTIC:
            sections[None].setdefault("partitions", DEFAULT_ELASTIC_PARTITIONS)
        sections["telemetry"]["tracing"] = tracing_configured(env)
        return cls(
            **sections[None],
            worker=WorkerOptions(**sections["worker"]),
            telemetry=TelemetryOptions(**sections["telemetry"]),
            api=ApiSettings(**sections["api"]),
        )

    def override(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied; ``None`` means "keep the current value"."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass(frozen=True, slots=True)
class Variable:
    """One environment variable: where its value goes, and how it is parsed."""

    name: str
    #: The :class:`Settings` field it sets (``None``), or the option object's: worker, telemetry or api.
    section: str | None
    field: str
    parse: Callable[[str, str], Any]
    #: The keyword a command-line flag overrides it with in :meth:`Settings.from_env`.
    flag: str = ""
    #: Other names for it; at most one of the names may be set, or all to the same value.
    aliases: tuple[str, ...] = ()
    #: A value of only blanks counts as set (and is validated), rather than as unset.
    keep_blank: bool = False

    def __post_init__(self) -> None:
        if not self.flag:
            object.__setattr__(self, "flag", self.field)

    def read(self, env: Mapping[str, str]) -> Any:
        """The parsed value, or ``None`` when the variable is unset or empty."""
        found = [
            (name, env[name])
            for name in (self.name, *self.aliases)
            if (env.get(name, "") if self.keep_blank else env.get(name, "").strip())
        ]
        if not found:
            return None
        values = {self.parse(raw, name) for name, raw in found}
        if len(values) > 1:
            names = " and ".join(f"{name}={raw!r}" for name, raw in found)
            raise ConfigError(f"{names} disagree; set one of them")
        return values.pop()


#: Every variable projectionist reads, in the order the configuration reference lists them.
VARIABLES: tuple[Variable, ...] = (
    Variable("DATABASE_URL", None, "database_url", _text),
    Variable("PROJECTIONIST_DATA_DIR", None, "data_dir", _path),
    Variable("WORKER_ID", None, "worker_id", parse_worker_id),
    Variable("PARTITIONS", None, "partitions", parse_partitions, aliases=("TOTAL_WORKERS",)),
    Variable("WORKER_MODE", None, "worker_mode", parse_worker_mode),
    Variable("PROJECTION", None, "projection", _text),
    Variable("LOG_LEVEL", None, "log_level", _upper),
    Variable("MIGRATE", None, "migrate", parse_bool),
    Variable("BATCH_SIZE", "worker", "batch_size", parse_positive_int),
    Variable("POLL_INTERVAL", "worker", "poll_interval", parse_positive_float),
    Variable("RESCALE", "worker", "rescale", parse_bool),
    Variable("POISON_POLICY", "worker", "poison_policy", parse_poison_policy),
    Variable("MAX_RETRIES", "worker", "max_retries", parse_positive_int),
    Variable("REBALANCE_INTERVAL", "worker", "rebalance_interval", parse_positive_float),
    Variable("METRICS_PORT", "telemetry", "metrics_port", parse_port),
    Variable("METRICS_HOST", "telemetry", "metrics_host", _text),
    Variable("HEALTH_MAX_TICK_AGE", "telemetry", "health_max_tick_age", parse_positive_float),
    Variable("LAG_COUNT_CAP", "telemetry", "lag_count_cap", parse_positive_int),
    Variable("PROJECTIONIST_REVISION", "telemetry", "revision", _text),
    Variable("API_HOST", "api", "host", _text, flag="api_host"),
    Variable("API_PORT", "api", "port", parse_port, flag="api_port"),
    Variable("API_MAX_BODY_BYTES", "api", "max_body_bytes", parse_positive_int, flag="api_max_body_bytes"),
    Variable("API_MAX_EVENTS", "api", "max_events", parse_positive_int, flag="api_max_events"),
    Variable("API_POOL_SIZE", "api", "pool_max_size", parse_positive_int, flag="api_pool_size"),
    Variable("API_POOL_TIMEOUT", "api", "pool_timeout", parse_positive_float, flag="api_pool_timeout"),
    # A blank token must not pass for "no authentication" unnoticed.
    Variable("API_TOKEN", "api", "token", _secret, flag="api_token", keep_blank=True),
)


def tracing_configured(environ: Mapping[str, str]) -> bool:
    """True when an OTLP endpoint is set and neither ``OTEL_SDK_DISABLED`` nor
    ``OTEL_TRACES_EXPORTER=none`` turns tracing off.

    Everything else about tracing (service name, sampler, batching, headers)
    the OpenTelemetry SDK reads from its standard variables itself.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )


def variable(name: str) -> Variable:
    """The :class:`Variable` called ``name``."""
    for v in VARIABLES:
        if v.name == name:
            return v
    raise KeyError(name)


def default_of(v: Variable) -> Any:
    """The value a variable has when it is not set."""
    owner: type[Any] = {
        None: Settings,
        "worker": WorkerOptions,
        "telemetry": TelemetryOptions,
        "api": ApiSettings,
    }[v.section]
    for f in fields(owner):
        if f.name == v.field:
            return f.default_factory() if callable(f.default_factory) else f.default
    raise KeyError(v.field)
