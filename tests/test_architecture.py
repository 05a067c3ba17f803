"""The shape of the code: the dependency rule between layers, no import cycles, what the wheel ships,
and the test suite's own rule that a test using the PostgreSQL server is marked `integration`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import grimp
import pytest

from tests.helpers import ROOT

#: Everything of ours that imports: the package, and the tooling beside it.
PACKAGES = ("projectionist", "bench", "chaos", "experiments", "incidents")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_itself_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    assert len(graph.modules) > 100  # the whole tree was found, not an empty one
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "loopy"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from loopy import b\n")
    (package / "b.py").write_text("from loopy import c\n")
    (package / "c.py").write_text("import loopy.a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _cycles(grimp.build_graph("loopy", cache_dir=None)) == [["loopy.a", "loopy.b", "loopy.c"]]


def _lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_dependency_rule_holds() -> None:
    result = _lint_imports(ROOT, ROOT / "services")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        (
            "consume/reader.py",
            "import prometheus_client",
            "The processing loop sees telemetry only through the hook seam",
        ),
        ("worker/worker.py", "import opentelemetry.sdk.trace", "only through the hook seam"),
        ("store/streams.py", "from projectionist.cli import main", "Layers"),
        ("settings.py", "from projectionist.store import connection", "Layers"),
    ],
)
def test_a_deliberate_violation_breaks_the_rule(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    shutil.copytree(ROOT / "services" / "projectionist", tmp_path / "services" / "projectionist")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / "services" / "projectionist" / module).open("a") as f:
        f.write(f"\n{line}\n")
    result = _lint_imports(tmp_path, tmp_path / "services")
    assert result.returncode == 1, result.stdout + result.stderr
    broken = [row for row in result.stdout.splitlines() if "BROKEN" in row]
    assert len(broken) == 1 and contract in broken[0], result.stdout


def test_a_test_using_the_server_without_the_integration_marker_fails_collection(tmp_path: Path) -> None:
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n\n"
        "def test_unmarked(db_url): ...\n\n"
        "@pytest.mark.integration\n"
        "def test_marked(conn): ...\n\n"
        "def test_unit(): ...\n"
    )
    # Collection only: no fixture runs, so no server starts.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.fix_database", "-p", "no:cacheprovider", "-q", "."],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert "1 test(s) use the PostgreSQL server" in result.stderr
    assert "without the integration marker" in result.stderr
    assert "test_sample.py::test_unmarked" in result.stderr
    assert "test_marked" not in result.stderr and "test_unit" not in result.stderr


@pytest.mark.slow
def test_the_wheel_ships_the_package_but_no_tooling(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--wheel-dir",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("projectionist-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"projectionist"}
    assert not [n for n in names if any(tool in n for tool in ("experiment", "bench", "chaos", "incidents"))]
    # Shipped on purpose: the demo, the helpers for testing projections, the migrations.
    for wanted in (
        "projectionist/demo/run.py",
        "projectionist/testing/processes.py",
        "projectionist/store/migrations/0001_event_store.sql",
        "projectionist/py.typed",
    ):
        assert wanted in names
