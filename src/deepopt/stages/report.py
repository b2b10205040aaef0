"""The ``report`` stage: reports/lecture.md and its plots from the metrics/plots files the
pipeline wrote (never MLflow), deterministic: same inputs, same bytes (deepopt.reporting)."""

from __future__ import annotations

from typing import Any

from deepopt.config import Params
from deepopt.figures import png_bytes
from deepopt.files import check_writable, write_bytes, write_text
from deepopt.paths import REPORT_DIR, REPORT_FILE, REPORT_PLOTS
from deepopt.reporting import (
    dataset_name,
    deep_rows,
    evaluate_claims,
    experiment_names,
    lecture_claims,
    load_experiment,
    read_meta,
    render_markdown,
    replica_curves,
    report_figures,
    summarize,
)

__all__ = ["main"]


def main(params: Params, **_: object) -> dict[str, Any]:
    check_writable(REPORT_DIR / REPORT_FILE, *(REPORT_DIR / name for name in REPORT_PLOTS.values()))
    names = experiment_names(params)
    results = {name: load_experiment(name) for name in names}
    meta = read_meta()
    dataset = dataset_name(meta)
    summaries = [summarize(result) for result in results.values()]
    deep = deep_rows(params, list(results.values()), summaries)
    claims = evaluate_claims(lecture_claims(results), results)
    curves = {name: replica_curves(result) for name, result in results.items()}
    figures = report_figures(curves, deep={row.name for row in deep})
    for key in REPORT_PLOTS.keys() - figures.keys():
        # no stale plot from an earlier run beside a report that does not link it
        (REPORT_DIR / REPORT_PLOTS[key]).unlink(missing_ok=True)
    plot_files = {key: REPORT_PLOTS[key] for key in figures}
    for key, build in figures.items():
        write_bytes(REPORT_DIR / plot_files[key], png_bytes(build))
    report = REPORT_DIR / REPORT_FILE
    write_text(report, render_markdown(summaries, dataset, meta, plot_files, deep, claims))
    return {
        "stage": "report",
        "report": str(report),
        "plots": [str(REPORT_DIR / name) for name in plot_files.values()],
        "experiments": names,
        "dataset": dataset,
        "claims": {
            row.claim.a + ("" if row.claim.b is None else f"-{row.claim.b}"): row.verdict
            for row in claims
        },
    }
