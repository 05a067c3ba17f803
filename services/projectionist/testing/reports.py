"""Where tooling writes what it measured: a git-ignored ``out/``, and ``docs/results/`` on request.

Runs never dirty the tree by themselves; only an explicit ``--publish``
updates the snapshot the documentation shows.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Iterable
from pathlib import Path

#: Every run's results, under a folder of the tool's own (git-ignored).
OUT = Path("out")
#: The published snapshot the documentation links to (tracked).
PUBLISHED = Path("docs") / "results"


def add_output_flags(parser: argparse.ArgumentParser, tool: str) -> None:
    """``--out DIR`` (default ``out/<tool>``) and ``--publish``."""
    parser.add_argument(
        "--out", type=Path, default=OUT / tool, help=f"where to write the results (default {OUT / tool})"
    )
    parser.add_argument(
        "--publish",
        action="store_true",
        help=f"also copy them into {PUBLISHED}/, the snapshot the documentation shows",
    )


def publish(files: Iterable[Path], into: Path = PUBLISHED) -> list[Path]:
    """Copy ``files`` into ``into`` (the published snapshot); the copies' paths."""
    into.mkdir(parents=True, exist_ok=True)
    copies = []
    for file in files:
        target = into / file.name
        shutil.copyfile(file, target)
        copies.append(target)
    return copies
