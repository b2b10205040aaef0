"""transfer/report.md from rigged fine-tune metrics: mean ± 95 % t interval and n per size
x mode, the paired gains over scratch, and the claim "a pretrained backbone helps most
when labels are few" supported, contradicted or inconclusive as the numbers say."""

from __future__ import annotations

from typing import Any

import pytest
import scipy.stats

from deepopt.transfer.report import (
    accuracy_figure,
    claim_rows,
    gain_rows,
    render_report,
    transfer_table,
)

SEEDS = (4487, 4488, 4489)
SMALL, LARGE = 2, 1000


def _runs(accuracies: dict[tuple[str, int], list[float]]) -> list[dict[str, Any]]:
    """finetune.json's runs: one per (mode, size) and seed, the test accuracies given."""
    return [
        {"mode": mode, "per_class": size, "seed": seed, "test_acc": acc, "final_val_acc": acc}
        | {"train_images": 5 * size, "repeats": 1, "steps": 10, "train_seconds": 1.0}
        | {"run_id": f"r-{mode}-{size}-{seed}"}
        for (mode, size), values in accuracies.items()
        for seed, acc in zip(SEEDS, values, strict=False)  # fewer values: fewer seeds
    ]


def _rig(gain_small: list[float], gain_large: list[float]) -> list[dict[str, Any]]:
    """Scratch's accuracies and the fine-tune's gains over them, seed by seed (the linear
    probe gains nothing)."""
    scratch_small, scratch_large = [0.40, 0.45, 0.42], [0.85, 0.86, 0.84]
    return _runs(
        {
            ("linear_probe", SMALL): scratch_small,
            ("finetune", SMALL): [s + g for s, g in zip(scratch_small, gain_small, strict=True)],
            ("scratch", SMALL): scratch_small,
            ("linear_probe", LARGE): scratch_large,
            ("finetune", LARGE): [s + g for s, g in zip(scratch_large, gain_large, strict=True)],
            ("scratch", LARGE): scratch_large,
        }
    )


def _finetune_claim(runs: list[dict[str, Any]]) -> Any:
    (row,) = [r for r in claim_rows(runs) if r.mode == "finetune"]
    return row


def test_the_table_shows_each_cells_mean_t_interval_and_n() -> None:
    runs = _runs({("finetune", 10): [0.70, 0.72, 0.74], ("scratch", 10): [0.5, 0.5, 0.5]})
    runs += _runs({("finetune", 200): [0.9]})  # one seed: the mean alone
    # t(0.975, 2) x sd 0.02 / sqrt(3) = 0.0497
    assert transfer_table(runs) == [
        "| labelled / class | fine-tune | from scratch |",
        "|---:|---:|---:|",
        "| 10 | 0.7200 ± 0.0497 (n = 3) | 0.5000 ± 0.0000 (n = 3) |",
        "| 200 | 0.9000 (n = 1) | — |",
    ]


def test_the_gains_are_paired_t_tests_holm_corrected_across_the_rows() -> None:
    runs = _rig([0.30, 0.32, 0.31], [0.01, 0.03, 0.00])
    rows = gain_rows(runs)
    assert [(r.per_class, r.mode) for r in rows] == [
        (SMALL, "finetune"),
        (SMALL, "linear_probe"),
        (LARGE, "finetune"),
        (LARGE, "linear_probe"),
    ]
    finetune_small = rows[0]
    scratch = [0.40, 0.45, 0.42]
    finetune = [s + g for s, g in zip(scratch, [0.30, 0.32, 0.31], strict=True)]
    expected = scipy.stats.ttest_rel(finetune, scratch)
    assert finetune_small.result.p_value == pytest.approx(expected.pvalue)
    assert finetune_small.result.difference.mean == pytest.approx(0.31)
    # Two rows have a p (the linear probe's differences are all 0): the smaller doubles.
    assert finetune_small.p_holm == pytest.approx(2 * finetune_small.result.p_value)


def test_a_gain_clearly_larger_with_few_labels_supports_the_claim() -> None:
    row = _finetune_claim(_rig([0.30, 0.32, 0.31], [0.01, 0.02, 0.00]))
    assert row.verdict == "supported"
    assert (row.smallest, row.largest, row.result.n) == (SMALL, LARGE, 3)
    assert row.result.difference.mean == pytest.approx(0.30)
    assert row.result.difference.low > 0 and row.p_holm < 0.05


def test_noisy_gains_leave_the_claim_inconclusive() -> None:
    row = _finetune_claim(_rig([0.10, -0.05, 0.02], [0.00, 0.03, 0.01]))
    assert row.verdict == "inconclusive at n = 3"


def test_a_gain_clearly_smaller_with_few_labels_contradicts_the_claim() -> None:
    row = _finetune_claim(_rig([0.00, 0.01, 0.02], [0.20, 0.22, 0.21]))
    assert row.verdict == "contradicted"


def test_one_seed_is_inconclusive_and_one_size_tests_no_claim() -> None:
    one_seed = [r for r in _rig([0.3, 0.3, 0.3], [0.0, 0.0, 0.0]) if r["seed"] == SEEDS[0]]
    assert _finetune_claim(one_seed).verdict == "inconclusive at n = 1"
    assert claim_rows([r for r in one_seed if r["per_class"] == SMALL]) == []


def test_the_report_has_the_table_the_claim_and_every_run() -> None:
    task = {"dataset": "fashion-mnist", "classes": [0, 1], "class_names": ["a", "b"]}
    summary = {
        "source": {**task, "train_images": 100, "test_acc": 0.9, "seed": 4487, "run_id": "SRC"},
        "target": {**task, "test_images": 2000},
        "model": "resnet",
        "epochs": 3,
        "backbone_lr_scale": 0.1,
        "min_batches": 30,
        "seeds": list(SEEDS),
        "runs": _rig([0.30, 0.32, 0.31], [0.01, 0.02, 0.00]),
    }
    text = render_report(summary, "accuracy_vs_size.png")
    assert "MLflow run `SRC`" in text and "](accuracy_vs_size.png)" in text
    assert "3 seeds: 4487, 4488, 4489" in text and "one run (seed 4487)" in text
    assert "| 2 | 0.4233 ± 0.0625 (n = 3) | 0.7333 ± 0.0872 (n = 3) |" in text
    assert "| 2 | fine-tune − from scratch | +0.3100 ± 0.0248 | 3 |" in text
    claim = next(line for line in text.splitlines() if "| fine-tune | 2 / class" in line)
    assert claim.startswith("| a pretrained backbone helps most when labels are few |")
    assert claim.endswith("| **supported** |")
    assert text.count("\n| fine-tune | ") == 6  # one detail row per run of the mode


def test_the_plot_draws_a_band_per_mode_over_the_seeds() -> None:
    figure = accuracy_figure(_rig([0.3, 0.3, 0.3], [0.0, 0.0, 0.0]))
    axis = figure.axes[0]
    assert len(axis.lines) == 3 and len(axis.collections) == 3
    assert "3 seeds" in axis.get_title()
