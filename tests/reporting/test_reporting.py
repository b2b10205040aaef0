"""`deepopt report` on tiny hand-written metrics/plots files in tmp_path (no training)."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib
import pytest
import scipy.stats
import yaml

from deepopt import cli, figures, reporting
from deepopt.config import Params, parse_params
from deepopt.errors import DataError
from deepopt.stages import report

OUTPUTS = ("lecture.md", "val_loss.png", "lr.png", "zero_fraction.png", "grad_norms.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAYERS = ("dense1", "dense2", "dense10", "logits")  # forward order; a string sort differs

EXPERIMENTS: dict[str, dict[str, Any]] = {
    "bn_sgd_earlystop": {},
    "my_new_idea": {"optim": {"lr": 0.01}},  # not in the lecture table
    "vanishing_sigmoid": {
        "model": {"name": "mlp", "batchnorm": False, "activation": "sigmoid", "depth": 10},
        "train": {"diagnostics": True},
    },
}


def _run(seed: int, epochs: int, stop: str, best_val_acc: float, seconds: float) -> dict[str, Any]:
    return {
        "seed": seed,
        "epochs_run": epochs,
        "stop_reason": stop,
        "best_val_acc": best_val_acc,
        "best_val_loss": 0.4,
        "final_val_acc": best_val_acc - 0.01,
        "final_val_loss": 0.45,
        "train_seconds": seconds,
    }


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def _write_history(
    path: Path, epochs: int, lr: list[float], grad_layers: tuple[str, ...] = ()
) -> None:
    """history.csv as train writes it: base columns, then the diagnostics in layer order."""
    extra = [f"grad_norm/{layer}" for layer in grad_layers]
    extra += [f"zero_fraction/{layer}" for layer in grad_layers]
    columns = ["epoch", "loss", "acc", "val_loss", "val_acc", "lr", "seconds", *extra]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        for epoch in range(epochs):
            row: list[float] = [
                epoch,
                1.0 / (epoch + 1),
                0.5,
                1.2 / (epoch + 1),
                0.6,
                lr[epoch],
                1.5,
            ]
            # deeper (later) layers get larger gradients, as in a vanishing-gradient net
            norms = {layer: 10.0 ** (depth - 4) for depth, layer in enumerate(grad_layers)}
            row += [norms[c.split("/", 1)[1]] for c in extra if c.startswith("grad_norm/")]
            row += [0.0 for c in extra if c.startswith("zero_fraction/")]
            writer.writerow(row)


def _write_experiment(
    name: str,
    runs: list[dict[str, Any]],
    evaluation: dict[str, Any],
    lr: list[float] | None = None,
    grad_layers: tuple[str, ...] = (),
) -> None:
    train = {**runs[0], "runs": runs} if len(runs) > 1 else runs[0]
    _write_json(Path("metrics") / name / "train.json", train)
    _write_json(Path("metrics") / name / "eval.json", evaluation)
    epochs = runs[0]["epochs_run"]
    _write_history(Path("plots") / name / "history.csv", epochs, lr or [0.02] * epochs, grad_layers)


def _params(base: dict[str, Any], experiments: dict[str, Any] = EXPERIMENTS) -> Params:
    raw = {**base, "experiments": experiments}
    Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return parse_params(raw)


@pytest.fixture()
def workspace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base_params: dict[str, Any]
) -> Params:
    """Three experiments' metrics/plots files and meta.json, as the pipeline leaves them."""
    monkeypatch.chdir(tmp_path)
    _write_json(
        Path("data/prepared/meta.json"),
        {"dataset": "fashion-mnist", "counts": {"train": 5400, "val": 600, "test": 10000}},
    )
    _write_experiment(
        "bn_sgd_earlystop",
        [_run(4487, 7, "max_epochs", 0.86, 12.34)],
        {"test_acc": 0.85125, "test_loss": 0.41},
        lr=[0.02 / (1 + k) for k in range(7)],
    )
    _write_experiment(
        "my_new_idea", [_run(4487, 4, "early_stop", 0.8, 3.0)], {"test_acc": 0.79, "test_loss": 0.6}
    )
    _write_experiment(
        "vanishing_sigmoid",
        [_run(4487, 3, "max_epochs", 0.3, 5.0)],
        {"test_acc": 0.25, "test_loss": 2.2},
        grad_layers=LAYERS,
    )
    return _params(base_params)


def _table(markdown: str, first_header: str) -> list[str]:
    """The lines of the markdown table whose header starts with ``first_header``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def _rows(markdown: str) -> dict[str, dict[str, str]]:
    """The results table as {experiment: {column: cell}}."""
    lines = _table(markdown, "experiment")
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split(" | ")), strict=True))
        rows[cells["experiment"].strip("`")] = cells
    return rows


def _markdown() -> str:
    return Path("reports/lecture.md").read_text(encoding="utf-8")


def test_one_row_per_experiment_in_params_order_with_its_values(workspace: Params) -> None:
    summary = report.main(workspace)
    assert summary["experiments"] == list(EXPERIMENTS)
    rows = _rows(_markdown())
    assert list(rows) == list(EXPERIMENTS)
    assert rows["bn_sgd_earlystop"] == {
        "experiment": "`bn_sgd_earlystop`",
        "setting": reporting.LECTURE["bn_sgd_earlystop"].setting,
        "n": "1",
        "test acc": "0.8512",  # 0.85125 at 4 digits, round-half-even on the binary value
        "best val acc": "0.8600",
        "epochs run": "7",
        "stop reason": "max_epochs",
        "train s": "12.3",
        "lecture (MNIST)": "0.9804",
    }
    assert rows["vanishing_sigmoid"]["lecture (MNIST)"] == "—"  # in the table, no figure


def test_experiment_outside_the_lecture_table_shows_dashes(workspace: Params) -> None:
    report.main(workspace)
    row = _rows(_markdown())["my_new_idea"]
    assert (row["setting"], row["lecture (MNIST)"]) == ("—", "—")
    assert (row["test acc"], row["stop reason"]) == ("0.7900", "early_stop")


def test_lecture_column_is_marked_mnist_only_when_our_data_differs(
    workspace: Params,
) -> None:
    report.main(workspace)
    assert "Data set: these runs use fashion-mnist" in _markdown()
    _write_json(Path("data/prepared/meta.json"), {"dataset": "mnist"})
    report.main(workspace)
    markdown = _markdown()
    assert "lecture (MNIST)" not in markdown
    assert _rows(markdown)["bn_sgd_earlystop"]["lecture"] == "0.9804"
    assert "Data set:" not in markdown


def test_capped_epochs_are_noted_but_early_stopping_is_not(workspace: Params) -> None:
    report.main(workspace)
    markdown = _markdown()
    # max_epochs after 7 < the lecture's 25 epochs: capped for the time budget
    assert "`bn_sgd_earlystop` ran 7 epochs, capped by train.epochs" in markdown
    assert "the lecture's run trained 25" in markdown
    assert "`my_new_idea` ran" not in markdown  # early-stopped, and no lecture figure


def _eval_of_replicas(accuracies: list[float], ensemble_size: int = 1) -> dict[str, Any]:
    """eval.json as evaluate writes it for several replicas."""
    return {
        "test_acc": statistics.fmean(accuracies),
        "test_acc_std": statistics.stdev(accuracies),
        "test_loss": 0.4,
        "ensemble_size": ensemble_size,
        "replicas": len(accuracies),
        "runs": [{"replica": i, "test_acc": a} for i, a in enumerate(accuracies)],
    }


def _half_width(values: list[float]) -> float:
    """The half-width of the 95 % Student-t interval of the mean, by scipy."""
    low, high = scipy.stats.t.interval(
        0.95, len(values) - 1, loc=statistics.fmean(values), scale=scipy.stats.sem(values)
    )
    return float(high - low) / 2


def test_rows_show_mean_and_95_percent_t_interval_over_replicas(workspace: Params) -> None:
    runs = [_run(4487, 6, "early_stop", 0.84, 10.0), _run(4488, 9, "max_epochs", 0.87, 14.0)]
    runs += [_run(4489, 7, "early_stop", 0.85, 11.0)]
    _write_experiment("bn_sgd_earlystop", runs, _eval_of_replicas([0.85, 0.86, 0.853]))
    report.main(workspace)
    markdown = _markdown()
    row = _rows(markdown)["bn_sgd_earlystop"]
    assert row["n"] == "3"
    assert row["test acc"] == f"0.8543 ± {_half_width([0.85, 0.86, 0.853]):.4f}"
    assert row["best val acc"] == f"0.8533 ± {_half_width([0.84, 0.87, 0.85]):.4f}"
    assert row["epochs run"] == f"7.3 ± {_half_width([6, 9, 7]):.1f}"
    assert row["stop reason"] == "early_stop (2), max_epochs (1)"
    assert row["train s"] == f"11.7 ± {_half_width([10.0, 14.0, 11.0]):.1f}"
    assert "95 % confidence interval, Student t" in markdown
    assert f"the band the {reporting.BAND}" in markdown  # the curves' band is said
    assert _rows(markdown)["my_new_idea"]["test acc"] == "0.7900"  # one run: no ±
    assert _rows(markdown)["my_new_idea"]["n"] == "1"


def test_ensemble_replica_counts_once_with_its_members_mean_and_summed_time(
    workspace: Params,
) -> None:
    # 2 replicas x 2 members, replica by replica as train writes them
    runs = [
        _run(4487, 4, "early_stop", 0.80, 1.0),
        _run(4488, 6, "early_stop", 0.84, 2.0),
        _run(4489, 5, "early_stop", 0.82, 3.0),
        _run(4490, 5, "early_stop", 0.86, 5.0),
    ]
    _write_experiment("my_new_idea", runs, _eval_of_replicas([0.9, 0.91], ensemble_size=2))
    report.main(workspace)
    markdown = _markdown()
    row = _rows(markdown)["my_new_idea"]
    assert row["best val acc"] == f"0.8300 ± {_half_width([0.82, 0.84]):.4f}"
    assert row["epochs run"] == "5"  # every replica's members ran 5 epochs on average
    assert row["train s"] == f"5.5 ± {_half_width([3.0, 8.0]):.1f}"
    assert row["test acc"] == f"0.9050 ± {_half_width([0.9, 0.91]):.4f}"  # the ensembles'
    assert row["n"] == "2"
    assert "Ensembles (`my_new_idea`): test acc is the ensemble's" in markdown


def test_ensemble_size_not_dividing_the_runs_is_a_data_error(workspace: Params) -> None:
    _write_json(
        Path("metrics/my_new_idea/eval.json"),
        {"test_acc": 0.79, "test_loss": 0.6, "ensemble_size": 2},
    )
    with pytest.raises(DataError, match=r"my_new_idea/eval\.json: ensemble_size 2 does not"):
        report.main(workspace)


def test_zero_std_of_a_single_replica_is_not_shown(workspace: Params) -> None:
    _write_json(
        Path("metrics/my_new_idea/eval.json"),
        {"test_acc": 0.79, "test_loss": 0.6, "test_acc_std": 0.0},
    )
    report.main(workspace)
    assert _rows(_markdown())["my_new_idea"]["test acc"] == "0.7900"


def test_every_plot_is_written_and_linked(workspace: Params) -> None:
    summary = report.main(workspace)
    assert summary["plots"] == [f"reports/{name}" for name in OUTPUTS[1:]]
    markdown = _markdown()
    for name in OUTPUTS[1:]:
        assert Path("reports", name).read_bytes().startswith(PNG_SIGNATURE)
        assert f"]({name})" in markdown  # relative to reports/lecture.md


def test_second_run_gives_byte_identical_outputs(workspace: Params) -> None:
    report.main(workspace)
    first = {name: Path("reports", name).read_bytes() for name in OUTPUTS}
    report.main(workspace)
    assert {name: Path("reports", name).read_bytes() for name in OUTPUTS} == first
    assert b"Matplotlib" not in first["val_loss.png"]  # no Software metadata


# A user's matplotlibrc that would change every figure if it reached the PNGs.
USER_STYLE: Any = {"axes.facecolor": "red", "figure.facecolor": "yellow", "font.size": 20.0}
HISTORY = "epoch,val_loss,lr\n0,1.0,0.1\n1,0.5,0.05\n2,0.4,0.01\n"
VAL_LOSS_PNG = (
    "from deepopt.figures import png_bytes\n"
    "from deepopt.reporting import parse_history, val_loss_figure\n"
    f"history = parse_history({HISTORY!r}, 'history.csv')\n"
    "blob = png_bytes(lambda: val_loss_figure({'a': [history], 'b': [history, history]}))\n"
    "sys.stdout.buffer.write(blob)\n"
)


def _val_loss_png() -> bytes:
    history = reporting.parse_history(HISTORY, "history.csv")
    return figures.png_bytes(
        lambda: reporting.val_loss_figure({"a": [history], "b": [history, history]})
    )


def test_rcparams_changed_in_process_leave_the_png_bytes_unchanged() -> None:
    pinned = _val_loss_png()
    with matplotlib.rc_context(USER_STYLE):
        assert _val_loss_png() == pinned
        assert matplotlib.rcParams["axes.facecolor"] == "red"  # the caller's rc is left alone
    with matplotlib.rc_context(USER_STYLE):  # a Figure built beforehand keeps its own style
        history = reporting.parse_history(HISTORY, "history.csv")
        built = reporting.val_loss_figure({"a": [history], "b": [history, history]})
    assert figures.png_bytes(built) != pinned


@pytest.mark.slow
def test_a_user_matplotlibrc_leaves_the_png_bytes_unchanged(tmp_path: Path) -> None:
    rc_file = tmp_path / "matplotlibrc"
    rc_file.write_text("".join(f"{k}: {v}\n" for k, v in USER_STYLE.items()), encoding="utf-8")
    code = "import sys\nimport matplotlib\n"
    code += "assert matplotlib.rcParams['axes.facecolor'] == 'red', matplotlib.matplotlib_fname()\n"
    env = {**os.environ, "MATPLOTLIBRC": str(rc_file)}
    done = subprocess.run(
        [sys.executable, "-c", code + VAL_LOSS_PNG], env=env, capture_output=True, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == _val_loss_png()


def test_gradient_norm_plot_is_left_out_without_diagnostics(
    workspace: Params, base_params: dict[str, Any]
) -> None:
    report.main(workspace)
    assert Path("reports/grad_norms.png").exists()
    params = _params(base_params, {"bn_sgd_earlystop": {}, "my_new_idea": {}})
    summary = report.main(params)
    assert not Path("reports/grad_norms.png").exists()  # no stale plot from the first run
    assert "grad_norms.png" not in _markdown()
    assert summary["plots"] == ["reports/val_loss.png", "reports/lr.png"]


def test_layers_keep_the_header_order_of_the_forward_pass() -> None:
    # neither sorted as strings nor as numbers: the order train wrote them in
    header = "epoch,val_loss,lr,grad_norm/stem,grad_norm/dense2,grad_norm/dense10,grad_norm/head"
    text = header + ",zero_fraction/stem\n0,1.0,0.1,1e-6,1e-5,1e-2,1e-1,0.5\n"
    history = reporting.parse_history(text, "history.csv")
    assert reporting.layer_order(history) == ["stem", "dense2", "dense10", "head"]


def test_experiments_on_one_schedule_share_a_line_in_the_lr_plot(workspace: Params) -> None:
    histories = {name: reporting.load_experiment(name).history for name in EXPERIMENTS}
    # my_new_idea (4 epochs) and vanishing_sigmoid (3) both keep lr 0.02; the first decays
    assert reporting.group_identical(histories, "lr") == [
        ["bn_sgd_earlystop"],
        ["my_new_idea", "vanishing_sigmoid"],
    ]


def test_train_best_is_added_when_the_tune_stage_wrote_it(workspace: Params) -> None:
    assert reporting.experiment_names(workspace) == list(EXPERIMENTS)
    _write_experiment(
        "train_best", [_run(4487, 5, "early_stop", 0.88, 9.0)], {"test_acc": 0.87, "test_loss": 0.3}
    )
    report.main(workspace)
    rows = _rows(_markdown())
    assert list(rows) == [*EXPERIMENTS, "train_best"]
    assert rows["train_best"]["test acc"] == "0.8700"


def test_missing_eval_file_is_a_data_error_naming_it(workspace: Params) -> None:
    Path("metrics/my_new_idea/eval.json").unlink()
    with pytest.raises(
        DataError, match=r"metrics/my_new_idea/eval\.json is missing: run `dvc repro`"
    ):
        report.main(workspace)
    assert not Path("reports/lecture.md").exists()  # nothing half-written


def test_history_without_val_loss_is_a_data_error() -> None:
    with pytest.raises(DataError, match=r"history\.csv: missing column\(s\) val_loss"):
        reporting.parse_history("epoch,loss,lr\n0,1.0,0.1\n", "plots/x/history.csv")


def test_cli_report_writes_the_report_and_fails_in_one_line(
    workspace: Params, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["report"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["report"] == "reports/lecture.md"
    assert Path("reports/lecture.md").exists()
    Path("metrics/bn_sgd_earlystop/train.json").unlink()
    assert cli.main(["report"]) == 1
    error = capsys.readouterr().err
    assert error == (
        "deepopt: error: metrics/bn_sgd_earlystop/train.json is missing: "
        "run `dvc repro` (the train stage writes it)\n"
    )


DEEP = {
    name: {"model": {"name": "resnet", "depth": 20, "skip": skip}, "train": {"diagnostics": True}}
    for name, skip in (("plain_20", False), ("resnet_20", True))
}


def test_plain_and_residual_networks_get_their_own_table_and_gradient_plot(
    workspace: Params, base_params: dict[str, Any]
) -> None:
    layers = ("conv0", "stage1.block1.conv1", "logits")
    for name in DEEP:
        _write_experiment(
            name,
            [_run(4487, 3, "max_epochs", 0.7, 9.0)],
            {"test_acc": 0.7, "test_loss": 0.8},
            grad_layers=layers,
        )
    summary = report.main(_params(base_params, {**EXPERIMENTS, **DEEP}))
    assert summary["plots"][-2:] == ["reports/grad_norms.png", "reports/deep_grad_norms.png"]
    deeper = _markdown().split("## Going deeper: plain vs residual")[1]
    # history: loss 1/(epoch+1), acc 0.5, grad norms 1e-4 (conv0) ... 1e-2 (logits)
    assert "| `plain_20` | 20 | no | yes | 3 | 0.3333 | 0.5000 | 0.7000 | 0.010 |" in deeper
    assert "| `resnet_20` | 20 | yes | yes | 3 |" in deeper
    assert "](deep_grad_norms.png)" in deeper
    report.main(workspace)  # without resnets: no section, and no stale deep plot
    assert "Going deeper" not in _markdown()
    assert not Path("reports/deep_grad_norms.png").exists()
