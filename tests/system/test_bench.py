"""The benchmark scripts run end to end: the training benchmark in its quickest mode on tiny
data, the log_model one with two pairs into a throw-away store.

No timing is asserted: only that every section produces its rows and the JSON is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deepopt.data import DEBIAN_FASHION_MNIST

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "bench_train.py"
LOG_MODEL_SCRIPT = REPO / "benchmarks" / "bench_log_model.py"


def _run_script(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python script args`` in ``cwd``, its output captured."""
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _run_bench(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    """The script's JSON results and its printed output, run with ``args`` in tmp_path."""
    if not DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip(f"{DEBIAN_FASHION_MNIST} is missing: run `make setup`")
    out = tmp_path / "results"
    done = _run_script(SCRIPT, *args, "--threads", "1", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (result_file,) = out.glob("bench-*.json")
    return json.loads(result_file.read_text()), done.stdout


def test_quick_run_writes_table_and_json(tmp_path: Path) -> None:
    results, stdout = _run_bench(
        tmp_path,
        *("--quick", "--subset", "100", "--only", "epoch,eval,cli"),
        *("--contenders", "abce", "--eval-images", "500"),
    )

    epoch = results["epoch"]
    assert epoch["train_images"] == 90 and epoch["batch_size"] == 50
    assert sorted(epoch["contenders"]) == ["a", "b", "c", "e"]
    for row in epoch["contenders"].values():
        assert len(row["epochs_s"]) == 3 and row["median_s"] > 0
        assert 0.0 <= row["test_acc"] <= 1.0
    assert epoch["flops_per_image"]["train_step"] > epoch["flops_per_image"]["forward"] > 0
    assert [(r["precision"], r["layout"], r["images"]) for r in results["eval"]["rows"]] == [
        ("fp32", "channels_last", 500),
        ("fp32", "nchw", 500),
        ("bf16", "channels_last", 500),
        ("bf16", "nchw", 500),
    ]
    assert results["cli"]["heavy_imports"] == []  # deepopt --help imports no torch/mlflow
    targets = {t["target"] for t in results["targets"]}
    assert any("(a) >= 0.95" in t for t in targets) and any("--help" in t for t in targets)
    assert "| (b) bare PyTorch loop" in results["markdown"]
    assert "| (b) bare PyTorch loop" in stdout


def test_speedrun_compares_bf16_with_fp32_seed_by_seed(tmp_path: Path) -> None:
    tiny = tmp_path / "speedrun.yaml"
    tiny.write_text(
        "data: {train_subset: 200}\n"
        "early_stop: {enabled: false}\n"
        "train: {epochs: 1, batch_size: 50, precision: bf16}\n"
        "mlflow: {log_model: false}\n"
    )
    results, _ = _run_bench(
        tmp_path, "--only", "speedrun", "--speedrun", str(tiny), "--speedrun-seeds", "2"
    )
    speedrun = results["speedrun"]
    seeds = [run["seed"] for run in speedrun["runs"]]
    assert len(seeds) == 2 and [r["seed"] for r in speedrun["fp32_references"]] == seeds
    gaps = [
        (fast["test_acc"] - fp32["test_acc"]) * 100
        for fast, fp32 in zip(speedrun["runs"], speedrun["fp32_references"], strict=True)
    ]
    (target,) = [t for t in results["targets"] if "same seeds" in t["target"]]
    assert target["value"] == pytest.approx(abs(sum(gaps) / 2))


def test_log_model_pairs_are_timed_both_ways_and_written(tmp_path: Path) -> None:
    out, work = tmp_path / "results", tmp_path / "work"
    work.mkdir()
    done = _run_script(LOG_MODEL_SCRIPT, "--pairs", "2", "--out", str(out), cwd=work)
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


def test_log_model_pair_count_below_one_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = _run_script(LOG_MODEL_SCRIPT, "--pairs", "0", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 2
    assert "--pairs takes a whole number of at least 1" in done.stderr
    assert not out.exists()
