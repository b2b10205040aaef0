"""The transfer table, plot and report.md from finetune's runs (pure: same results, same
text and figure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["MODE_LABELS", "accuracy_figure", "render_report", "transfer_table"]

MODE_LABELS = {
    "linear_probe": "linear probe",
    "finetune": "fine-tune",
    "scratch": "from scratch",
}


def _accuracy(runs: Sequence[Mapping[str, Any]], mode: str, per_class: int) -> float | None:
    for run in runs:
        if run["mode"] == mode and run["per_class"] == per_class:
            return float(run["test_acc"])
    return None


def transfer_table(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown rows: labelled images per class x mode -> test accuracy."""
    modes = list(dict.fromkeys(str(r["mode"]) for r in runs))
    sizes = sorted({int(r["per_class"]) for r in runs})
    header = ["labelled / class", *(MODE_LABELS.get(m, m) for m in modes)]
    lines = ["| " + " | ".join(header) + " |", "|---:|" + "---:|" * len(modes)]
    for size in sizes:
        cells = [str(size)]
        for mode in modes:
            acc = _accuracy(runs, mode, size)
            cells.append("—" if acc is None else f"{acc:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def accuracy_figure(runs: Sequence[Mapping[str, Any]]) -> Figure:
    """Test accuracy against labelled images per class (log axis), one line per mode."""
    from matplotlib.figure import Figure  # lazy: matplotlib is slow to import

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    axis = fig.add_subplot()
    markers = {"linear_probe": "s", "finetune": "o", "scratch": "^"}
    for mode in dict.fromkeys(str(r["mode"]) for r in runs):
        points = sorted(
            (int(r["per_class"]), float(r["test_acc"])) for r in runs if r["mode"] == mode
        )
        axis.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker=markers.get(mode, "x"),
            label=MODE_LABELS.get(mode, mode),
        )
    axis.set_xscale("log")
    sizes = sorted({int(r["per_class"]) for r in runs})
    axis.set_xticks(sizes, [str(s) for s in sizes])
    axis.minorticks_off()
    axis.set_xlabel("labelled training images per class")
    axis.set_ylabel("test accuracy")
    axis.set_title("Transfer: accuracy against labelled data")
    axis.grid(True)
    axis.legend()
    return fig


def render_report(summary: Mapping[str, Any], plot_file: str) -> str:
    """transfer/report.md from finetune's metrics (pure)."""
    source, target = summary["source"], summary["target"]
    runs = summary["runs"]

    def task(part: Mapping[str, Any]) -> str:
        names = ", ".join(part["class_names"])
        return f"{part['dataset']} classes {list(part['classes'])} ({names})"

    lines = [
        "# Transfer learning",
        "",
        f"Source: {task(source)}, {source['train_images']} training images; the pretrained "
        f"network reaches test accuracy {source['test_acc']:.4f} on its own task "
        f"(MLflow run `{source['run_id']}`).",
        f"Target: {task(target)}; test accuracy on all {target['test_images']} test images of "
        "its classes. Network: "
        f"`{summary['model']}`; every fine-tune trains {summary['epochs']} epochs.",
        "",
        *transfer_table(runs),
        "",
        "Modes: linear probe = the pretrained backbone frozen (BatchNorm statistics "
        "included), only a new head learns; fine-tune = all layers learn from the pretrained "
        f"start, the backbone at {summary['backbone_lr_scale']:g} x the head's learning rate; "
        "from scratch = the same network from random weights. The smaller training sets are "
        "subsets of the larger ones; a set with fewer than "
        f"{summary['min_batches']} batches is repeated within an epoch (steps per run below).",
        "",
        f"![test accuracy against labelled images per class]({plot_file})",
        "",
        "| mode | labelled / class | train images | repeats | steps | final val acc | "
        "test acc | train s | MLflow run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in runs:
        lines.append(
            f"| {MODE_LABELS.get(run['mode'], run['mode'])} | {run['per_class']} | "
            f"{run['train_images']} | {run['repeats']} | {run['steps']} | "
            f"{run['final_val_acc']:.4f} | {run['test_acc']:.4f} | {run['train_seconds']:.1f} | "
            f"`{run['run_id']}` |"
        )
    return "\n".join(lines) + "\n"
