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


def _declared_params(stage: dict[str, Any]) -> list[str]:
    """The params.yaml keys a stage (or a foreach stage's ``do``) declares as its params."""
    body = stage.get("do", stage)
    keys: list[str] = []
    for entry in body.get("params", []):
        if isinstance(entry, str):
            keys.append(entry)
        else:  # {file: [keys]}: only params.yaml's own keys are checked here
            keys.extend(k for file, ks in entry.items() if file == "params.yaml" for k in ks)
    return keys


def _lookup(tree: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def test_every_param_a_stage_declares_is_in_params_yaml() -> None:
    # DVC refuses to run a stage whose declared param is missing from params.yaml ("are
    # missing from 'params.yaml'"), even when deepopt's config has a default for it.
    with open(REPO / "params.yaml", encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    missing: list[str] = []
    for dvc_file in (REPO / "dvc.yaml", REPO / "transfer" / "dvc.yaml"):
        with open(dvc_file, encoding="utf-8") as handle:
            stages = yaml.safe_load(handle)["stages"]
        for stage_name, stage in stages.items():
            names = list(raw["experiments"]) if "foreach" in stage else [None]
            for key in _declared_params(stage):
                for name in names:
                    resolved = key.replace("${key}", name) if name else key
                    if not _lookup(raw, resolved):
                        missing.append(f"{dvc_file.name}:{stage_name}: {resolved}")
    assert not missing, missing


def test_dvc_parses_yaml_with_ruamels_c_loader() -> None:
    """DVC reads params.yaml once per stage and dvc.lock twice per `dvc repro`; ruamel's
    pure-Python parser made a no-op repro of the pipeline 1.8x slower (see pyproject)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.main import CParser

    assert CParser is not None, "ruamel.yaml.clib is missing: pip install -e '.[dev]'"
    assert YAML(typ="safe").Parser is CParser
