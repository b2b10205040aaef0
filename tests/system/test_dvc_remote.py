"""Results travel between machines through a DVC remote: a tiny copy of this project
reproduces, pushes to a local-directory remote, and a fresh clone pulls everything and
has nothing left to run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO, tiny_params
from deepopt.data import DEBIAN_FASHION_MNIST

pytestmark = pytest.mark.slow

DVC = str(Path(sys.executable).with_name("dvc"))
STAGE = "train@small"  # with prepare before it: the data and a trained model
# The outputs a second machine needs: the prepared data, the model, its run ids, metrics.
OUTPUTS = (
    "data/prepared/train.pt",
    "data/prepared/meta.json",
    "models/small/model.pt",
    "models/small/run.json",
    "metrics/small/train.json",
    "plots/small/history.csv",
)


def _run(*command: str, cwd: Path) -> str:
    env = {
        **os.environ,
        # The stages' `deepopt` command: the one of the interpreter running the tests.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "deepopt test",
        "GIT_AUTHOR_EMAIL": "test@deepopt.invalid",
        "GIT_COMMITTER_NAME": "deepopt test",
        "GIT_COMMITTER_EMAIL": "test@deepopt.invalid",
    }
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stderr}"
    return done.stdout + done.stderr


def _project(folder: Path, base_params: dict[str, Any]) -> Path:
    """This repository's pipeline files, sources and .gitignore with tiny params, in git."""
    folder.mkdir()
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy2(REPO / name, folder / name)
    shutil.copytree(
        REPO / "src", folder / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    params = tiny_params(base_params, train={"epochs": 1}, mlflow={"log_model": False})
    (folder / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    _run("git", "init", "-q", "-b", "main", cwd=folder)
    _run(DVC, "init", "-q", cwd=folder)
    return folder


def test_pushed_results_pull_into_a_fresh_clone_with_nothing_to_rerun(
    tmp_path: Path, base_params: dict[str, Any]
) -> None:
    if not DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip(f"{DEBIAN_FASHION_MNIST} is missing: run `make setup`")
    origin = _project(tmp_path / "origin", base_params)
    remote = tmp_path / "remote"  # stands in for s3://bucket/path (see the README)
    _run(DVC, "remote", "add", "-d", "shared", str(remote), cwd=origin)
    _run(DVC, "repro", STAGE, cwd=origin)
    _run("git", "add", "-A", cwd=origin)  # dvc.lock, the .gitignore files dvc wrote
    _run("git", "commit", "-q", "-m", "tiny pipeline, reproduced", cwd=origin)
    _run(DVC, "push", "--with-deps", STAGE, cwd=origin)
    assert any(path.is_file() for path in remote.rglob("*"))

    clone = tmp_path / "clone"
    _run("git", "clone", "-q", str(origin), str(clone), cwd=tmp_path)
    assert not any((clone / name).exists() for name in OUTPUTS)  # git carries no results
    _run(DVC, "pull", "--with-deps", STAGE, cwd=clone)
    for name in OUTPUTS:
        assert (clone / name).read_bytes() == (origin / name).read_bytes(), name

    status = _run(DVC, "status", "--with-deps", STAGE, cwd=clone)
    assert "up to date" in status, status
    repro = _run(DVC, "repro", STAGE, cwd=clone)
    assert "Running stage" not in repro and f"Stage '{STAGE}' didn't change" in repro, repro
    assert not (clone / "checkpoints").exists()  # no training happened here
