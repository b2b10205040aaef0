"""The log_model benchmark script runs end to end: it logs real models both ways into a
throw-away store and writes its JSON. No timing is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_log_model.py"


def test_pairs_are_timed_both_ways_and_written(tmp_path: Path) -> None:
    out, work = tmp_path / "results", tmp_path / "work"
    work.mkdir()
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--pairs", "2", "--out", str(out)],
        cwd=work,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (result_file,) = out.glob("log-model-*.json")
    result = json.loads(result_file.read_text())
    assert result["pairs"] == 2
    assert len(result["seconds"]["with_check"]) == len(result["seconds"]["without_check"]) == 2
    assert all(s > 0 for side in result["seconds"].values() for s in side)
    assert "paired difference median" in done.stdout
    # Its store was a temporary folder: nothing left where it ran, nothing in the store that
    # MLFLOW_TRACKING_URI names (the test's own, from conftest).
    assert not list(work.iterdir())
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()


def test_a_pair_count_below_one_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--pairs", "0", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--pairs takes a whole number of at least 1" in done.stderr
    assert not out.exists()
