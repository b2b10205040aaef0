"""The ``figures`` stage: the lecture's figures (deepopt.illustrations) into figures/, each
also logged to one MLflow run (tag deepopt.role=figures) with the quadratic's measured
convergence rates; deterministic: the same code and runs.csv files give the same bytes."""

from __future__ import annotations

from typing import Any

from deepopt import paths, tracking
from deepopt.config import Params
from deepopt.figures import png_bytes
from deepopt.files import check_writable, write_bytes
from deepopt.illustrations import LECTURE_FIGURES, MEASURED_EXPERIMENTS
from deepopt.illustrations.catalogue import drawn_figures, measured_curves, measured_figures
from deepopt.illustrations.path_figures import quadratic_rates

__all__ = ["main"]


def main(params: Params, **_: object) -> dict[str, Any]:
    folder = paths.FIGURES_DIR
    check_writable(*(folder / file for file, _caption in LECTURE_FIGURES.values()))
    tracking.configure()  # an unusable store fails before any work
    curves = measured_curves(MEASURED_EXPERIMENTS)
    builders = {**drawn_figures(), **measured_figures(curves)}
    pngs = {key: png_bytes(build) for key, build in builders.items()}  # all, then write
    for key in LECTURE_FIGURES.keys() - pngs.keys():
        (folder / LECTURE_FIGURES[key][0]).unlink(missing_ok=True)  # no stale measured one
    files = {key: folder / LECTURE_FIGURES[key][0] for key in LECTURE_FIGURES if key in pngs}
    for key, target in files.items():
        write_bytes(target, pngs[key])
    rates = quadratic_rates()
    metrics = {
        f"rate/{label.replace(' ', '_')}/{kind}": value[kind]
        for label, value in rates.items()
        for kind in ("measured", "theory")
    }
    run_id = tracking.log_figures_run(
        params.mlflow.experiment, list(files.values()), metrics=metrics, tags=tracking.run_tags()
    )
    return {
        "stage": "figures",
        "figures": [str(path) for path in files.values()],
        "measured_from": sorted(curves),
        "rates": rates,
        "mlflow_run": run_id,
    }
