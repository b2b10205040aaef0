"""Where the report's numbers came from, for the HTML page's links: each experiment's
MLflow runs (``models/<name>/run.json``, written by train beside model.pt) and the code the
report was built from (the workspace's git commit and, inside ``dvc exp run``, the DVC
experiment's name and baseline commit)."""

from __future__ import annotations

import urllib.parse
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from deepopt import paths
from deepopt.errors import DataError
from deepopt.paths import BEST_EXPERIMENT
from deepopt.reporting.reading import REPRO, _read_json

__all__ = [
    "MLFLOW_UI",
    "MemberRun",
    "RunLinks",
    "SourceState",
    "dvc_stages",
    "experiment_url",
    "mlflow_ui_base",
    "read_run_links",
    "run_url",
    "source_state",
]

# `make ui`'s address (the Makefile's UI_HOST and UI_PORT defaults), serving mlruns/.
MLFLOW_UI = "http://127.0.0.1:5000"


@dataclass(frozen=True)
class MemberRun:
    """The MLflow run of one trained network (replica r trained with seed + r)."""

    replica: int
    member: int  # index within the replica's ensemble (0 without one)
    seed: int
    run_id: str


@dataclass(frozen=True)
class RunLinks:
    """An experiment's MLflow runs: its parent run and one run per trained network."""

    experiment_id: str  # the MLflow experiment (mlflow.experiment) holding the runs
    parent_run_id: str | None  # None in a run.json from before parent runs
    runs: tuple[MemberRun, ...]


@dataclass(frozen=True)
class SourceState:
    """The code the report was built from."""

    git_commit: str  # "unknown" outside a git checkout
    git_dirty: str  # "true"/"false": uncommitted changes to tracked files; or "unknown"
    dvc_exp: str | None  # DVC_EXP_NAME: set by `dvc exp run` for its stages' commands
    dvc_baseline: str | None  # DVC_EXP_BASELINE_REV: the commit the experiment starts from


def source_state(git_commit: str, git_dirty: str, environ: Mapping[str, str]) -> SourceState:
    """``deepopt.gitstate.git_state``'s commit and dirty flag, with DVC's experiment variables from
    ``environ`` (pure)."""
    return SourceState(
        git_commit,
        git_dirty,
        environ.get("DVC_EXP_NAME") or None,
        environ.get("DVC_EXP_BASELINE_REV") or None,
    )


def _text(value: object, what: str, source: str) -> str:
    if not isinstance(value, str | int) or isinstance(value, bool) or str(value) == "":
        raise DataError(f"{source}: {what} is not an id; {REPRO}")
    return str(value)


def _whole(value: object, what: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{source}: {what} is not a whole number; {REPRO}")
    return value


def read_run_links(name: str) -> RunLinks | None:
    """run.json of experiment ``name``; None when train wrote none (metrics copied without
    models/, or written before run.json existed): the page then says so."""
    path = paths.run_info_path(name)
    if not path.exists():
        return None
    info = _read_json(path, "train")
    source = str(path)
    runs = info.get("runs")
    if not isinstance(runs, list) or not all(isinstance(run, dict) for run in runs):
        raise DataError(f"{source}: 'runs' must be a list of objects; {REPRO}")
    parent = info.get("parent_run_id")
    return RunLinks(
        experiment_id=_text(info.get("mlflow_experiment_id"), "mlflow_experiment_id", source),
        parent_run_id=None if parent is None else _text(parent, "parent_run_id", source),
        runs=tuple(
            MemberRun(
                replica=_whole(run.get("replica"), "a run's replica", source),
                member=_whole(run.get("index"), "a run's index", source),
                seed=_whole(run.get("seed"), "a run's seed", source),
                run_id=_text(run.get("run_id"), "a run's run_id", source),
            )
            for run in runs
        ),
    )


def mlflow_ui_base(tracking_uri: str | None) -> str:
    """The MLflow UI that shows the runs: a tracking server's own address when
    MLFLOW_TRACKING_URI names one (http/https), else `make ui`'s (``MLFLOW_UI``)."""
    if tracking_uri and urllib.parse.urlsplit(tracking_uri).scheme in ("http", "https"):
        return tracking_uri.rstrip("/")
    return MLFLOW_UI


def experiment_url(base: str, experiment_id: str) -> str:
    """The experiment's page in the MLflow UI at ``base`` (its single-page app's route)."""
    return f"{base}/#/experiments/{urllib.parse.quote(experiment_id, safe='')}"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI at ``base``."""
    return f"{experiment_url(base, experiment_id)}/runs/{urllib.parse.quote(run_id, safe='')}"


def dvc_stages(name: str, experiments: Collection[str]) -> tuple[str, ...]:
    """The dvc.yaml stages that trained and evaluated ``name`` (`dvc repro <stage>` reruns
    one); none for the base run of a params.yaml without experiments."""
    if name == BEST_EXPERIMENT:
        return ("train_best", "evaluate_best")
    if name in experiments:
        return (f"train@{name}", f"evaluate@{name}")
    return ()
