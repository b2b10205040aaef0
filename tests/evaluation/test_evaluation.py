"""`deepopt evaluate`: hand-computed metrics, the ensemble average, and the stage end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.image
import pytest
import scipy.stats
import torch
import yaml
from mlflow import MlflowClient

from deepopt import cli
from deepopt.config import ModelConfig
from deepopt.evaluation import Trained, TrainedMember, evaluate_replicas, replica_metrics
from deepopt.evaluation.figures import confusion_figure, misclassified_figure
from deepopt.figures import png_bytes
from deepopt.metrics import (
    class_scores,
    classification_report,
    confusion_matrix,
    ensemble_log_probs,
    loss_and_accuracy,
    mean_and_std,
)
from deepopt.models import build_model
from tiny_data import write_tiny_idx_dataset

# ---------------------------------------------------------------------------------------
# Pure metrics against hand-computed values

# Four classes; class 3 never occurs and is never predicted (zero-division case).
LABELS = torch.tensor([0, 0, 0, 1, 1, 2])
PREDICTIONS = torch.tensor([0, 0, 1, 1, 2, 2])


def test_confusion_matrix_rows_are_true_columns_predicted() -> None:
    expected = torch.tensor([[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(confusion_matrix(LABELS, PREDICTIONS, 4), expected)


def test_precision_recall_f1_match_the_hand_computed_values() -> None:
    scores = class_scores(confusion_matrix(LABELS, PREDICTIONS, 4))
    # precision = diagonal / column sums (2, 2, 2, 0); recall = diagonal / row sums (3, 2, 1, 0)
    assert scores["precision"] == pytest.approx([1.0, 0.5, 0.5, 0.0])
    assert scores["recall"] == pytest.approx([2 / 3, 0.5, 1.0, 0.0])
    # F1 = 2pr / (p + r): 2*(2/3)/(5/3) = 0.8, 0.5, 2*0.5/1.5 = 2/3, and 0 for the absent class
    assert scores["f1"] == pytest.approx([0.8, 0.5, 2 / 3, 0.0])
    assert scores["support"] == [3, 2, 1, 0]


def test_classification_report_keys_by_class_name_with_macro_averages() -> None:
    report = classification_report(confusion_matrix(LABELS, PREDICTIONS, 4), ["a", "b", "c", "d"])
    assert report["per_class"]["b"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    )
    assert report["macro"] == pytest.approx(
        {"precision": 2.0 / 4, "recall": (13 / 6) / 4, "f1": (59 / 30) / 4}
    )


def test_loss_and_accuracy_of_known_probabilities() -> None:
    probabilities = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    loss, accuracy = loss_and_accuracy(probabilities.log(), torch.tensor([0, 1, 1]))
    # -mean(ln 0.5, ln 0.1, ln 0.8); argmax 0, 0, 1 (a tie goes to the first class)
    assert loss == pytest.approx(-(math.log(0.5) + math.log(0.1) + math.log(0.8)) / 3)
    assert accuracy == pytest.approx(2 / 3)


def test_mean_and_sample_std() -> None:
    assert mean_and_std([0.90, 0.92, 0.94]) == pytest.approx((0.92, 0.02))
    assert mean_and_std([0.5]) == (0.5, 0.0)


# ---------------------------------------------------------------------------------------
# The ensemble average


def test_ensemble_log_probs_is_the_log_of_the_mean_softmax() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = [10 * torch.randn(7, 5, generator=generator) for _ in range(3)]
    expected = torch.stack([torch.softmax(x, dim=1) for x in logits]).mean(dim=0)
    assert torch.allclose(ensemble_log_probs(logits).exp(), expected, atol=1e-6)
    # One member: its own log-softmax, so the loss is the usual cross-entropy.
    assert torch.allclose(ensemble_log_probs(logits[:1]), torch.log_softmax(logits[0], dim=1))


def test_replica_prediction_averages_its_members_softmax_tiny_nets() -> None:
    config = ModelConfig(name="mlp", depth=1, width=6, batchnorm=True)
    members = []
    for replica in range(2):
        for index in range(2):
            torch.manual_seed(10 * replica + index)
            model = build_model(config, image_shape=(1, 4, 4), num_classes=3).eval()
            members.append(
                TrainedMember(replica=replica, index=index, seed=replica * 2 + index, model=model)
            )
    trained = Trained("tiny", config, (1, 4, 4), 3, members)
    images = torch.randn(9, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(9) % 3

    results = evaluate_replicas(trained, images, labels, batch_size=4)

    assert [r.seeds for r in results] == [[0, 1], [2, 3]]
    for result, pair in zip(results, (members[:2], members[2:]), strict=True):
        with torch.no_grad():
            softmaxes = [torch.softmax(m.model(images), dim=1) for m in pair]
        mean = torch.stack(softmaxes).mean(dim=0)
        assert torch.allclose(result.log_probs.exp(), mean, atol=1e-6)
        assert result.acc == pytest.approx((mean.argmax(dim=1) == labels).float().mean().item())
        own = [(s.argmax(dim=1) == labels).float().mean().item() for s in softmaxes]
        assert result.member_acc == pytest.approx(own)
        assert replica_metrics(result, labels, ["x", "y/z", "w"])["test_acc"] == result.acc
        assert "test_f1/y/z" in replica_metrics(result, labels, ["x", "y/z", "w"])


# ---------------------------------------------------------------------------------------
# The stage end to end: tiny prepared data, the real train stage, then evaluate

N_TEST = 40


@pytest.fixture()
def trained_repo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base_params: dict[str, Any]
) -> Path:
    """A tmp repository with prepared data and a tiny params.yaml: base has 2 seeds of one
    MLP, experiment `ens` is a 2-member ensemble."""
    monkeypatch.chdir(tmp_path)
    write_tiny_idx_dataset(tmp_path / "data" / "raw" / "fashion-mnist", n_train=200, n_test=N_TEST)
    params = {
        **base_params,
        "data": {**base_params["data"], "train_subset": 100, "val_fraction": 0.2},
        "model": {"name": "mlp", "depth": 1, "width": 8, "batchnorm": True},
        "early_stop": {"enabled": False},
        "train": {"epochs": 1, "batch_size": 20, "threads": 1},
        "mlflow": {"experiment": "eval-test", "log_model": False},
        "matrix": {"seeds": 2},
        "experiments": {"ens": {"train": {"ensemble": 2}}},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    assert cli.main(["prepare"]) == 0
    return tmp_path


def _is_png(path: Path) -> bool:
    # Decodes the whole file: a truncated or non-PNG file raises.
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(path).ndim == 3


@pytest.mark.slow
def test_evaluate_writes_eval_json_pngs_and_logs_into_each_training_run(
    trained_repo: Path, capsys: Any
) -> None:
    assert cli.main(["train"]) == 0
    capsys.readouterr()

    assert cli.main(["evaluate"]) == 0

    printed = json.loads(capsys.readouterr().out)
    evaluation = json.loads((trained_repo / "metrics/base/eval.json").read_text())
    assert evaluation["test_images"] == N_TEST
    assert evaluation["replicas"] == 2 and evaluation["ensemble_size"] == 1
    per_replica = [r["test_acc"] for r in evaluation["runs"]]
    assert evaluation["test_acc"] == pytest.approx(sum(per_replica) / 2)
    assert evaluation["test_acc_std"] == pytest.approx(mean_and_std(per_replica)[1])
    assert printed["test_acc"] == evaluation["test_acc"]
    assert set(evaluation["per_class"]) >= {"T-shirt/top", "Ankle boot"}
    assert sum(c["support"] for c in evaluation["per_class"].values()) == N_TEST
    for name in ("confusion.png", "misclassified.png"):
        assert _is_png(trained_repo / "plots/base" / name)

    run_info = json.loads((trained_repo / "models/base/run.json").read_text())
    client = MlflowClient()
    for entry, replica in zip(run_info["runs"], evaluation["runs"], strict=True):
        run = client.get_run(entry["run_id"])
        assert run.data.metrics["test_acc"] == pytest.approx(replica["test_acc"])
        assert "test_f1/T-shirt_top" not in run.data.metrics  # '/' is allowed, kept as is
        assert "test_f1/T-shirt/top" in run.data.metrics
        assert run.info.status == "FINISHED"
        artifacts = {a.path for a in client.list_artifacts(entry["run_id"])}
        assert {"confusion.png", "misclassified.png"} <= artifacts
    assert sorted(printed["mlflow_runs"]) == sorted(r["run_id"] for r in run_info["runs"])


@pytest.mark.slow
def test_ensemble_gets_its_own_run_naming_its_members_once(trained_repo: Path, capsys: Any) -> None:
    assert cli.main(["train", "--experiment", "ens"]) == 0
    assert cli.main(["evaluate", "--experiment", "ens"]) == 0
    assert cli.main(["evaluate", "--experiment", "ens"]) == 0  # again: same ensemble runs
    capsys.readouterr()

    evaluation = json.loads((trained_repo / "metrics/ens/eval.json").read_text())
    assert evaluation["ensemble_size"] == 2 and evaluation["replicas"] == 2
    run_info = json.loads((trained_repo / "models/ens/run.json").read_text())
    client = MlflowClient()
    experiment_id = run_info["mlflow_experiment_id"]
    ensembles = client.search_runs([experiment_id], "tags.ensemble_size = '2'")
    assert len(ensembles) == 2  # one per replica, not one per evaluate call
    for replica in evaluation["runs"]:
        members = [r for r in run_info["runs"] if r["replica"] == replica["replica"]]
        ids = ",".join(r["run_id"] for r in sorted(members, key=lambda r: r["index"]))
        (run,) = [e for e in ensembles if e.data.tags["ensemble_members"] == ids]
        assert run.info.run_name == f"ens replica {replica['replica']} ensemble"
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == run_info["parent_run_id"]
        assert run.data.metrics["test_acc"] == pytest.approx(replica["test_acc"])
        for member, acc in zip(members, replica["member_test_acc"], strict=True):
            assert client.get_run(member["run_id"]).data.metrics["test_acc"] == pytest.approx(acc)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"confusion.png", "misclassified.png"} <= artifacts
    # Every network's run has its own name; the parent holds the mean and t interval.
    names = [client.get_run(r["run_id"]).info.run_name for r in run_info["runs"]]
    assert len(set(names)) == len(names) == 4
    parent = client.get_run(run_info["parent_run_id"])
    assert parent.info.run_name == "ens" and parent.data.tags["deepopt.role"] == "experiment"
    accuracies = [r["test_acc"] for r in evaluation["runs"]]
    mean = sum(accuracies) / 2
    assert parent.data.metrics["test_acc"] == pytest.approx(mean)
    if accuracies[0] != accuracies[1]:
        low, high = scipy.stats.t.interval(0.95, 1, loc=mean, scale=scipy.stats.sem(accuracies))
        assert parent.data.metrics["test_acc_ci95_low"] == pytest.approx(low)
        assert parent.data.metrics["test_acc_ci95_high"] == pytest.approx(high)
    assert parent.data.metrics["n_seeds"] == 2


def test_evaluate_without_a_trained_model_names_the_train_command(
    trained_repo: Path, capsys: Any
) -> None:
    assert cli.main(["evaluate", "--experiment", "ens"]) == 1
    message = capsys.readouterr().err.strip()
    assert "models/ens/model.pt" in message and "deepopt train --experiment ens" in message
    assert "\n" not in message
    assert not (trained_repo / "metrics/ens/eval.json").exists()


def test_misclassified_png_is_valid_and_byte_identical_when_nothing_is_wrong(
    tmp_path: Path,
) -> None:
    images = torch.zeros(3, 28, 28, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2])
    log_probs = torch.log_softmax(10 * torch.eye(3), dim=1)  # every prediction right
    blobs = [
        png_bytes(lambda: misclassified_figure(images, labels, log_probs, ["a", "b", "c"], "t"))
        for _ in range(2)
    ]
    assert blobs[0] == blobs[1]
    (tmp_path / "m.png").write_bytes(blobs[0])
    assert _is_png(tmp_path / "m.png")


def test_evaluate_pngs_ignore_the_callers_matplotlib_style() -> None:
    confusion = confusion_matrix(LABELS, PREDICTIONS, 4)
    images = torch.arange(6 * 28 * 28).reshape(6, 28, 28).remainder(256).to(torch.uint8)
    log_probs = torch.log_softmax(10 * torch.eye(4)[PREDICTIONS], dim=1)  # 2 of 6 wrong
    builders = [
        lambda: confusion_figure(confusion, ["a", "b", "c", "d"], "t: test accuracy 0.5"),
        lambda: misclassified_figure(images, LABELS, log_probs, ["a", "b", "c", "d"], "t"),
    ]
    pinned = [png_bytes(build) for build in builders]
    style: Any = {"figure.facecolor": "yellow", "font.size": 20.0, "image.cmap": "jet"}
    with matplotlib.rc_context(style):
        assert [png_bytes(build) for build in builders] == pinned


@pytest.mark.slow
def test_a_resnet_started_from_a_weights_file_evaluates_without_that_file(
    trained_repo: Path, base_params: dict[str, Any]
) -> None:
    resnet = {"name": "resnet", "depth": 8, "base_channels": 2, "batchnorm": True}
    start = build_model(ModelConfig(**resnet))
    torch.save(start.state_dict(), trained_repo / "start.pt")
    params = yaml.safe_load((trained_repo / "params.yaml").read_text())
    params["matrix"]["seeds"] = 1
    params["experiments"] = {"deep": {"model": {**resnet, "weights": "start.pt"}}}
    (trained_repo / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    assert cli.main(["train", "--experiment", "deep"]) == 0
    (trained_repo / "start.pt").unlink()  # only where training started: evaluate never reads it
    assert cli.main(["evaluate", "--experiment", "deep"]) == 0
    evaluation = json.loads((trained_repo / "metrics/deep/eval.json").read_text())
    assert evaluation["test_images"] == N_TEST and 0.0 <= evaluation["test_acc"] <= 1.0
