"""The claims table of `deepopt report` on tiny rigged matrices: metrics files written in
tmp_path as the train and evaluate stages write them (the data contract), no training."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest
import scipy.stats
import yaml

from deepopt import reporting
from deepopt.config import Params, parse_params
from deepopt.files import write_json
from deepopt.stages import report
from deepopt.stats import holm

BASE_ACC = [0.850, 0.861, 0.842]  # nobn's test accuracy per replica (seed + r)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, data)


def _history_rows(
    epochs: int, grad_norms: dict[str, float] | None = None
) -> list[dict[str, float]]:
    norms = {f"grad_norm/{layer}": value for layer, value in (grad_norms or {}).items()}
    return [
        {"epoch": e, "loss": 1.0 / (e + 1), "acc": 0.5, "val_loss": 1.2 / (e + 1), "lr": 0.02}
        | norms
        for e in range(epochs)
    ]


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def write_experiment(
    name: str,
    test_acc: list[float],
    *,
    final_loss: list[float] | None = None,
    grad_norms: list[dict[str, float]] | None = None,
    zero_fractions: list[dict[str, float]] | None = None,
    epochs: int = 3,
) -> None:
    """train.json (runs[], one per replica), eval.json (runs[]), history.csv and runs.csv."""
    runs = []
    for replica in range(len(test_acc)):
        run: dict[str, Any] = {
            "seed": 4487 + replica,
            "replica": replica,
            "member": 0,
            "epochs_run": epochs,
            "stop_reason": "max_epochs",
            "best_val_acc": 0.8,
            "best_val_loss": 0.5,
            "final_val_acc": 0.8,
            "final_val_loss": 0.5,
            "final_loss": final_loss[replica] if final_loss else 0.4,
            "final_acc": 0.85,
            "train_seconds": 2.0,
        }
        if grad_norms:
            run["final_grad_norm"] = grad_norms[replica]
        if zero_fractions:
            run["final_zero_fraction"] = zero_fractions[replica]
        runs.append(run)
    _write_json(Path("metrics", name, "train.json"), {**runs[0], "runs": runs})
    evaluation = {
        "test_acc": sum(test_acc) / len(test_acc),
        "test_loss": 0.4,
        "ensemble_size": 1,
        "replicas": len(test_acc),
        "runs": [
            {"replica": r, "seeds": [4487 + r], "test_acc": a, "test_loss": 0.4}
            for r, a in enumerate(test_acc)
        ],
    }
    _write_json(Path("metrics", name, "eval.json"), evaluation)
    norms = grad_norms or [{} for _ in test_acc]
    _write_csv(Path("plots", name, "history.csv"), _history_rows(epochs, norms[0]))
    _write_csv(
        Path("plots", name, "runs.csv"),
        [
            {"replica": r, "member": 0, "seed": 4487 + r, **row}
            for r in range(len(test_acc))
            for row in _history_rows(epochs, norms[r])
        ],
    )


@pytest.fixture()
def matrix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base_params: dict[str, Any]) -> Params:
    """A two-experiment matrix: the BN CNN and the same network without BN."""
    monkeypatch.chdir(tmp_path)
    _write_json(Path("data/prepared/meta.json"), {"dataset": "fashion-mnist"})
    experiments = {"bn_sgd_earlystop": {}, "nobn": {"model": {"batchnorm": False}}}
    raw = {**base_params, "experiments": experiments}
    Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return parse_params(raw)


def _claim_rows(markdown: str) -> dict[str, dict[str, str]]:
    """The claims table as {experiments cell: {column: cell}}."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| claim |"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split(" | ")])
    header, rows = table[0], table[2:]
    return {row[1]: dict(zip(header, row, strict=True)) for row in rows}


def _report(params: Params) -> dict[str, dict[str, str]]:
    report.main(params)
    return _claim_rows(Path("reports/lecture.md").read_text(encoding="utf-8"))


BN_VS_NOBN = "`bn_sgd_earlystop` − `nobn`"


@pytest.mark.parametrize(
    ("differences", "expected"),
    [
        ([0.020, 0.022, 0.019], "supported"),  # a clear, consistent gain
        ([0.001, -0.002, 0.0005], "inconclusive at n = 3"),  # none
        ([-0.020, -0.022, -0.019], "contradicted"),  # the reverse
    ],
)
def test_batchnorm_claim_verdict_follows_the_rigged_difference(
    matrix: Params, differences: list[float], expected: str
) -> None:
    write_experiment("nobn", BASE_ACC)
    write_experiment(
        "bn_sgd_earlystop", [b + d for b, d in zip(BASE_ACC, differences, strict=True)]
    )
    row = _report(matrix)[BN_VS_NOBN]
    assert row["verdict"] == expected
    p = scipy.stats.ttest_rel(
        [b + d for b, d in zip(BASE_ACC, differences, strict=True)], BASE_ACC, alternative="greater"
    ).pvalue
    shown = "< 0.001" if p < 0.001 else f"{p:.3f}"
    assert row["p (paired t)"] == shown
    # the only claim with both experiments: Holm over one p-value leaves it unchanged
    assert row["p Holm"] == shown
    assert row["lecture"] == "0.9804 vs 0.966–0.970 (no-BN rows)"


def test_paired_difference_cell_is_mean_and_t_half_width(matrix: Params) -> None:
    differences = [0.020, 0.022, 0.019]
    write_experiment("nobn", BASE_ACC)
    write_experiment(
        "bn_sgd_earlystop", [b + d for b, d in zip(BASE_ACC, differences, strict=True)]
    )
    low, high = scipy.stats.t.interval(
        0.95, 2, loc=sum(differences) / 3, scale=scipy.stats.sem(differences)
    )
    row = _report(matrix)[BN_VS_NOBN]
    assert (
        row["paired difference (95 % CI)"]
        == f"+{sum(differences) / 3:.4f} ± {(high - low) / 2:.4f}"
    )
    assert row["measure"] == "test acc"


@pytest.mark.parametrize("replicas", [3, 5])
def test_the_wilcoxon_line_gives_its_floor_at_the_run_s_n(matrix: Params, replicas: int) -> None:
    base = [0.80 + 0.01 * r for r in range(replicas)]
    write_experiment("nobn", base)
    write_experiment("bn_sgd_earlystop", [b + 0.02 + 0.001 * r for r, b in enumerate(base)])
    report.main(matrix)
    text = Path("reports/lecture.md").read_text(encoding="utf-8")
    line = next(line for line in text.splitlines() if line.startswith("Wilcoxon signed-rank"))
    floor = 0.5**replicas  # every difference positive: the exact one-sided p is its floor
    assert f"never below 1/2^n, {floor:.3g} at n = {replicas})" in line
    expected = scipy.stats.wilcoxon(
        [0.02 + 0.001 * r for r in range(replicas)], alternative="greater"
    )
    assert f"{BN_VS_NOBN} {expected.pvalue:.3f}" in line


def test_claims_of_absent_experiments_are_not_run(matrix: Params) -> None:
    write_experiment("nobn", BASE_ACC)
    write_experiment("bn_sgd_earlystop", BASE_ACC)
    rows = _report(matrix)
    assert rows["`bn_adam` − `bn_sgd_earlystop`"]["verdict"] == "not run"
    assert rows["`bn_adam` − `bn_sgd_earlystop`"]["p Holm"] == "—"
    assert rows["`vanishing_relu` vs 0.5"]["verdict"] == "not run"


def test_a_single_replica_is_inconclusive_at_n_1(matrix: Params) -> None:
    write_experiment("nobn", BASE_ACC[:1])
    write_experiment("bn_sgd_earlystop", [BASE_ACC[0] + 0.05])
    row = _report(matrix)[BN_VS_NOBN]
    assert row["verdict"] == "inconclusive at n = 1"
    assert row["paired difference (95 % CI)"] == "+0.0500"  # no interval at n = 1
    assert row["p (paired t)"] == "—"


def test_unequal_replicas_pair_the_common_ones_and_say_so(matrix: Params) -> None:
    write_experiment("nobn", BASE_ACC[:2])
    gains = [0.02, 0.001, 0.03]  # the third replica has no nobn partner
    write_experiment("bn_sgd_earlystop", [a + d for a, d in zip(BASE_ACC, gains, strict=True)])
    markdown_rows = _report(matrix)
    assert markdown_rows[BN_VS_NOBN]["verdict"] == "inconclusive at n = 2"
    markdown = Path("reports/lecture.md").read_text(encoding="utf-8")
    assert (
        "paired over the 2 replica(s) both measured (`bn_sgd_earlystop` has 3, `nobn` 2)"
        in markdown
    )


def _results(**experiments: dict[str, Any]) -> dict[str, reporting.ExperimentResult]:
    for name, values in experiments.items():
        write_experiment(name, **values)
    return {name: reporting.load_experiment(name) for name in experiments}


def _row(rows: list[reporting.ClaimRow], a: str, b: str | None) -> reporting.ClaimRow:
    return next(row for row in rows if (row.claim.a, row.claim.b) == (a, b))


def test_schedule_within_the_margin_is_no_worse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    results = _results(
        bn_sgd_earlystop={"test_acc": BASE_ACC},
        bn_sgd_decay={
            "test_acc": [a + d for a, d in zip(BASE_ACC, [-0.001, 0.0005, 0.0], strict=True)]
        },
        bn_sgd_linear={
            "test_acc": [a + d for a, d in zip(BASE_ACC, [-0.02, -0.018, -0.023], strict=True)]
        },
    )
    rows = reporting.evaluate_claims(reporting.lecture_claims(results), results)
    assert _row(rows, "bn_sgd_decay", "bn_sgd_earlystop").verdict == "supported"
    assert _row(rows, "bn_sgd_linear", "bn_sgd_earlystop").verdict == "contradicted"
    assert _row(rows, "bn_sgd_plateau", "bn_sgd_earlystop").verdict == "not run"
    claim = _row(rows, "bn_sgd_decay", "bn_sgd_earlystop").claim
    assert claim.margin == reporting.NON_INFERIORITY_MARGIN


def test_holm_runs_across_the_whole_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    results = _results(
        nobn={"test_acc": BASE_ACC},
        bn_sgd_earlystop={
            "test_acc": [a + d for a, d in zip(BASE_ACC, [0.02, 0.03, 0.01], strict=True)]
        },
        nobn_l2={"test_acc": [a + d for a, d in zip(BASE_ACC, [0.01, 0.0, 0.004], strict=True)]},
    )
    rows = reporting.evaluate_claims(reporting.lecture_claims(results), results)
    tested = [row for row in rows if row.result is not None]
    p_values = [row.result.p_value for row in tested if row.result is not None]
    assert [row.p_holm for row in tested] == pytest.approx(holm(p_values))
    assert len(tested) == 2  # bn vs nobn and L2 vs nobn; every other claim is not run


def test_relu_gradient_and_sparsity_claims_read_the_diagnostics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    # Layers stem -> dense -> logits: their forward order is not the alphabetical order that
    # write_json leaves in train.json, so the report must take it from history.csv.
    relu_norms = [{"stem": 0.1 * k, "dense": 0.2, "logits": 0.3} for k in (1.0, 1.2, 0.9)]
    sigmoid_norms = [{"stem": 1e-5 * k, "dense": 1e-3, "logits": 0.3} for k in (1.0, 2.0, 0.5)]
    zeros = [
        {"stem": 0.61, "dense": 0.66},
        {"stem": 0.63, "dense": 0.7},
        {"stem": 0.6, "dense": 0.64},
    ]
    results = _results(
        vanishing_relu={"test_acc": BASE_ACC, "grad_norms": relu_norms, "zero_fractions": zeros},
        vanishing_sigmoid={"test_acc": BASE_ACC, "grad_norms": sigmoid_norms},
    )
    rows = reporting.evaluate_claims(reporting.lecture_claims(results), results)
    gradient = _row(rows, "vanishing_relu", "vanishing_sigmoid")
    expected = [
        math.log10(r["stem"]) - math.log10(s["stem"])
        for r, s in zip(relu_norms, sigmoid_norms, strict=True)
    ]
    assert gradient.result is not None
    assert gradient.result.difference.mean == pytest.approx(sum(expected) / 3)
    assert gradient.verdict == "supported"
    sparse = _row(rows, "vanishing_relu", None)
    means = [sum(z.values()) / 2 for z in zeros]
    assert sparse.result is not None
    assert sparse.result.p_value == pytest.approx(
        scipy.stats.ttest_1samp(means, 0.5, alternative="greater").pvalue
    )
    assert sparse.verdict == "supported"


def test_skip_connections_claim_is_on_the_training_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    results = _results(
        plain_20={"test_acc": BASE_ACC, "final_loss": [0.9, 0.95, 0.85]},
        resnet_20={"test_acc": BASE_ACC, "final_loss": [0.5, 0.56, 0.47]},
    )
    rows = reporting.evaluate_claims(reporting.lecture_claims(results), results)
    row = _row(rows, "resnet_20", "plain_20")
    assert (row.claim.measure, row.claim.side) == ("final_loss", "less")
    assert row.verdict == "supported"


def test_an_experiment_without_diagnostics_is_not_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    relu_norms = [{"stem": 0.1, "dense": 0.2}] * 3
    results = _results(  # vanishing_sigmoid trained with train.diagnostics: false
        vanishing_relu={"test_acc": BASE_ACC, "grad_norms": relu_norms},
        vanishing_sigmoid={"test_acc": BASE_ACC},
    )
    rows = reporting.evaluate_claims(reporting.lecture_claims(results), results)
    gradient = _row(rows, "vanishing_relu", "vanishing_sigmoid")
    assert (gradient.verdict, gradient.result) == ("not measured", None)
    assert (
        "no log10 gradient norm, first layer (last epoch) in `vanishing_sigmoid`" in gradient.note
    )
    assert math.isnan(gradient.p_holm)
