"""Shared fixtures: a real (shrunk) config, tiny IDX data, a temp repository folder."""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
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


TINY_SUBSET = 500  # 450 train / 50 val images of the real Fashion-MNIST


def tiny_params(base: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    """The repository's params shrunk to seconds: tiny subset, narrow CNN, 3 epochs."""
    params = copy.deepcopy(base)
    params["data"]["train_subset"] = TINY_SUBSET
    params["model"].update(conv_channels=[4, 8, 8], dense_units=16)
    params["train"].update(epochs=3, threads=1)
    params["experiments"] = {"small": {}}
    for section, values in sections.items():
        if isinstance(params.get(section), dict):
            params[section].update(values)
        else:
            params[section] = values
    return params


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/prepared/ made once per session by the real prepare stage from the Debian files."""
    from deepopt import cli
    from deepopt.data import DEBIAN_FASHION_MNIST

    if not Path(DEBIAN_FASHION_MNIST).is_dir():
        pytest.skip(f"{DEBIAN_FASHION_MNIST} is missing: run `make setup`")
    folder = tmp_path_factory.mktemp("prepared")
    with open(REPO / "params.yaml", encoding="utf-8") as handle:
        params = tiny_params(yaml.safe_load(handle))
    (folder / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        assert cli.main(["prepare"]) == 0
    finally:
        os.chdir(cwd)
    return folder / "data" / "prepared"


@pytest.fixture()
def workspace(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tiny_prepared: Path,
    base_params: dict[str, Any],
) -> Callable[..., Path]:
    """A repository-like folder with the tiny prepared data; call it with section
    overrides to (re)write its params.yaml. The test runs inside it."""
    work = tmp_path / "work"
    shutil.copytree(tiny_prepared, work / "data" / "prepared")
    monkeypatch.chdir(work)

    def write(**sections: dict[str, Any]) -> Path:
        params = tiny_params(base_params, **sections)
        (work / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
        return work

    write()
    return write
