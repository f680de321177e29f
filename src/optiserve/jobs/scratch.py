"""Scratch space under OPTISERVE_HOME/scratch: one folder per optimization run (its temporary
files and those of the processes it starts: TMPDIR points there), removed when the run ends
however it ends, and swept when a server starts (a server killed mid-job leaves its folders).
Nothing of a job is left in the system's temp folder."""

from __future__ import annotations

import shutil
from pathlib import Path


def root(home: Path) -> Path:
    return home / "scratch"


def make(home: Path, name: str) -> Path:
    folder = root(home) / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def sweep(home: Path, keep: set[str]) -> list[str]:
    """Remove every scratch folder not named in `keep` (the runs still active); their names."""
    base = root(home)
    gone = sorted(p.name for p in base.iterdir() if p.name not in keep) if base.is_dir() else []
    for name in gone:
        remove(base / name)
    return gone
