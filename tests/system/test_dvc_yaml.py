"""dvc.yaml agrees with deepopt.paths, generates one train and one evaluate stage per
experiment of params.yaml, and each stage depends on exactly the code it runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import grimp
import pytest
import yaml

from deepopt import paths
from deepopt.config import load_params

REPO = Path(__file__).resolve().parents[2]


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
        str(paths.runs_history_path(name)),
    ]
    assert _for(train, "metrics", name) == [str(paths.train_metrics_path(name))]
    assert _for(train, "plots", name) == [str(paths.history_path(name))]
    assert _for(evaluate, "metrics", name) == [str(paths.eval_metrics_path(name))]
    assert f"experiments.{'${key}'}" in train["do"]["params"]
    lr_find, base = stages["lr_find"], paths.BASE_EXPERIMENT  # `deepopt lr-find`: the base config
    assert _names(lr_find["metrics"]) == [str(paths.lr_find_metrics_path(base))]
    assert _names(lr_find["plots"]) == [
        str(paths.lr_find_curve_path(base)),
        str(paths.lr_find_plot_path(base)),
    ]
    assert str(paths.lr_find_metrics_path(base)) in stages["report"]["deps"]
    assert _names(stages["report"]["metrics"]) == [str(paths.SUMMARY_METRICS)]


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


PIPELINES = (REPO / "dvc.yaml", REPO / "transfer" / "dvc.yaml", REPO / "compare" / "dvc.yaml")


def test_every_param_a_stage_declares_is_in_params_yaml() -> None:
    # DVC refuses to run a stage whose declared param is missing from params.yaml ("are
    # missing from 'params.yaml'"), even when deepopt's config has a default for it.
    with open(REPO / "params.yaml", encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    missing: list[str] = []
    for dvc_file in PIPELINES:
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


PACKAGE = REPO / "src" / "deepopt"


def _stage_module(command: str) -> str:
    """The stage module a dvc.yaml command runs: `deepopt train ...` -> deepopt.stages.train,
    `deepopt lr-find` -> deepopt.stages.lr_find."""
    words = command.split()
    assert words[0] == "deepopt", command
    return f"deepopt.stages.{words[1].replace('-', '_')}"


def _module_file(module: str) -> Path:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _code_stages() -> list[tuple[str, str, list[str]]]:
    found = []
    for dvc_file in PIPELINES:
        with open(dvc_file, encoding="utf-8") as handle:
            stages = yaml.safe_load(handle)["stages"]
        for name, stage in stages.items():
            body = stage.get("do", stage)
            deps = [d for d in _names(body.get("deps", [])) if d.startswith("src/")]
            found.append((f"{dvc_file.relative_to(REPO)}:{name}", body["cmd"], deps))
    return found


def _code_run(graph: grimp.ImportGraph, module: str) -> set[str]:
    """``module`` and every deepopt module Python runs with it: what it imports, directly,
    indirectly or lazily, and the packages around each (their __init__ runs first)."""
    runs: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in runs or not name.startswith("deepopt"):
            continue
        runs.add(name)
        todo.extend(graph.find_upstream_modules(name))
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
    return runs


@pytest.fixture(scope="module")
def import_graph() -> grimp.ImportGraph:
    return grimp.build_graph("deepopt", cache_dir=None)


@pytest.mark.parametrize(("stage", "command", "deps"), _code_stages(), ids=lambda v: str(v))
def test_a_stage_depends_on_exactly_the_code_it_runs(
    import_graph: grimp.ImportGraph, stage: str, command: str, deps: list[str]
) -> None:
    """Every module the stage imports (directly, indirectly or lazily) lies under one of its
    src/ deps, and every src/ dep holds at least one of them: changing a default in
    config/ reruns the stages that read it, and changing the report reruns no training."""
    runs = _code_run(import_graph, _stage_module(command))
    files = {_module_file(m).relative_to(REPO) for m in runs if m.startswith("deepopt.")}
    files.discard(Path("src/deepopt/__init__.py"))  # the version string only
    files.discard(Path("src/deepopt/stages/__init__.py"))  # a docstring only
    declared = [Path(d) for d in deps]
    uncovered = sorted(str(f) for f in files if not any(f.is_relative_to(d) for d in declared))
    assert not uncovered, f"{stage}: runs code its deps lack: {uncovered}"
    unused = [str(d) for d in declared if not any(f.is_relative_to(d) for f in files)]
    assert not unused, f"{stage}: depends on code it does not run: {unused}"
