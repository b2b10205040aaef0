"""Shared fixtures: a real (shrunk) config, tiny IDX data, a temp repository folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def base_params() -> dict[str, Any]:
    """The repository's params.yaml as plain data (tests shrink it, never mock it)."""
    with open(REPO / "params.yaml", encoding="utf-8") as handle:
        data: dict[str, Any] = yaml.safe_load(handle)
    return data


@pytest.fixture(autouse=True)
def _isolated_tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test ever writes into the developer's mlruns/: each gets its own sqlite store."""
    if "MLFLOW_TRACKING_URI" not in os.environ or os.environ.get("DEEPOPT_TEST_KEEP_URI") != "1":
        store = tmp_path / "mlruns"
        store.mkdir(exist_ok=True)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
