"""Settings: `Settings.from_env` reads aliases, lets flags win and refuses a blank API_TOKEN; every
bad setting is a one-line configuration error (exit 2) that names its variable."""

from __future__ import annotations

import pytest

from projectionist.errors import ConfigError
from projectionist.settings import ApiSettings, Settings
from tests.helpers import run_cli


def _one_config_error_line(result: object, name: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)  # type: ignore[attr-defined]
    lines = result.stderr.strip().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1, result.stderr  # type: ignore[attr-defined]
    assert name in lines[0]


# -- Settings.from_env --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [{"PARTITIONS": "4"}, {"TOTAL_WORKERS": "4"}, {"PARTITIONS": "4", "TOTAL_WORKERS": " 4"}],
    ids=["PARTITIONS", "TOTAL_WORKERS", "both-agree"],
)
def test_partitions_and_total_workers_name_the_same_setting(env: dict[str, str]) -> None:
    assert Settings.from_env(env).partitions == 4


def test_partitions_and_total_workers_that_disagree_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="PARTITIONS='4' and TOTAL_WORKERS='2' disagree; set one of them"):
        Settings.from_env({"PARTITIONS": "4", "TOTAL_WORKERS": "2"})


def test_a_flag_overrides_its_variable_and_none_keeps_it() -> None:
    env = {"BATCH_SIZE": "10", "API_PORT": "9000"}
    assert Settings.from_env(env, batch_size=20, api_port=9100).worker.batch_size == 20
    assert Settings.from_env(env, batch_size=20, api_port=9100).api.port == 9100
    assert Settings.from_env(env, batch_size=None).worker.batch_size == 10


def test_flags_are_merged_before_validation() -> None:
    # The environment alone is invalid (5 >= 4); --partitions 8 makes it valid.
    env = {"WORKER_ID": "5", "TOTAL_WORKERS": "4"}
    with pytest.raises(ConfigError, match="WORKER_ID=5 must be less than the partition count"):
        Settings.from_env(env)
    settings = Settings.from_env(env, partitions=8)
    assert (settings.worker_id, settings.partitions) == (5, 8)


def test_an_unknown_flag_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="unknown settings: partitons"):
        Settings.from_env({}, partitons=3)


def test_a_blank_variable_is_unset_but_a_blank_api_token_is_refused() -> None:
    assert Settings.from_env({"BATCH_SIZE": "  "}).worker.batch_size == 500
    # keep_blank: a token of only blanks must not pass for "no authentication".
    with pytest.raises(ConfigError, match="API_TOKEN must not be blank"):
        Settings.from_env({"API_TOKEN": "   "})
    assert Settings.from_env({"API_TOKEN": ""}).api.token is None
    # A secret read from a file ends in a newline: it is taken stripped.
    assert Settings.from_env({"API_TOKEN": "s3cret\n"}).api.token == "s3cret"


# -- one-line configuration errors --------------------------------------------------------------


# logging.basicConfig would raise a traceback (exit 1) for an unknown level.
@pytest.mark.parametrize(
    ("env", "args"),
    [({"LOG_LEVEL": "verbose"}, ["status"]), ({}, ["--log-level", "loud", "status"])],
)
def test_invalid_log_level_is_a_one_line_config_error(env: dict[str, str], args: list[str]) -> None:
    result = run_cli(*args, db_url="postgresql://unused", env=env)
    _one_config_error_line(result, "LOG_LEVEL")


# The flag must get the check the variable gets: at 0 the worker polls in a busy loop.
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_poll_interval_flag_is_validated_like_the_environment(value: float) -> None:
    with pytest.raises(ConfigError, match="POLL_INTERVAL"):
        Settings.from_env({}, poll_interval=value)


# A malformed DATABASE_URL is a configuration error, not a psycopg traceback (exit 1).
# The message must not quote it: libpq's own message quotes a bad password.
@pytest.mark.parametrize(("url", "secret"), [("notaurl", "notaurl"), ("postgresql://u:p%zz@h/db", "p%zz")])
def test_malformed_database_url_is_a_one_line_config_error(url: str, secret: str) -> None:
    result = run_cli("status", env={"DATABASE_URL": url})
    _one_config_error_line(result, "DATABASE_URL")
    assert secret not in result.stderr


# The columns and lock keys are int4: a larger count must be refused before it
# reaches the database (NumericValueOutOfRange).
@pytest.mark.integration
def test_total_workers_beyond_the_database_range_is_a_config_error(db_url: str) -> None:
    result = run_cli(
        "worker", db_url=db_url, env={"WORKER_ID": "0", "TOTAL_WORKERS": "3000000000"}, timeout=60
    )
    _one_config_error_line(result, "TOTAL_WORKERS")


def test_a_page_size_below_one_is_refused_at_construction() -> None:
    # Built in code (no environment variable checks it), a 0 would make every
    # GET /streams a 422 that names an impossible range.
    with pytest.raises(ConfigError, match="max_page_size=0"):
        ApiSettings(max_page_size=0)
