"""The ``evaluate`` stage: test-set metrics, a confusion matrix and the misclassified images.

Reads ``models/<name>/model.pt`` and ``run.json`` (written by train) and the prepared test
split. Each replica (one of ``matrix.seeds`` repetitions) predicts with the average of its
ensemble members' softmax outputs; with ``train.ensemble: 1`` that is the single net.
Writes ``metrics/<name>/eval.json`` (test loss and accuracy, their mean ± sample std over
replicas, per-class precision/recall/F1 of replica 0) and ``plots/<name>/{confusion,
misclassified}.png`` (replica 0), each atomically.

MLflow: with one member per replica the test metrics and figures go into that member's
training run. Ensemble members get their own ``test_acc``/``test_loss``, and each replica's
ensemble gets one extra run named ``<name>``, tagged ``ensemble_members`` (the members' run
ids) and ``ensemble_size``, holding the ensemble's metrics and figures; evaluating again
continues that run instead of adding another.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from pydantic import ValidationError
from torch import nn

from deepopt import paths, tracking
from deepopt.config import ModelConfig, Params
from deepopt.data import image_shape, load_prepared, normalize
from deepopt.errors import DataError, TrackingError
from deepopt.files import check_writable, write_bytes, write_json
from deepopt.metrics import (
    classification_report,
    confusion_matrix,
    ensemble_log_probs,
    loss_and_accuracy,
    mean_and_std,
)
from deepopt.models import build_model
from deepopt.plots import plt
from deepopt.train import BASE_EXPERIMENT, run_config
from deepopt.training import evaluate_logits

__all__ = [
    "MISCLASSIFIED_SHOWN",
    "Member",
    "ReplicaResult",
    "Trained",
    "confusion_figure",
    "eval_summary",
    "evaluate_replicas",
    "load_run_ids",
    "load_trained",
    "main",
    "misclassified_figure",
    "png_bytes",
    "replica_metrics",
    "replica_pngs",
]

MISCLASSIFIED_SHOWN = 36  # a 6 x 6 grid: the first misclassified test images in file order


@dataclass(frozen=True)
class Member:
    seed: int
    replica: int
    index: int
    model: nn.Module


@dataclass(frozen=True)
class Trained:
    """The content of model.pt with each member's network rebuilt."""

    experiment: str
    model_config: ModelConfig
    image_shape: tuple[int, int, int]
    num_classes: int
    members: list[Member]

    def replicas(self) -> dict[int, list[Member]]:
        """Members grouped by replica, each group in ensemble order."""
        groups: dict[int, list[Member]] = {}
        for member in sorted(self.members, key=lambda m: (m.replica, m.index)):
            groups.setdefault(member.replica, []).append(member)
        return groups


@dataclass(frozen=True)
class ReplicaResult:
    replica: int
    seeds: list[int]
    log_probs: torch.Tensor  # [N, classes]: log of the members' mean softmax
    loss: float
    acc: float
    member_acc: list[float]  # each member's own test accuracy, in ensemble order
    member_loss: list[float]


# ---------------------------------------------------------------------------------------
# Loading what train wrote


def _retrain_hint(experiment: str) -> str:
    option = "" if experiment == BASE_EXPERIMENT else f" --experiment {experiment}"
    return f"run `deepopt train{option}` (or `dvc repro`)"


def load_trained(path: Path, experiment: str) -> Trained:
    """model.pt with its networks rebuilt in eval mode (DataError if missing or malformed)."""
    hint = _retrain_hint(experiment)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol note: we say it in one line
            content = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: trained model is missing; {hint}") from None
    except Exception as err:  # torch raises several types for a corrupt archive
        raise DataError(f"{path}: cannot be loaded ({type(err).__name__}); {hint}") from None
    try:
        model_config = ModelConfig.model_validate(content["model_config"])
        channels, height, width = (int(n) for n in content["image_shape"])
        image_shape = (channels, height, width)
        num_classes = int(content["num_classes"])
        members = []
        for entry in content["members"]:
            # load_weights=False: the state dict follows; model.weights (a file, a download)
            # was only where the training started.
            model = build_model(
                model_config, image_shape=image_shape, num_classes=num_classes, load_weights=False
            )
            model.load_state_dict(entry["state_dict"])
            members.append(
                Member(int(entry["seed"]), int(entry["replica"]), int(entry["index"]), model.eval())
            )
    except (KeyError, TypeError, ValueError, RuntimeError, ValidationError) as err:
        problem = " ".join(str(err).split())[:200]
        raise DataError(f"{path}: not a model file of train ({problem}); {hint}") from None
    if not members:
        raise DataError(f"{path}: holds no trained members; {hint}")
    trained = Trained(experiment, model_config, image_shape, num_classes, members)
    sizes = {len(group) for group in trained.replicas().values()}
    if len(sizes) != 1:
        raise DataError(f"{path}: replicas have different ensemble sizes {sorted(sizes)}; {hint}")
    return trained


def load_run_ids(path: Path, trained: Trained) -> tuple[str, dict[tuple[int, int], str]]:
    """run.json's MLflow experiment id and the run id of each (replica, index) member."""
    hint = _retrain_hint(trained.experiment)
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        experiment_id = str(info["mlflow_experiment_id"])
        runs = {(int(r["replica"]), int(r["index"])): str(r["run_id"]) for r in info["runs"]}
    except FileNotFoundError:
        raise DataError(f"{path}: run record of the training is missing; {hint}") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a run record of train ({err}); {hint}") from None
    for member in trained.members:
        if (member.replica, member.index) not in runs:
            raise DataError(
                f"{path}: no run for replica {member.replica} member {member.index} "
                f"(seed {member.seed}) of the model file; {hint}"
            )
    return experiment_id, runs


# ---------------------------------------------------------------------------------------
# The metrics (pure apart from running the networks)


def evaluate_replicas(
    trained: Trained,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    precision: str = "fp32",
) -> list[ReplicaResult]:
    """Each replica's ensemble prediction and loss/accuracy, and each member's own.

    ``images`` [N, C, H, W] normalized; ``precision`` as the training's (bf16 autocast).
    """
    # NHWC activations: oneDNN's fp32 convolutions take ~0.7 s instead of ~1.2 s for the
    # 10,000 test images on one thread, with the same predictions (logits within 4e-6).
    images = images.contiguous(memory_format=torch.channels_last)
    results = []
    for replica, members in trained.replicas().items():
        logits = [  # [N, C] each
            evaluate_logits(
                m.model.to(memory_format=torch.channels_last), images, batch_size, precision
            )
            for m in members
        ]
        own = [loss_and_accuracy(torch.log_softmax(x, dim=1), labels) for x in logits]
        log_probs = ensemble_log_probs(logits)
        loss, acc = loss_and_accuracy(log_probs, labels)
        results.append(
            ReplicaResult(
                replica=replica,
                seeds=[m.seed for m in members],
                log_probs=log_probs,
                loss=loss,
                acc=acc,
                member_acc=[a for _, a in own],
                member_loss=[lo for lo, _ in own],
            )
        )
    return results


def replica_metrics(
    result: ReplicaResult, labels: torch.Tensor, class_names: Sequence[str]
) -> dict[str, float]:
    """One replica's test metrics as flat MLflow metric names (test_loss, test_f1/<class>...)."""
    confusion = confusion_matrix(labels, result.log_probs.argmax(dim=1), len(class_names))
    report = classification_report(confusion, class_names)
    metrics = {"test_loss": result.loss, "test_acc": result.acc}
    metrics.update({f"test_macro_{k}": v for k, v in report["macro"].items()})
    for name, scores in report["per_class"].items():
        for key in ("precision", "recall", "f1"):
            metrics[f"test_{key}/{_metric_name(name)}"] = scores[key]
    return metrics


def _metric_name(text: str) -> str:
    # MLflow allows letters, digits, _ - . / and spaces in metric names.
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", text)


def eval_summary(
    experiment: str,
    results: Sequence[ReplicaResult],
    labels: torch.Tensor,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """The content of eval.json: means over replicas (± sample std when several), each
    replica's values, and replica 0's per-class scores and macro averages."""
    losses = [r.loss for r in results]
    accuracies = [r.acc for r in results]
    first = results[0]
    ensemble_size = len(first.seeds)
    confusion = confusion_matrix(labels, first.log_probs.argmax(dim=1), len(class_names))
    report = classification_report(confusion, class_names)
    runs = []
    for r in results:
        run: dict[str, Any] = {
            "replica": r.replica,
            "seeds": r.seeds,
            "test_loss": r.loss,
            "test_acc": r.acc,
        }
        if ensemble_size > 1:
            run["member_test_acc"] = r.member_acc
            run["member_test_loss"] = r.member_loss
        runs.append(run)
    summary: dict[str, Any] = {
        "experiment": experiment,
        "test_images": int(labels.shape[0]),
        "ensemble_size": ensemble_size,
        "replicas": len(results),
        "test_loss": mean_and_std(losses)[0],
        "test_acc": mean_and_std(accuracies)[0],
        "test_macro_precision": report["macro"]["precision"],
        "test_macro_recall": report["macro"]["recall"],
        "test_macro_f1": report["macro"]["f1"],
        "per_class": report["per_class"],
        "runs": runs,
    }
    if len(results) > 1:
        summary["test_loss_std"] = mean_and_std(losses)[1]
        summary["test_acc_std"] = mean_and_std(accuracies)[1]
    if ensemble_size > 1:
        members = [a for r in results for a in r.member_acc]
        summary["member_test_acc_mean"], summary["member_test_acc_std"] = mean_and_std(members)
    return summary


# ---------------------------------------------------------------------------------------
# Figures


def confusion_figure(confusion: torch.Tensor, class_names: Sequence[str], title: str) -> Figure:
    """The confusion matrix as a heat map with its counts (rows true, columns predicted)."""
    size = len(class_names)
    fig, axis = plt.subplots(figsize=(1.0 + 0.65 * size, 0.6 + 0.6 * size))
    counts = confusion.numpy()
    image = axis.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    threshold = counts.max() / 2.0  # white text on dark cells
    for row in range(size):
        for col in range(size):
            colour = "white" if counts[row, col] > threshold else "black"
            axis.text(
                col, row, str(counts[row, col]), ha="center", va="center", color=colour, fontsize=8
            )
    axis.set_xticks(range(size), list(class_names), rotation=45, ha="right")
    axis.set_yticks(range(size), list(class_names))
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    axis.set_title(title)
    fig.tight_layout()
    return fig


def misclassified_figure(
    images: torch.Tensor,
    labels: torch.Tensor,
    log_probs: torch.Tensor,
    class_names: Sequence[str],
    title: str,
    shown: int = MISCLASSIFIED_SHOWN,
    columns: int = 6,
) -> Figure:
    """The first ``shown`` misclassified uint8 images [N, H, W] (or colour [N, 3, H, W]) in
    file order, each under its true label, the predicted one and the predicted probability.

    One mosaic image in one axes, not an axes per image: 36 axes took ~1 s to draw.
    """
    predictions = log_probs.argmax(dim=1)
    wrong = (predictions != labels).nonzero().flatten()
    picked = wrong[:shown].tolist()
    rows = max(1, -(-len(picked) // columns))
    colour = images.dim() == 4
    height, width = images.shape[-2:]
    label_band, gap = 12, 14  # pixels above each image for its two lines, between columns
    cell_h, cell_w = height + label_band, width + gap
    # Grayscale: 0 = white under gray_r, as the datasets' ink on paper; colour: RGB on white.
    canvas = torch.zeros(rows * cell_h, columns * cell_w, *((3,) if colour else ()))
    canvas = canvas.to(torch.uint8).fill_(255 if colour else 0)
    for slot, index in enumerate(picked):
        top, left = (slot // columns) * cell_h + label_band, (slot % columns) * cell_w + gap // 2
        image = images[index].permute(1, 2, 0) if colour else images[index]  # [H, W(, 3)]
        canvas[top : top + height, left : left + width] = image
    inch = 1.0 / 28  # per mosaic pixel: a 28 x 28 image is one inch wide
    title_in = 0.4
    fig = plt.figure(figsize=(columns * cell_w * inch, rows * cell_h * inch + title_in))
    axis = fig.add_axes((0.0, 0.0, 1.0, 1.0 - title_in / fig.get_figheight()))
    if colour:
        axis.imshow(canvas.numpy(), interpolation="nearest")
    else:
        axis.imshow(canvas.numpy(), cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
    axis.axis("off")
    for slot, index in enumerate(picked):
        predicted = int(predictions[index])
        probability = float(log_probs[index, predicted].exp())
        axis.text(
            (slot % columns) * cell_w + cell_w / 2 - 0.5,
            (slot // columns) * cell_h + label_band - 1,
            f"true: {class_names[int(labels[index])]}\n"
            f"pred: {class_names[predicted]} ({probability:.2f})",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    if not picked:
        axis.text(columns * cell_w / 2, cell_h / 2, "no misclassified test images", ha="center")
    fig.suptitle(
        f"{title}: first {len(picked)} of {len(wrong)} misclassified test images", fontsize=10
    )
    return fig


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG, then closed. No Software metadata: same inputs, same bytes."""
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    finally:
        plt.close(figure)
    return buffer.getvalue()


def replica_pngs(
    result: ReplicaResult,
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    experiment: str,
) -> dict[str, bytes]:
    """confusion.png and misclassified.png of one replica's prediction."""
    name = experiment if result.replica == 0 else f"{experiment} (replica {result.replica})"
    confusion = confusion_matrix(labels, result.log_probs.argmax(dim=1), len(class_names))
    return {
        "confusion.png": png_bytes(
            confusion_figure(confusion, class_names, f"{name}: test accuracy {result.acc:.4f}")
        ),
        "misclassified.png": png_bytes(
            misclassified_figure(images, labels, result.log_probs, class_names, name)
        ),
    }


# ---------------------------------------------------------------------------------------
# MLflow


def _check_runs_exist(run_ids: Mapping[tuple[int, int], str], run_file: Path) -> None:
    for run_id in run_ids.values():
        if not tracking.run_exists(run_id):
            raise TrackingError(
                f"MLflow run {run_id} named in {run_file} is not in the tracking store; "
                "use the store the training logged to (MLFLOW_TRACKING_URI) or train again"
            )


def _log_to_mlflow(
    *,
    trained: Trained,
    experiment_id: str,
    run_ids: Mapping[tuple[int, int], str],
    metrics: Mapping[int, dict[str, float]],
    pngs: Mapping[int, dict[str, bytes]],
    results: Sequence[ReplicaResult],
    tags: Mapping[str, str],
) -> list[str]:
    """Log each replica's test metrics and figures; the run ids that received them.

    A finished training run takes the metrics without being restarted, so its status and
    its end time stay those of the training.
    """
    logged = []
    for result in results:
        members = [run_ids[(result.replica, k)] for k in range(len(result.seeds))]
        if len(members) == 1:
            target = members[0]
            _log_replica(target, metrics[result.replica], pngs[result.replica])
        else:
            for run_id, acc, loss in zip(
                members, result.member_acc, result.member_loss, strict=True
            ):
                tracking.log_metrics(run_id, {"test_acc": acc, "test_loss": loss})
            target = _ensemble_run(trained.experiment, experiment_id, members, result, tags)
            with tracking.ending_run(target):
                # Only what the member runs fix: evaluating again after an unrelated
                # params.yaml edit must not meet a "changed param" in this run.
                tracking.log_params(
                    target,
                    {
                        "model": trained.model_config.model_dump(mode="json"),
                        "ensemble_size": len(members),
                        "seeds": ",".join(str(s) for s in result.seeds),
                    },
                )
                _log_replica(target, metrics[result.replica], pngs[result.replica])
        logged.append(target)
    return logged


def _log_replica(run_id: str, metrics: Mapping[str, float], pngs: Mapping[str, bytes]) -> None:
    tracking.log_metrics(run_id, metrics)
    with tempfile.TemporaryDirectory(prefix="deepopt-eval-") as folder:
        for artifact_file, blob in pngs.items():
            path = Path(folder) / artifact_file
            path.write_bytes(blob)
            tracking.log_artifact(run_id, path)


def _ensemble_run(
    experiment: str,
    experiment_id: str,
    members: list[str],
    result: ReplicaResult,
    tags: Mapping[str, str],
) -> str:
    """The ensemble's own run: the earlier one of the same members if any, else a new one."""
    ensemble_tags = {"ensemble_members": ",".join(members), "ensemble_size": str(len(members))}
    earlier = tracking.find_runs(experiment_id, tags=ensemble_tags)
    run_id = tracking.start_run(
        experiment_id,
        experiment,
        run_id=earlier[0] if earlier else None,
        tags={
            **tags,
            **ensemble_tags,
            "replica": str(result.replica),
            "seeds": ",".join(str(s) for s in result.seeds),
        },
    )
    return run_id


# ---------------------------------------------------------------------------------------
# The stage


def main(
    params: Params,
    experiment: str | None = None,
    overrides: Path | None = None,
    **_: object,
) -> dict[str, Any]:
    name = experiment or BASE_EXPERIMENT
    config = run_config(params, experiment, overrides)  # the config train used
    plots = paths.plots_dir(name)
    check_writable(
        paths.eval_metrics_path(name), plots / "confusion.png", plots / "misclassified.png"
    )
    trained = load_trained(paths.model_path(name), name)
    experiment_id, run_ids = load_run_ids(paths.run_info_path(name), trained)
    data = load_prepared(config.data, config.seed)
    _check_shapes(trained, data.num_classes, image_shape(data.test.images))
    tracking.configure()
    _check_runs_exist(run_ids, paths.run_info_path(name))

    torch.set_num_threads(config.train.threads or os.cpu_count() or 1)
    tic = time.perf_counter()
    images = normalize(data.test.images, data.mean, data.std)  # [N, 1, 28, 28]
    results = evaluate_replicas(
        trained, images, data.test.labels, config.train.eval_batch_size, config.train.precision
    )
    eval_seconds = time.perf_counter() - tic

    labels, names = data.test.labels, data.class_names
    summary = eval_summary(name, results, labels, names)
    pngs = {r.replica: replica_pngs(r, data.test.images, labels, names, name) for r in results}
    write_json(paths.eval_metrics_path(name), summary)
    for artifact_file, blob in pngs[results[0].replica].items():
        write_bytes(paths.plots_dir(name) / artifact_file, blob)
    tags = {**tracking.run_tags(dataset=config.data.name, meta=data.meta), "experiment": name}
    logged = _log_to_mlflow(
        trained=trained,
        experiment_id=experiment_id,
        run_ids=run_ids,
        metrics={r.replica: replica_metrics(r, labels, names) for r in results},
        pngs=pngs,
        results=results,
        tags=tags,
    )
    std = {"test_acc_std": summary["test_acc_std"]} if "test_acc_std" in summary else {}
    return {
        "experiment": name,
        "test_acc": summary["test_acc"],
        "test_loss": summary["test_loss"],
        **std,
        "eval_seconds": eval_seconds,
        "mlflow_runs": logged,
        "outputs": [str(paths.eval_metrics_path(name)), str(paths.plots_dir(name))],
    }


def _check_shapes(trained: Trained, num_classes: int, test_shape: tuple[int, ...]) -> None:
    if trained.num_classes != num_classes or trained.image_shape != test_shape:
        raise DataError(
            f"{paths.model_path(trained.experiment)}: trained for {trained.num_classes} classes "
            f"of {_size(trained.image_shape)} images, but the prepared test data has "
            f"{num_classes} classes of {_size(test_shape)} images; "
            f"{_retrain_hint(trained.experiment)}"
        )


def _size(shape: Sequence[int]) -> str:
    return "x".join(str(n) for n in shape)
