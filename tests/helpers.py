"""Plain helpers the tests share: the checkout's root, and the CLI as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: A migrated database that each test's own database is copied from.
TEMPLATE_DB = "projectionist_test_template"


def run_cli(
    *args: str, db_url: str | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m projectionist ARGS`` as a real subprocess, from the checkout's root."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("WORKER_ID", "TOTAL_WORKERS")}
    if db_url is not None:
        full_env["DATABASE_URL"] = db_url
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "projectionist", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )
