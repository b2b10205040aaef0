"""The report's per-replica reading (runs.csv, train.json's runs) and its curves: the mean
over replicas with a band, and one legend entry per distinct learning-rate curve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from matplotlib.collections import PolyCollection

from deepopt import reporting
from deepopt.errors import DataError

HEADER = "replica,member,seed,epoch,loss,acc,val_loss,val_acc,lr,seconds"


def _runs_csv(lengths: dict[tuple[int, int], int]) -> str:
    """runs.csv with one network per (replica, member), each ``lengths`` epochs long."""
    lines = [HEADER]
    for (replica, member), epochs in lengths.items():
        seed = 4487 + replica + 100 * member
        for epoch in range(epochs):
            val_loss = 1.0 / (epoch + 1) + 0.1 * replica + 0.01 * member
            lines.append(f"{replica},{member},{seed},{epoch},0.5,0.8,{val_loss},0.8,0.02,1.0")
    return "\n".join(lines) + "\n"


def _history(lr: list[float]) -> reporting.History:
    rows = "".join(f"{epoch},{1.0 / (epoch + 1)},{rate}\n" for epoch, rate in enumerate(lr))
    return reporting.parse_history("epoch,val_loss,lr\n" + rows, "history.csv")


def test_runs_csv_gives_one_history_per_network_in_file_order() -> None:
    runs = reporting.parse_runs(_runs_csv({(0, 0): 3, (0, 1): 2, (1, 0): 4}), "runs.csv")
    assert [(r.replica, r.member, r.seed) for r in runs] == [
        (0, 0, 4487),
        (0, 1, 4587),
        (1, 0, 4488),
    ]
    assert [len(r.history.values["epoch"]) for r in runs] == [3, 2, 4]
    assert "replica" not in runs[0].history.columns  # only the history's own columns
    assert runs[2].history.values["val_loss"][0] == pytest.approx(1.1)


def test_runs_csv_without_its_run_columns_is_a_data_error() -> None:
    with pytest.raises(DataError, match=r"runs\.csv: missing column\(s\) replica, member, seed"):
        reporting.parse_runs("epoch,val_loss,lr\n0,1.0,0.1\n", "plots/x/runs.csv")


def _write(
    name: str, train: dict[str, Any], evaluation: dict[str, Any], runs_csv: str | None
) -> None:
    metrics, plots = Path("metrics", name), Path("plots", name)
    metrics.mkdir(parents=True)
    plots.mkdir(parents=True)
    (metrics / "train.json").write_text(json.dumps(train), encoding="utf-8")
    (metrics / "eval.json").write_text(json.dumps(evaluation), encoding="utf-8")
    first = _runs_csv({(0, 0): train["epochs_run"]}).splitlines()
    history = [",".join(line.split(",")[3:]) for line in first]
    (plots / "history.csv").write_text("\n".join(history) + "\n", encoding="utf-8")
    if runs_csv is not None:
        (plots / "runs.csv").write_text(runs_csv, encoding="utf-8")


def _run(replica: int, member: int, epochs: int, **extra: Any) -> dict[str, Any]:
    return {
        "seed": 4487 + replica + 100 * member,
        "replica": replica,
        "member": member,
        "epochs_run": epochs,
        "stop_reason": "early_stop",
        "best_val_acc": 0.8,
        "train_seconds": 1.0,
        **extra,
    }


def test_curves_are_member_0_of_each_replica(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    runs = [_run(0, 0, 3), _run(0, 1, 2), _run(1, 0, 4), _run(1, 1, 3)]
    evaluation = {
        "test_acc": 0.8,
        "ensemble_size": 2,
        "runs": [{"replica": r, "test_acc": 0.8} for r in (0, 1)],
    }
    lengths = {(0, 0): 3, (0, 1): 2, (1, 0): 4, (1, 1): 3}
    _write("ens", {**runs[0], "runs": runs}, evaluation, _runs_csv(lengths))
    result = reporting.load_experiment("ens")
    curves = reporting.replica_curves(result)
    assert [len(h.values["epoch"]) for h in curves] == [3, 4]
    assert curves[1].values["val_loss"][0] == pytest.approx(1.1)  # replica 1, member 0


def test_without_runs_csv_history_csv_is_replica_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _write("old", _run(0, 0, 3), {"test_acc": 0.8}, None)  # a single-run file without "runs"
    result = reporting.load_experiment("old")
    assert [len(h.values["epoch"]) for h in reporting.replica_curves(result)] == [3]
    assert reporting.replica_test_acc(result) == {0: 0.8}


def test_runs_csv_disagreeing_with_train_json_is_a_data_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    runs = [_run(0, 0, 3), _run(1, 0, 4)]
    evaluation = {"test_acc": 0.8, "runs": [{"replica": r, "test_acc": 0.8} for r in (0, 1)]}
    _write("cut", {**runs[0], "runs": runs}, evaluation, _runs_csv({(0, 0): 3, (1, 0): 2}))
    with pytest.raises(
        DataError, match=r"runs\.csv: replica 1 member 0 holds 2 epochs but .* ran 4"
    ):
        reporting.load_experiment("cut")


def test_replica_values_are_the_members_mean_keyed_by_replica() -> None:
    runs = [_run(0, 0, 3, final_loss=0.4), _run(0, 1, 3, final_loss=0.6), _run(1, 0, 3)]
    means = reporting.replica_means(runs, lambda run: run.get("final_loss", float("nan")))
    assert means == {0: pytest.approx(0.5)}  # replica 1 has no final_loss: left out


def test_val_loss_curve_is_the_mean_with_a_min_max_band() -> None:
    short, long = _history([0.02] * 2), _history([0.02] * 4)
    figure = reporting.val_loss_figure({"a": [short, long], "b": [long]})
    axis = figure.axes[0]
    assert [text.get_text() for text in axis.get_legend().get_texts()] == ["a", "b"]
    bands = [c for c in axis.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1  # only "a" has several replicas
    mean_a = axis.lines[0].get_ydata()
    assert list(mean_a) == pytest.approx([1.0, 0.5, 1 / 3, 0.25])  # both agree; then long alone


def test_lr_legend_has_one_entry_per_distinct_curve() -> None:
    # issue 18, point 6: a constant-rate run that stopped early is not drawn as a plateau
    histories = {
        "constant_short": _history([0.02] * 3),
        "plateau": _history([0.02] * 4 + [0.002] * 3),
        "constant_long": _history([0.02] * 6),
        "decay": _history([0.02 / (1 + k) for k in range(5)]),
    }
    assert reporting.group_identical(histories, "lr") == [
        ["constant_short", "constant_long"],
        ["plateau"],
        ["decay"],
    ]
    axis = reporting.lr_figure(histories).axes[0]
    labels = [text.get_text() for text in axis.get_legend().get_texts()]
    assert labels == ["constant_short, constant_long", "plateau", "decay"]
    assert [len(line.get_ydata()) for line in axis.lines] == [6, 7, 5]
