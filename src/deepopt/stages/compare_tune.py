"""The ``compare-tune`` stage (compare/dvc.yaml): one Optuna study per compared optimizer,
each run (or resumed, or topped up) to compare.budget finished trials through the tune
stage's code; compare/best/<optimizer>.yaml from each study's best trial of its first
compare.budget, and compare/studies.json with what each study cost and found."""

from __future__ import annotations

from typing import Any

import optuna

from deepopt import paths
from deepopt.compare.studies import monitor_goal, study_label, study_params, study_summary
from deepopt.config import Params
from deepopt.errors import DataError
from deepopt.files import check_writable, write_json
from deepopt.tuning import open_storage, parse_storage_url, tune_study

__all__ = ["main"]


def main(params: Params, **_: object) -> dict[str, Any]:
    compare = params.compare
    url = parse_storage_url(compare.storage, "compare.storage")
    best_files = [paths.compare_best_path(name) for name in compare.optimizers]
    check_writable(paths.COMPARE_STUDIES, *best_files)  # before hours of trials
    studies: dict[str, Any] = {}
    storage = open_storage(url, params.tune, key="compare.storage")  # to read back each study
    for optimizer, best_file in zip(compare.optimizers, best_files, strict=True):
        session = tune_study(
            study_params(params, optimizer),
            url,
            n_trials=compare.budget,
            label=study_label(optimizer),
            best_path=best_file,
            best_within=compare.budget,
        )
        study = optuna.load_study(study_name=session["study"], storage=storage.storage)
        studies[optimizer] = summary = study_summary(study, compare.budget)
        if summary["finished"] < compare.budget:  # e.g. its session was stopped by a signal
            raise DataError(
                f"compare-tune: study {summary['study']} ({optimizer}) holds "
                f"{summary['finished']} finished trials, fewer than compare.budget "
                f"{compare.budget}; run it again to top it up"
            )
    monitor, goal = monitor_goal(params)
    write_json(
        paths.COMPARE_STUDIES,
        {
            "budget": compare.budget,
            "epochs": compare.epochs,
            "storage": storage.shown,
            "monitor": monitor,
            "direction": goal,
            "studies": studies,
        },
    )
    return {
        "stage": "compare-tune",
        "studies": {name: entry["study"] for name, entry in studies.items()},
        "finished": {name: entry["finished"] for name, entry in studies.items()},
        "best_value": {name: entry["best_value"] for name, entry in studies.items()},
    }
