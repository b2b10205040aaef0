"""The ``report`` stage: reports/lecture.md and its plots from the metrics/plots files the
pipeline wrote (never MLflow), and reports/index.html, the same report as one page with its
figures inline and each run's MLflow link (run.json); deterministic: same inputs, same
bytes (deepopt.reporting)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from deepopt.config import Params
from deepopt.figures import png_bytes
from deepopt.files import check_writable, write_bytes, write_json, write_text
from deepopt.gitstate import git_state
from deepopt.illustrations import LECTURE_FIGURES
from deepopt.paths import (
    FIGURES_DIR,
    REPORT_DIR,
    REPORT_FILE,
    REPORT_HTML,
    REPORT_PLOTS,
    SUMMARY_METRICS,
)
from deepopt.reporting import (
    Image,
    LearningRates,
    dataset_name,
    deep_rows,
    evaluate_claims,
    experiment_names,
    lecture_claims,
    load_experiment,
    lr_find_lines,
    mlflow_ui_base,
    read_images,
    read_learning_rates,
    read_meta,
    read_run_links,
    render_html,
    render_markdown,
    replica_curves,
    report_figures,
    source_state,
    summarize,
    summary_metrics,
)

__all__ = ["main"]


def main(params: Params, **_: object) -> dict[str, Any]:
    outputs = [REPORT_FILE, REPORT_HTML, *REPORT_PLOTS.values()]
    check_writable(*(REPORT_DIR / name for name in outputs), SUMMARY_METRICS)
    names = experiment_names(params)
    results = {name: load_experiment(name) for name in names}
    meta = read_meta()
    learning_rates = read_learning_rates()  # lr_find/base.json, params/best.yaml; None: not run
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
    pngs = {key: png_bytes(build) for key, build in figures.items()}
    page = render_html(
        summaries=summaries,
        dataset=dataset,
        meta=meta,
        figures=pngs,
        deep=deep,
        claims=claims,
        lecture_figures=_lecture_figures(),
        runs={name: read_run_links(name) for name in names},
        experiments=list(params.experiments),
        source=source_state(*git_state(Path.cwd()), os.environ),
        ui_base=mlflow_ui_base(os.environ.get("MLFLOW_TRACKING_URI")),
        learning_rates=learning_rates,
        lr_plot=_lr_plot(learning_rates),
    )
    for key, png in pngs.items():
        write_bytes(REPORT_DIR / plot_files[key], png)
    report = REPORT_DIR / REPORT_FILE
    lr_section = lr_find_lines(learning_rates)
    markdown = render_markdown(summaries, dataset, meta, plot_files, deep, claims, lr_section)
    write_text(report, markdown)
    write_text(REPORT_DIR / REPORT_HTML, page)
    write_json(SUMMARY_METRICS, summary_metrics(summaries))
    return {
        "stage": "report",
        "report": str(report),
        "html": str(REPORT_DIR / REPORT_HTML),
        "summary": str(SUMMARY_METRICS),
        "plots": [str(REPORT_DIR / name) for name in plot_files.values()],
        "experiments": names,
        "dataset": dataset,
        "claims": {
            row.claim.a + ("" if row.claim.b is None else f"-{row.claim.b}"): row.verdict
            for row in claims
        },
    }


def _lecture_figures() -> list[Image]:
    """The lecture's figures the figures stage drew into figures/, for the page."""
    return read_images(LECTURE_FIGURES, FIGURES_DIR)


def _lr_plot(rates: LearningRates | None) -> Image | None:
    """The range test's loss-vs-lr plot (lr_find/<name>.png), for the page."""
    if rates is None:
        return None
    plot = Path(rates.plot)
    caption = "Smoothed training loss against the learning rate (the LR range test)."
    return read_images({"lr_find": (plot.name, caption)}, plot.parent)[0]
