"""Shared fixtures: a real (shrunk) config, tiny IDX data, a temp repository folder."""

from __future__ import annotations

import copy
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import settings

REPO = Path(__file__).resolve().parents[1]

# `pytest --hypothesis-profile=long`: thousands of examples per property (the params.yaml
# fuzzer, tests/system/test_fuzz_params.py, takes the count from here), no deadline.
settings.register_profile("long", max_examples=3000, deadline=None)


# The longest tests (minutes: a fresh clone's whole tiny pipeline) start first, so that
# make test's two xdist workers do not end with one of them running it alone.
LONGEST_FIRST = ("tests/system/test_readme.py",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest tests first, then the rest in their order; tests marked ``cuda``
    (tests/cuda/, benchmarks/gpu_check.sh) skip without a CUDA GPU."""
    import torch

    items.sort(key=lambda item: not item.nodeid.startswith(LONGEST_FIRST))  # stable
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture()
def base_params() -> dict[str, Any]:
    """The repository's params.yaml as plain data (tests shrink it, never mock it)."""
    with open(REPO / "params.yaml", encoding="utf-8") as handle:
        data: dict[str, Any] = yaml.safe_load(handle)
    return data


@pytest.fixture(autouse=True)
def _isolated_tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test ever writes into the developer's mlruns/: each gets its own sqlite store.

    MLflow's own global URI is pointed there too: ``mlflow.set_tracking_uri`` (called by
    an earlier test's stage) outranks the variable, so a bare ``MlflowClient()`` in a test
    that ran its stage in a subprocess would otherwise read the earlier test's store."""
    if "MLFLOW_TRACKING_URI" not in os.environ or os.environ.get("DEEPOPT_TEST_KEEP_URI") != "1":
        store = tmp_path / "mlruns"
        store.mkdir(exist_ok=True)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    if "mlflow" in sys.modules:  # else nothing has set it yet
        sys.modules["mlflow"].set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])


@pytest.fixture(autouse=True)
def _outputs_allowed_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test's tmp_path counts as a folder configured for outputs (deepopt.paths' wall
    refuses any other place outside the workspace), whatever folder the test runs in; the
    folders a test configures are forgotten after it. A test of the wall itself sets
    ``paths._CONFIGURED`` to ``{}`` to see it as a real process would."""
    from deepopt import paths

    monkeypatch.setattr(paths, "_CONFIGURED", {})
    paths.allow_outputs_under(tmp_path)


TINY_SUBSET = 500  # 450 train / 50 val images of the real Fashion-MNIST


def tiny_params(base: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    """The repository's params shrunk to seconds: tiny subset, narrow CNN, 3 epochs, one
    seed (a test of the replicas asks for matrix.seeds itself)."""
    params = copy.deepcopy(base)
    params["matrix"] = {**params.get("matrix", {}), "seeds": 1}
    params["data"]["train_subset"] = TINY_SUBSET
    params["model"].update(conv_channels=[4, 8, 8], dense_units=16)
    params["train"].update(epochs=3, threads=1)
    params["lr_find"] = {**params.get("lr_find", {}), "num_iter": 10}  # 100 batches: seconds
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


@dataclass(frozen=True)
class Finished:
    work: Path  # a repository folder: params.yaml, data/, models/, metrics/, plots/, reports/
    store: Path  # its MLflow sqlite store's folder (mlflow.db + artifacts)


@pytest.fixture(scope="session")
def finished_workspace(tmp_path_factory: pytest.TempPathFactory, tiny_prepared: Path) -> Finished:
    """prepare -> train -> evaluate -> report of experiment ``small`` (no logged model),
    once per session: tests copy it with ``finished``."""
    from deepopt import cli

    root = tmp_path_factory.mktemp("finished")
    work, store = root / "work", root / "mlruns"
    shutil.copytree(tiny_prepared, work / "data" / "prepared")
    with open(REPO / "params.yaml", encoding="utf-8") as handle:
        params = tiny_params(yaml.safe_load(handle), mlflow={"log_model": False})
    (work / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
        for stage in ("train", "evaluate"):
            assert cli.main([stage, "--experiment", "small"]) == 0, stage
        assert cli.main(["report"]) == 0
    return Finished(work=work, store=store)


@pytest.fixture()
def finished(finished_workspace: Finished, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the finished workspace and its store; the test runs inside it.
    The autouse store fixture already points MLFLOW_TRACKING_URI at the copied store."""
    work = tmp_path / "work"
    shutil.copytree(finished_workspace.work, work)
    shutil.copytree(finished_workspace.store, tmp_path / "mlruns", dirs_exist_ok=True)
    monkeypatch.chdir(work)
    return work
