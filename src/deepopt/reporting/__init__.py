"""The report's parts: the lecture's reference numbers, what the pipeline wrote (read
back), reports/lecture.md as text, and the report's figures."""

from deepopt.reporting.figures import (
    grad_norm_figure,
    group_identical,
    lr_figure,
    report_figures,
    val_loss_figure,
)
from deepopt.reporting.lecture import LECTURE, LECTURE_DATASET, LectureFigure
from deepopt.reporting.markdown import MISSING, difference_notes, render_markdown
from deepopt.reporting.results import (
    GRAD_PREFIX,
    DeepRow,
    ExperimentResult,
    History,
    Stat,
    Summary,
    dataset_name,
    deep_rows,
    experiment_names,
    layer_order,
    load_experiment,
    parse_history,
    read_meta,
    summarize,
)

__all__ = [
    "GRAD_PREFIX",
    "LECTURE",
    "LECTURE_DATASET",
    "MISSING",
    "DeepRow",
    "ExperimentResult",
    "History",
    "LectureFigure",
    "Stat",
    "Summary",
    "dataset_name",
    "deep_rows",
    "difference_notes",
    "experiment_names",
    "grad_norm_figure",
    "group_identical",
    "layer_order",
    "load_experiment",
    "lr_figure",
    "parse_history",
    "read_meta",
    "render_markdown",
    "report_figures",
    "summarize",
    "val_loss_figure",
]
