"""dvc.yaml agrees with deepopt.paths and generates one train and one evaluate stage
per experiment of params.yaml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from deepopt import paths
from deepopt.config import load_params

REPO = Path(__file__).resolve().parents[1]


def _dvc_yaml() -> dict[str, Any]:
    with open(REPO / "dvc.yaml", encoding="utf-8") as handle:
        data: dict[str, Any] = yaml.safe_load(handle)
    return data


def _names(entries: list[Any]) -> list[str]:
    """Paths of a stage's outs/metrics/plots list (plain strings or {path: options})."""
    return [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries]


def _for(stage: dict[str, Any], key: str, name: str) -> list[str]:
    return [p.replace("${key}", name) for p in _names(stage["do"].get(key, []))]


def test_stage_outputs_are_the_paths_the_code_writes() -> None:
    stages = _dvc_yaml()["stages"]
    prepare_outs = set(_names(stages["prepare"]["outs"]))
    assert prepare_outs == {str(paths.prepared_split_path(s)) for s in ("train", "val", "test")} | {
        str(paths.meta_path())
    }
    name = "some_experiment"
    train, evaluate = stages["train"], stages["evaluate"]
    assert _for(train, "outs", name) == [
        str(paths.model_path(name)),
        str(paths.run_info_path(name)),
    ]
    assert _for(train, "metrics", name) == [str(paths.train_metrics_path(name))]
    assert _for(train, "plots", name) == [str(paths.history_path(name))]
    assert _for(evaluate, "metrics", name) == [str(paths.eval_metrics_path(name))]
    assert f"experiments.{'${key}'}" in train["do"]["params"]


def test_every_experiment_gets_a_train_and_an_evaluate_stage(tmp_path: Path) -> None:
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    listed = subprocess.run(
        [dvc, "stage", "list", "--name-only"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    experiments = list(load_params(REPO / "params.yaml").experiments)
    assert experiments, "params.yaml defines the lecture's matrix"
    for name in experiments:
        assert listed.count(f"train@{name}") == 1
        assert listed.count(f"evaluate@{name}") == 1
    assert "prepare" in listed and "report" in listed
