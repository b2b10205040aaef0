"""The checkout's git commit and whether it has uncommitted changes: recorded by every
MLflow run (deepopt.tracking) and printed by the HTML report, which must not import mlflow
to get it (the report stays a fast stage)."""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["git_state"]


def git_state(cwd: Path) -> tuple[str, str]:
    """(commit, "true"/"false" for uncommitted changes to tracked files) of the checkout at
    ``cwd``; ("unknown", "unknown") without git (the benchmark records the same)."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"
    return commit, "true" if dirty else "false"
