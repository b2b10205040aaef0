"""The ``compare-report`` stage (compare/dvc.yaml): the studies' budgets checked in the
storage itself, then compare/report.md (default vs tuned, each optimizer against the best,
the performance profile, the verdict), the same as one offline page compare/report.html,
compare/profile.png and compare/metrics.json."""

from __future__ import annotations

from typing import Any

from deepopt import paths
from deepopt.compare.budgets import count_finished
from deepopt.compare.report import (
    check_budgets,
    compare_metrics,
    profile_figure,
    render_report,
)
from deepopt.config import Params, check_storage_url
from deepopt.errors import DataError, one_line
from deepopt.figures import png_bytes
from deepopt.files import check_writable, read_json, write_bytes, write_json, write_text
from deepopt.reporting import page

__all__ = ["main"]


def main(params: Params, **_: object) -> dict[str, Any]:
    compare = params.compare
    outputs = (
        paths.COMPARE_REPORT,
        paths.COMPARE_REPORT_HTML,
        paths.COMPARE_PROFILE_PLOT,
        paths.COMPARE_METRICS,
    )
    check_writable(*outputs)
    hint = "run `dvc repro compare/dvc.yaml`"
    default = read_json(paths.compare_runs_path("default"), hint)
    tuned = read_json(paths.compare_runs_path("tuned"), hint)
    studies = read_json(paths.COMPARE_STUDIES, hint)
    for name, source, key in (
        ("runs/default.json", default, "optimizers"),
        ("runs/tuned.json", tuned, "optimizers"),
        ("studies.json", studies, "studies"),
    ):
        listed = source.get(key)
        if not isinstance(listed, dict):
            raise DataError(f"compare/{name}: no {key!r} object in it; {hint}")
        if set(listed) != set(compare.optimizers):
            raise DataError(
                f"compare/{name} holds {', '.join(sorted(listed))}, but compare.optimizers is "
                f"{', '.join(compare.optimizers)}; {hint}"
            )
        # The JSON files keep their keys sorted; the report follows params.yaml's order.
        source[key] = {optimizer: listed[optimizer] for optimizer in compare.optimizers}
    url = check_storage_url(compare.storage, "compare.storage")
    try:
        names = {name: entry["study"] for name, entry in studies["studies"].items()}
        counted = count_finished(url, names, compare.optimizers)
        check_budgets(studies, counted, compare.budget)  # each study against the budget asked
        if studies["budget"] != compare.budget:  # studies.json of another budget
            raise DataError(
                f"compare/studies.json was written for budget {studies['budget']}, but "
                f"compare.budget is {compare.budget}; {hint}"
            )
        report = render_report(
            default,
            tuned,
            studies,
            counted=counted,
            target_val_acc=compare.target_val_acc,
            profile_file=paths.COMPARE_PROFILE_PLOT.name,
        )
        metrics = compare_metrics(default, tuned, studies)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        # a file edited or damaged by hand
        raise DataError(
            f"compare: runs/*.json or studies.json lack what compare-seeds and compare-tune "
            f"write ({type(err).__name__}: {one_line(err)}); {hint}"
        ) from None
    png = png_bytes(lambda: profile_figure(default, tuned, compare.target_val_acc))
    write_bytes(paths.COMPARE_PROFILE_PLOT, png)
    write_json(paths.COMPARE_METRICS, metrics)
    write_text(paths.COMPARE_REPORT, report)
    profile = page.Image("performance profile", str(paths.COMPARE_PROFILE_PLOT), png)
    body = page.from_markdown(report, {paths.COMPARE_PROFILE_PLOT.name: profile})
    write_text(paths.COMPARE_REPORT_HTML, page.document("Which optimizer is best?", body))
    return {
        "stage": "compare-report",
        "report": str(paths.COMPARE_REPORT),
        "html": str(paths.COMPARE_REPORT_HTML),
        **metrics,
    }
