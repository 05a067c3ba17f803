"""The load test when appends fail: every failure counted, crashed users fail the verdict,
`make load` refuses a bad duration with a message, and no two children get the same port."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from experiments import load as load_runner

from projectionist.testing import PostgresServer, ports
from tests.helpers import ROOT, TEMPLATE_DB

# --- 1. locustfile_db.py: an append whose reconnect fails is never reported -------------

_DB_USER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import locust  # gevent monkey-patching, as under `locust -f`
    from locust.env import Environment
    import psycopg
    import locustfile_db

    admin_url, dbname = sys.argv[1], sys.argv[2]
    env = Environment(user_classes=[locustfile_db.DatabaseUser], events=locust.events)
    env.create_local_runner()
    user = locustfile_db.DatabaseUser(env)
    user.on_start()
    user.append()  # the database is up: one committed append
    pid = user.conn.info.backend_pid
    with psycopg.connect(admin_url, autocommit=True) as admin:
        # The database goes away for new sessions, and this user's session is cut.
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    raised = 0
    for _ in range(3):  # three more appends, all of which fail
        try:
            user.append()
        except Exception:
            raised += 1  # under Locust: a user_error, not a failed request
    total = env.stats.total
    print(json.dumps({"requests": total.num_requests, "failures": total.num_failures, "raised": raised}))
    """
)


@pytest.mark.integration
def test_database_user_reports_every_failed_append_even_when_reconnecting_fails(
    pg_server: PostgresServer,
) -> None:
    with pg_server.fresh_database(TEMPLATE_DB) as url:
        dbname = url.split("dbname=")[1].split()[0]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LOAD_", "API_"))}
        env.update(
            LOAD_DATABASE_URL=url,
            LOAD_BATCH_SIZE="2",
            PYTHONPATH=os.pathsep.join([str(ROOT / "loadtest"), str(ROOT / "services"), str(ROOT)]),
        )
        result = subprocess.run(
            [sys.executable, "-c", _DB_USER_SCRIPT, pg_server.admin_url, dbname],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout.strip().splitlines()[-1])
    # Four appends were attempted and three failed: Locust must count them, or the
    # error-ratio threshold never sees a database outage.
    assert counts == {"requests": 4, "failures": 3, "raised": 0}, counts


# --- 2. locust_setup.py: the verdict overwrites Locust's exit code for user exceptions -----

_VERDICT_SCRIPT = textwrap.dedent(
    """
    import argparse, json
    import locust
    from locust.env import Environment
    from locust import User, task, constant
    import locust_setup

    class U(User):
        wait_time = constant(0)
        @task
        def t(self): pass

    locust_setup.register(locust.events)
    env = Environment(user_classes=[U], events=locust.events)
    runner = env.create_local_runner()
    env.parsed_options = argparse.Namespace(
        master=False, worker=False, max_error_ratio=0.01, max_p95_ms=500.0, min_requests=1, metrics_port=0
    )
    # 100 good requests, and users that crashed with an exception (e.g. on_start
    # could not connect): Locust itself would exit 1 for those.
    for _ in range(100):
        env.events.request.fire(request_type="DB", name="append", response_time=5.0,
                                response_length=1, exception=None, context={})
    env.events.user_error.fire(user_instance=None, exception=RuntimeError("connection refused"), tb=None)
    env.events.quitting.fire(environment=env, reverse=True)
    print(json.dumps({"exceptions": len(runner.exceptions), "exit_code": env.process_exit_code}))
    """
)


def test_run_with_crashed_users_does_not_exit_0() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOAD_", "API_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "loadtest"), str(ROOT / "services"), str(ROOT)])
    result = subprocess.run(
        [sys.executable, "-c", _VERDICT_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["exceptions"] == 1
    # Locust's own rule is exit 1 when users raised; the thresholds must not turn that into 0.
    assert out["exit_code"] != 0, out


# --- 3. make load: a bad LOAD_DURATION / --duration is a traceback, not a clear error --------


@pytest.mark.parametrize("duration", ["ten", "inf"])
def test_make_load_refuses_a_bad_duration_with_a_message(
    duration: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --host: nothing is started; the duration is the first thing used.
    code = load_runner.main(
        ["--host", "http://127.0.0.1:9", "--duration", duration, "--out", str(tmp_path / "out")]
    )
    assert code == 2
    assert "LOAD_DURATION" in capsys.readouterr().err


# --- 4. API_TOKEN with surrounding whitespace: covered in test_api.py ---------------------


# --- 5. free_port: the same port handed to two children --------------------------------


# A port is free until its user binds it, so the kernel may offer it twice in a
# row; two chaos workers once got the same METRICS_PORT that way.
def test_free_port_never_hands_out_the_same_port_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    offers = [40001, 40001, 40002]
    monkeypatch.setattr(ports, "_port_the_kernel_offers", lambda: offers.pop(0))
    monkeypatch.setattr(ports, "_handed_out", set())
    assert [ports.free_port(), ports.free_port()] == [40001, 40002]
