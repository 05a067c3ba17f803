"""The front door: the README's first projection runs as written, and the documentation holds together."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from dashboards.rules import RUNBOOK_BASE_URL, runbook_urls

from projectionist.cli import build_parser
from projectionist.cli.reference import render
from projectionist.store.connection import connect
from projectionist.testing import PostgresServer
from tests.helpers import ROOT

MKDOCS = ROOT / ".venv" / "bin" / "mkdocs"


def _section(markdown: str, heading: str) -> str:
    start = markdown.index(f"\n{heading}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start : end if end != -1 else None]


def first_projection_commands() -> str:
    """The README's "Your first projection" commands: the section's one bash block, verbatim."""
    section = _section((ROOT / "README.md").read_text(), "## Your first projection")
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    return block


@pytest.mark.integration
@pytest.mark.slow
def test_the_readmes_first_projection_runs_as_written(pg_server: PostgresServer) -> None:
    commands = first_projection_commands()
    assert "projectionist catch-up --projection examples.order_totals:OrderTotals" in commands
    with pg_server.fresh_database() as url:  # empty: the commands migrate it themselves
        # A fresh shell in the repository root; only the database is the test's own.
        env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "DATABASE_URL": url}
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", commands],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "order_totals" in result.stdout  # status lists the projection
        with connect(url, autocommit=True) as conn:
            rows = conn.execute("SELECT * FROM order_totals ORDER BY order_id").fetchall()
    assert rows == [("order-1", 3, 450 + 325 + 199), ("order-2", 1, 380), ("order-3", 1, 600)]


def test_the_cli_reference_is_what_the_parser_says() -> None:
    page = (ROOT / "docs" / "reference" / "cli.md").read_text()
    assert page == render(), "docs/reference/cli.md is stale: run `make docs`"


def _flags(parser: argparse.ArgumentParser, path: str = "projectionist") -> list[tuple[str, argparse.Action]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _flags(sub, f"{path} {name}")
        elif action.option_strings and action.help not in (argparse.SUPPRESS, None):
            found.append((f"{path} {action.option_strings[0]}", action))
    return found


def test_every_flag_says_its_variable_and_default_in_one_pattern() -> None:
    flags = _flags(build_parser())
    assert len(flags) > 50
    builtin = {"-h", "--version"}
    odd = [
        name
        for name, action in flags
        if action.option_strings[0] not in builtin
        and not re.search(r" \((env [A-Z_]+( or [A-Z_]+)?, )?default [^)]+\)$", action.help or "")
        and not action.required
    ]
    assert odd == []


def test_the_partition_count_has_one_name_in_every_command() -> None:
    names = {
        name
        for name, action in _flags(build_parser())
        if "--total-workers" in action.option_strings or "--partition-indexes" in action.option_strings
    }
    # Wherever the old names are accepted, --partitions is the first, documented one.
    assert names and all(name.endswith(" --partitions") for name in names), names


# The words of a lab notebook, not of a product's documentation.
_HISTORY = re.compile(r"issue [0-9]|\bMISS\b|design card|the seed", re.IGNORECASE)


def test_no_development_history_in_the_product() -> None:
    found = []
    for top in ("README.md", "CHANGELOG.md", "docs", "services"):
        paths = [ROOT / top] if (ROOT / top).is_file() else sorted((ROOT / top).rglob("*"))
        for path in paths:
            if not path.is_file() or "results" in path.parts or path.suffix not in (".md", ".py", ".sql"):
                continue
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                if _HISTORY.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == []


@pytest.mark.slow
def test_the_site_builds_strictly_and_every_runbook_anchor_exists(tmp_path: Path) -> None:
    site = tmp_path / "site"
    result = subprocess.run(
        [str(MKDOCS), "build", "--strict", "--quiet", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert RUNBOOK_BASE_URL.startswith(config["site_url"])
    urls = runbook_urls()
    assert len(urls) >= 10
    for alert, url in urls.items():
        page, _, anchor = url.removeprefix(config["site_url"]).partition("#")
        html = (site / page / "index.html").read_text()
        assert f'id="{anchor}"' in html, f"{alert}: no #{anchor} in {page}"
