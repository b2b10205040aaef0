"""reports/index.html as text: the report as one self-contained page (pure).

The same objects as reports/lecture.md (``render_markdown``), formatted by the same helpers
(``markdown``'s cells, ``Interval.format``, ``stats.format_p``), so the two never disagree
on a number; beside them the page embeds every figure as a data: URI (the report's curves
and the lecture figures of figures/) and links each experiment's MLflow runs. Inline CSS,
no script, no external resource: it opens from disk, offline. Every text from the data is
HTML-escaped; markdown's `code` spans in the shared notes become <code>.
"""

from __future__ import annotations

import html
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from deepopt.paths import COMPARE_REPORT_HTML, REPORT_DIR, REPORT_PLOTS, transfer_report_path
from deepopt.reporting.claims import MEASURES, ClaimRow
from deepopt.reporting.figures import BAND
from deepopt.reporting.lecture import LECTURE_DATASET
from deepopt.reporting.links import RunLinks, SourceState, dvc_stages, experiment_url, run_url
from deepopt.reporting.lr_find import (
    LearningRates,
    learning_rate_note,
    learning_rate_rows,
    lr_find_lines,
)
from deepopt.reporting.markdown import (
    MISSING,
    RESULTS_HEADER,
    RESULTS_NUMERIC,
    _claim_text,
    _data_line,
    _difference,
    _experiments,
    _reading_notes,
    _value,
    difference_notes,
    results_cells,
)
from deepopt.reporting.page import (
    Image,
    bullets,
    code,
    document,
    figure,
    link,
    num,
    paragraph,
    table,
    td,
    text,
)
from deepopt.reporting.results import DeepRow, Summary
from deepopt.stats import format_p

__all__ = ["render_html"]

# Captions of the report's own figures (REPORT_PLOTS keys), as lecture.md introduces them.
_PLOT_CAPTIONS = {
    "val_loss": "Validation loss of every experiment.",
    "lr": "Learning rate at the start of each epoch (the schedules side by side).",
    "zero_fraction": "Fraction of exactly-zero ReLU outputs of each layer in the first and "
    "the last epoch (the lecture's sparsity).",
    "grad_norms": "Mean gradient norm of each layer's weights in the first and the last "
    "epoch (the vanishing-gradient study).",
    "deep_grad_norms": "Mean gradient norm of each layer's weights, first and last epoch: "
    "plain vs residual.",
}

_DEEP = "deep_grad_norms"  # the plain-vs-residual figure, shown beside its table

# The claims table's verdicts that colour their cell.
_VERDICT_CLASSES = {"supported": "supported", "contradicted": "contradicted"}


# ------------------------------------------------------------------------ sections


def _results(summaries: Sequence[Summary], dataset: str) -> list[str]:
    lecture = "lecture" if dataset == LECTURE_DATASET else "lecture (MNIST)"
    header = [*RESULTS_HEADER, lecture]
    rows = []
    for s in summaries:
        name, *rest = results_cells(s)
        cells = [
            num(c) if numeric else td(html.escape(c))
            for c, numeric in zip(rest, RESULTS_NUMERIC[1:], strict=True)
        ]
        rows.append([td(code(name)), *cells])
    lines = [
        "<h2>Results</h2>",
        paragraph(
            "Test accuracy from `metrics/<experiment>/eval.json`; the other columns from "
            "`metrics/<experiment>/train.json`; the last column is the lecture's test "
            f"accuracy for the same setting ({MISSING}: the lecture gives none)."
        ),
        table(header, rows),
        paragraph(" ".join(_reading_notes(summaries))),
    ]
    notes = difference_notes(dataset, summaries)
    if notes:
        lines += ["<p>Differences from the lecture:</p>", bullets(notes)]
    return lines


def _claims(rows: Sequence[ClaimRow]) -> list[str]:
    header = [
        "claim",
        "experiments",
        "measure",
        "paired difference (95 % CI)",
        "p (paired t)",
        "p Holm",
        "verdict",
        "lecture",
    ]
    cells = []
    for row in rows:
        p_value = math.nan if row.result is None else row.result.p_value
        cells.append(
            [
                td(html.escape(_claim_text(row))),
                td(text(_experiments(row))),
                td(html.escape(MEASURES[row.claim.measure].label)),
                num(_difference(row)),
                num(format_p(p_value)),
                num(format_p(row.p_holm)),
                td(html.escape(row.verdict), _VERDICT_CLASSES.get(row.verdict, "")),
                td(html.escape(row.claim.lecture)),
            ]
        )
    lines = [
        "<h2>The lecture's claims</h2>",
        paragraph(
            "One row per claim, tested replica by replica (paired t, or one-sample against "
            "the stated reference), Holm-adjusted across the table; lecture.md states the "
            "rules of the verdicts in full."
        ),
        table(header, cells),
    ]
    wilcoxon = [
        f"{_experiments(row)} {format_p(row.wilcoxon)}"
        for row in rows
        if not math.isnan(row.wilcoxon)
    ]
    if wilcoxon:
        lines.append(
            paragraph(
                "Wilcoxon signed-rank p of the same pairs and side (unadjusted): "
                + ", ".join(wilcoxon)
                + "."
            )
        )
    notes = [f"{_experiments(row)}: {row.note}." for row in rows if row.note]
    if notes:
        lines += ["<p>Notes:</p>", bullets(notes)]
    return lines


def _plot(key: str, png: bytes) -> str:
    source = REPORT_DIR / REPORT_PLOTS[key]
    return figure(Image(_PLOT_CAPTIONS.get(key, source.name), str(source), png))


def _plots(figures: Mapping[str, bytes]) -> list[str]:
    lines = [
        "<h2>Curves</h2>",
        paragraph(
            "The line is the mean over an experiment's replicas (member 0 of each, for an "
            f"ensemble), the band the {BAND}; the learning rate is replica 0's. Epochs count "
            "from 1."
        ),
    ]
    # every figure the report drew, in REPORT_PLOTS order; the resnets' in their section
    lines += [_plot(key, figures[key]) for key in REPORT_PLOTS if key in figures and key != _DEEP]
    if "grad_norms" not in figures:
        lines.append(
            paragraph(
                "No experiment recorded per-layer gradient norms (train.diagnostics), so "
                "there is no gradient-norm plot."
            )
        )
    return lines


def _deep(rows: Sequence[DeepRow], png: bytes | None) -> list[str]:
    header = [
        "experiment",
        "depth",
        "skip",
        "BN",
        "epochs",
        "final train loss",
        "final train acc",
        "test acc",
        "gradient first / last",
    ]
    cells = [
        [
            td(code(row.name)),
            num(str(row.depth)),
            td("yes" if row.skip else "no"),
            td("yes" if row.batchnorm else "no"),
            num(str(row.epochs)),
            num(_value(row.final_loss, 4)),
            num(_value(row.final_acc, 4)),
            num(_value(row.test_acc, 4)),
            num(_value(row.grad_ratio, 3)),
        ]
        for row in rows
    ]
    lines = [
        "<h2>Going deeper: plain vs residual</h2>",
        paragraph(
            "The same layers with and without the skip connections (`model.skip`); "
            "gradient ratio: the first layer's mean gradient norm over the logits' in the "
            "last epoch."
        ),
        table(header, cells),
    ]
    if png is not None:
        lines.append(_plot(_DEEP, png))
    return lines


def _run_cell(links: RunLinks, ui_base: str) -> str:
    """Each trained network's run, linked; the id is the text, so it reads offline too."""
    items = []
    for run in links.runs:
        who = f"replica {run.replica}" + (f" member {run.member}" if run.member else "")
        url = run_url(ui_base, links.experiment_id, run.run_id)
        items.append(f"{html.escape(who)}, seed {run.seed}: {link(url, code(run.run_id))}")
    return "<br>".join(items)


def _runs(
    names: Sequence[str],
    runs: Mapping[str, RunLinks | None],
    experiments: Collection[str],
    source: SourceState,
    ui_base: str,
) -> list[str]:
    rows = []
    for name in names:
        links = runs.get(name)
        stages = ", ".join(code(stage) for stage in dvc_stages(name, experiments)) or MISSING
        if links is None:
            missing = f'<span class="missing">no {code(f"models/{name}/run.json")}</span>'
            rows.append([td(code(name)), td(stages), td(missing), td(MISSING), td(MISSING)])
            continue
        parent = MISSING
        if links.parent_run_id is not None:
            url = run_url(ui_base, links.experiment_id, links.parent_run_id)
            parent = link(url, code(links.parent_run_id))
        experiment = link(experiment_url(ui_base, links.experiment_id), code(links.experiment_id))
        rows.append(
            [
                td(code(name)),
                td(stages),
                td(experiment),
                td(parent),
                td(_run_cell(links, ui_base)),
            ]
        )
    header = ["experiment", "DVC stages", "MLflow experiment", "parent run", "runs"]
    return [
        "<h2>Runs</h2>",
        f"<p>{_source_line(source)}</p>",
        "<p>MLflow run pages at "
        f"{link(ui_base, code(ui_base))} (<code>make ui</code> serves mlruns/ there); "
        "each link's text is the run id, for <code>mlflow runs describe --run-id</code>.</p>",
        table(header, rows),
    ]


def _source_line(source: SourceState) -> str:
    dirty = {"true": "with uncommitted changes", "false": "clean"}.get(source.git_dirty, "")
    commit = code(source.git_commit) + (f" ({dirty})" if dirty else "")
    if source.dvc_exp is None:
        return (
            f"Last built in the workspace at git commit {commit} (not inside "
            "<code>dvc exp run</code>; DVC rebuilds the page when the report's inputs change, "
            "not on every commit)."
        )
    baseline = "" if source.dvc_baseline is None else f" from baseline {code(source.dvc_baseline)}"
    return (
        f"Last built by DVC experiment {code(source.dvc_exp)}{baseline}, git commit {commit}: "
        f"<code>dvc exp show</code> lists it, <code>dvc exp apply {html.escape(source.dvc_exp)}"
        "</code> restores it."
    )


def _learning_rates(rates: LearningRates | None, plot: Image | None) -> list[str]:
    """lecture.md's range-test section: the suggestion beside the rates trained with."""
    if rates is None:
        return ["<h2>Learning rate: range test</h2>", paragraph(lr_find_lines(None)[2])]
    rows = [[td(text(what)), num(value)] for what, value in learning_rate_rows(rates)]
    lines = [
        "<h2>Learning rate: range test</h2>",
        paragraph(learning_rate_note(rates)),
        table(["learning rate", "value"], rows),
    ]
    return [*lines, figure(plot)] if plot is not None else lines


# ------------------------------------------------------------------------ the page


def _other_reports() -> list[str]:
    """Links to the reports of the other two pipelines, relative to reports/ (written by
    their own `dvc repro`, not this stage: a link, not their content, so this page depends
    on nothing of theirs)."""
    rows = [
        (COMPARE_REPORT_HTML, "Which optimizer is best?", "compare/dvc.yaml"),
        (transfer_report_path(), "Transfer learning", "transfer/dvc.yaml"),
    ]
    items = [
        f"<li>{link(f'../{path.as_posix()}', text(title))}: {code(path.as_posix())}, "
        f"written by {code(f'dvc repro {pipeline}')} (or {code('make repro-full')})</li>"
        for path, title, pipeline in rows
    ]
    return ["<h2>The other pipelines</h2>", "<ul>", *items, "</ul>"]


def render_html(
    *,
    summaries: Sequence[Summary],
    dataset: str,
    meta: Mapping[str, Any],
    figures: Mapping[str, bytes],
    deep: Sequence[DeepRow] = (),
    claims: Sequence[ClaimRow] = (),
    lecture_figures: Sequence[Image] = (),
    runs: Mapping[str, RunLinks | None],
    experiments: Collection[str],
    source: SourceState,
    ui_base: str,
    learning_rates: LearningRates | None = None,
    lr_plot: Image | None = None,
) -> str:
    """The whole of reports/index.html (pure: same inputs, same text).

    ``figures`` holds the report's PNG bytes by REPORT_PLOTS key, ``lecture_figures`` the
    lecture's (``page.read_images``), ``runs`` each experiment's run.json
    (``links.read_run_links``), ``experiments`` params.yaml's names (for the DVC stages),
    ``ui_base`` the MLflow UI the run links point at (``links.mlflow_ui_base``), and
    ``learning_rates`` with ``lr_plot`` the range test's section (None: not run)."""
    body = [
        "<h1>Lecture 10a experiments</h1>",
        paragraph(_data_line(dataset, meta)),
        *_results(summaries, dataset),
    ]
    if claims:
        body += _claims(claims)
    body += _plots(figures)
    if lecture_figures:
        body += ["<h2>Figures of the lecture</h2>", *(figure(i) for i in lecture_figures)]
    if deep:
        body += _deep(deep, figures.get(_DEEP))
    body += _learning_rates(learning_rates, lr_plot)
    body += _runs([s.name for s in summaries], runs, experiments, source, ui_base)
    body += _other_reports()
    return document("Lecture 10a experiments", body)
