"""compare/report.md from rigged runs and studies: default vs tuned per optimizer, every
other optimizer against the best tuned one (paired t, Holm), the performance profile, the
budget check, and the verdict sentence in the words the numbers allow."""

from __future__ import annotations

import math
from typing import Any

import pytest
import scipy.stats

from deepopt.compare.profile import epochs_to_target, profile_fractions, profile_table
from deepopt.compare.report import (
    check_budgets,
    compare_metrics,
    gain_rows,
    profile_figure,
    render_report,
    verdict_sentences,
    versus_best,
)
from deepopt.errors import DataError

SEEDS = [4487, 4488, 4489, 4490, 4491]
EPOCHS = 4
BUDGET = 6
BASE = [0.80, 0.83, 0.78, 0.82, 0.81]  # a seed's share: the spread the pairing removes
NOISE = [0.004, -0.003, 0.001, -0.002, 0.002]  # small, mean 0.0004: "no difference"

Accuracies = list[float | None]  # per seed; None: the seed diverged


def _plus(offsets: list[float], base: list[float] = BASE) -> list[float]:
    return [b + o for b, o in zip(base, offsets, strict=True)]


def _config(name: str, lr: float, **schedule: Any) -> dict[str, Any]:
    optim: dict[str, Any] = {"name": name, "lr": lr, "weight_decay": 0.0}
    if name == "adam":
        optim["betas"] = [0.9, 0.999]
    return {"optim": optim, "schedule": {"name": "constant", **schedule}}


def _run(seed: int, acc: float | None, val_acc: list[float] | None = None) -> dict[str, Any]:
    history = val_acc if val_acc is not None else [0.5] * EPOCHS
    return {
        "seed": seed,
        "replica": seed - SEEDS[0],
        "diverged": acc is None,
        "test_acc": acc,
        "test_loss": None if acc is None else 1 - acc,
        "best_val_acc": max(history),
        "epochs_run": len(history),
        "train_seconds": 1.0,
        "stop_reason": "diverged" if acc is None else "epochs",
        "run_id": f"run-{seed}",
        "val_acc": history,
    }


def _runs(settings: str, accuracies: dict[str, Accuracies]) -> dict[str, Any]:
    """runs/<settings>.json with the test accuracies given, seed by seed."""
    return {
        "settings": settings,
        "dataset": "fashion-mnist",
        "model": "lecture_cnn",
        "epochs": EPOCHS,
        "seeds": SEEDS,
        "optimizers": {
            name: {
                "config": _config(name, 0.001 if settings == "default" else 0.0023),
                "parent_run_id": f"parent-{name}-{settings}",
                "runs": [_run(s, a) for s, a in zip(SEEDS, accs, strict=True)],
            }
            for name, accs in accuracies.items()
        },
    }


def _studies(names: list[str], finished: dict[str, int] | None = None) -> dict[str, Any]:
    """studies.json: every study at the budget unless ``finished`` says otherwise."""
    found = finished or {}
    return {
        "budget": BUDGET,
        "epochs": EPOCHS,
        "storage": "sqlite:///compare/optuna.db",
        "monitor": "val_loss",
        "direction": "minimize",
        "studies": {
            name: {
                "study": f"compare-{name}-0123456789",
                "finished": found.get(name, BUDGET),
                "complete": min(found.get(name, BUDGET), BUDGET) - 1,  # of the first BUDGET
                "pruned": 1,
                "failed": 0,
                "epochs": 21,
                "seconds": 63.4,
                "best_trial": 2,
                "best_value": 0.35,
                "best_params": {"lr": 0.0023},
                "extended": found.get(name, BUDGET) > BUDGET,
            }
            for name in names
        },
    }


def _counted(studies: dict[str, Any]) -> dict[str, int]:
    return {name: entry["finished"] for name, entry in studies["studies"].items()}


def _paired_p(a: list[float], b: list[float]) -> float:
    return float(scipy.stats.ttest_rel(a, b, alternative="greater").pvalue)


def _holm_of_two(p: float, q: float) -> tuple[float, float]:
    """Holm by hand for two p-values: the smaller x 2, the larger x 1, kept monotone."""
    if p <= q:
        first = min(1.0, 2 * p)
        return first, max(first, q)
    second = min(1.0, 2 * q)
    return max(second, p), second


# Tuning adds 0.05 +- 0.01 to adam on every seed, nothing (noise) to sgd.
ADAM_GAIN = [0.05, 0.06, 0.04, 0.07, 0.05]
GAIN_DEFAULT = {"sgd": BASE, "adam": BASE}
GAIN_TUNED = {"sgd": _plus(NOISE), "adam": _plus(ADAM_GAIN)}


def test_a_clear_gain_from_tuning_is_supported_and_noise_is_inconclusive() -> None:
    sgd, adam = gain_rows(_runs("default", GAIN_DEFAULT), _runs("tuned", GAIN_TUNED))
    assert (sgd.name, sgd.verdict) == ("sgd", "inconclusive at n = 5")
    assert (adam.name, adam.verdict) == ("adam", "supported")
    assert adam.gain.mean == pytest.approx(0.054)
    assert sgd.gain.mean == pytest.approx(0.0004)


def test_gains_are_holm_corrected_paired_t_tests_across_the_optimizers() -> None:
    sgd, adam = gain_rows(_runs("default", GAIN_DEFAULT), _runs("tuned", GAIN_TUNED))
    expected = _holm_of_two(_paired_p(GAIN_TUNED["sgd"], BASE), _paired_p(GAIN_TUNED["adam"], BASE))
    assert (sgd.p_holm, adam.p_holm) == pytest.approx(expected)
    assert adam.p_holm < 0.001 and sgd.p_holm > 0.1  # the rig is what it says


def test_intervals_are_student_t_intervals_over_the_seeds() -> None:
    (_, adam) = gain_rows(_runs("default", GAIN_DEFAULT), _runs("tuned", GAIN_TUNED))
    for interval, values in (
        (adam.default, BASE),
        (adam.tuned, GAIN_TUNED["adam"]),
        (adam.gain, ADAM_GAIN),
    ):
        low, high = scipy.stats.t.interval(
            0.95, len(values) - 1, loc=sum(values) / len(values), scale=scipy.stats.sem(values)
        )
        assert (interval.low, interval.high, interval.n) == (
            pytest.approx(low),
            pytest.approx(high),
            5,
        )


def test_diverged_seeds_are_left_out_of_means_and_pairs() -> None:
    tuned = {"sgd": [0.9, None, None, None, None], "adam": _plus(ADAM_GAIN)}
    default = {"sgd": [None] * 5, "adam": [None, *BASE[1:]]}
    sgd, adam = gain_rows(_runs("default", default), _runs("tuned", tuned))
    assert sgd.diverged == (5, 4) and adam.diverged == (1, 0)
    assert sgd.default.n == 0 and sgd.verdict == "not run"  # no default seed to pair with
    assert (sgd.tuned.n, sgd.tuned.mean) == (1, pytest.approx(0.9))
    assert adam.gain.n == 4 and adam.gain.mean == pytest.approx(sum(ADAM_GAIN[1:]) / 4)


def test_one_usable_seed_is_inconclusive_at_n_1_and_does_not_crown_its_optimizer() -> None:
    # adam: one finished seed at 0.95, four diverged. A diverged seed is the optimizer's
    # failure: the best is the one whose every seed finished, though its mean is lower.
    tuned = {"sgd": [0.70, 0.71, 0.69, 0.72, 0.70], "adam": [0.95, None, None, None, None]}
    best, (adam,) = versus_best(_runs("tuned", tuned))
    assert best == "sgd"
    assert adam.difference.n == 1
    assert adam.verdict == "inconclusive at n = 1" and math.isnan(adam.p_holm)


# Tuned accuracies: adam far ahead of both others, seed by seed with some spread.
AHEAD = {
    "sgd": _plus([0.0, 0.01, -0.01, 0.0, 0.005]),
    "rmsprop": _plus([0.02, 0.015, 0.025, 0.02, 0.01]),
    "adam": _plus([0.08, 0.09, 0.07, 0.085, 0.075]),
}


def test_the_best_is_compared_with_every_other_holm_across_them() -> None:
    best, rows = versus_best(_runs("tuned", AHEAD))
    assert best == "adam" and [r.name for r in rows] == ["sgd", "rmsprop"]
    expected = _holm_of_two(
        _paired_p(AHEAD["adam"], AHEAD["sgd"]), _paired_p(AHEAD["adam"], AHEAD["rmsprop"])
    )
    assert [r.p_holm for r in rows] == pytest.approx(list(expected))
    assert [r.verdict for r in rows] == ["supported", "supported"]
    assert rows[0].difference.mean == pytest.approx(0.08 - 0.001)


def _verdict(default: dict[str, Accuracies], tuned: dict[str, Accuracies]) -> str:
    studies = _studies(list(tuned))
    report = render_report(
        _runs("default", default),
        _runs("tuned", tuned),
        studies,
        counted=_counted(studies),
        target_val_acc=0.85,
        profile_file="profile.png",
    )
    return report.split("## Verdict\n\n")[1].split("\n\n")[0]


def test_a_best_far_ahead_of_all_others_is_said_to_be_ahead_of_every_other() -> None:
    answer, tuning = _verdict(dict.fromkeys(AHEAD, BASE), AHEAD).split("\n")
    assert answer.startswith(
        "**adam is ahead of every other optimizer here** (at n = 5 seeds and a budget of 6 "
        "trials per optimizer; each lead supported after Holm)"
    )
    assert tuning == (
        "Tuning beat the Keras defaults for 2 of 3 optimizers (rmsprop, adam; supported "
        "after Holm); for the rest the difference is inconclusive."
    )


def test_two_optimizers_equal_within_noise_get_the_no_best_sentence() -> None:
    tuned = {"sgd": _plus(NOISE), "adam": BASE}
    answer = _verdict({"sgd": BASE, "adam": BASE}, tuned).split("\n")[0]
    assert answer == (
        "**No optimizer is best here**: sgd has the highest mean tuned test accuracy, but its "
        "lead over every other is inconclusive at n = 5 seeds and a budget of 6 trials per "
        "optimizer: as the lecture says, there is no best optimizer; the choice depends on "
        "the problem and the tuning."
    )


def test_a_mixed_result_names_who_the_best_beats_and_who_it_ties_with() -> None:
    tuned = {**AHEAD, "rmsprop": _plus([0.081, 0.088, 0.072, 0.083, 0.077])}
    answer = _verdict(dict.fromkeys(tuned, BASE), tuned).split("\n")[0]
    assert answer.startswith("**No single best optimizer here**: rmsprop has the highest")
    assert "it is ahead of sgd (supported after Holm) and cannot be told apart from adam" in (
        answer
    )


def test_the_report_shows_the_tables_cost_settings_and_statistics() -> None:
    studies = _studies(["sgd", "adam"])
    tuned = _runs("tuned", {"sgd": _plus(NOISE), "adam": [None, *GAIN_TUNED["adam"][1:]]})
    tuned["optimizers"]["adam"]["config"]["schedule"] = {"name": "inverse_time", "decay": 4e-4}
    report = render_report(
        _runs("default", GAIN_DEFAULT),
        tuned,
        studies,
        counted=_counted(studies),
        target_val_acc=0.85,
        profile_file="profile.png",
    )
    lines = report.split("\n")
    assert lines[0] == "# Which optimizer is best?"
    assert lines[2] == (
        "Data set fashion-mnist, network `lecture_cnn`, at most 4 epochs per run; budget 6 "
        "finished trials per study; 5 seeds (4487, 4488, 4489, 4490, 4491); profile target "
        "val_acc 0.85."
    )
    (adam_row,) = [line for line in lines if line.startswith("| adam | 0.8080")]
    cells = adam_row.split(" | ")
    # sd 0.0192 / sqrt(5) x t(0.975, 4) 2.776; tuned: seed 4487 diverged, sd 0.0332 / 2 x 3.182
    assert cells[1:4] == [
        "0.8080 ± 0.0239 (n = 5)",
        "0.8650 ± 0.0528 (n = 4)",
        "+0.0550 ± 0.0205 (n = 4)",  # ADAM_GAIN[1:], paired on the 4 seeds
    ]
    assert cells[5:] == [
        "supported",
        "6 (5/1)",
        "21",
        "63",
        "lr 0.0023, betas 0.9/0.999, inverse_time decay 0.0004 |",
    ]
    # adam has the higher mean but a diverged seed: sgd, whose every seed finished, is the
    # best; sgd − adam on the 4 seeds both finished: -(0.063, 0.039, 0.072, 0.048).
    assert "## Against the best tuned optimizer: sgd" in lines
    assert "| adam | -0.0555 ± 0.0235 (n = 4) |" in report
    assert "- adam: 1 of 5 tuned seeds diverged (left out of its mean and pairs)." in lines
    assert "![performance profile](profile.png)" in lines
    assert "95 % Student-t intervals" in report and "Holm-corrected" in report


def test_compare_metrics_gives_the_means_and_the_best() -> None:
    metrics = compare_metrics(
        _runs("default", GAIN_DEFAULT), _runs("tuned", GAIN_TUNED), _studies(["sgd", "adam"])
    )
    assert metrics["best"] == "adam" and (metrics["budget"], metrics["seeds"]) == (6, 5)
    assert metrics["test_acc"]["default"] == {"sgd": pytest.approx(0.808)} | {
        "adam": pytest.approx(0.808)
    }
    assert metrics["test_acc"]["tuned"]["adam"] == pytest.approx(0.862)


# One optimizer's five seeds, target 0.8 over 4 epochs: reaching it at epoch 2 (and falling
# back: the running max counts), at 3, early-stopped after reaching it at 2, diverged after
# an epoch above it (a diverged seed never counts), and never.
HISTORIES = [
    ([0.70, 0.82, 0.79, 0.78], False),
    ([0.50, 0.70, 0.81, 0.90], False),
    ([0.60, 0.81], False),
    ([0.85], True),
    ([0.50, 0.60, 0.70, 0.75], False),
]


def _profiled(histories: list[tuple[list[float], bool]]) -> dict[str, Any]:
    runs = [
        _run(seed, None if diverged else 0.8, history)
        for seed, (history, diverged) in zip(SEEDS, histories, strict=True)
    ]
    return {"config": _config("adam", 0.001), "runs": runs}


def test_the_profile_counts_seeds_at_the_target_by_each_epoch() -> None:
    entry = _profiled(HISTORIES)
    assert profile_fractions(entry, 0.8, EPOCHS) == [0.0, 0.4, 0.6, 0.6]
    assert epochs_to_target(entry, 0.8) == 3  # the median of 2, 2, 3, never, never
    assert epochs_to_target(entry, 0.815) is None  # 2 of 5 reach it: fewer than half


def test_the_profile_table_has_a_row_per_optimizer_and_settings() -> None:
    default, tuned = _runs("default", {"adam": BASE}), _runs("tuned", {"adam": BASE})
    tuned["optimizers"]["adam"] = _profiled(HISTORIES)
    assert profile_table(default, tuned, 0.8) == [
        "| optimizer | settings | 1 | 2 | 3 | 4 | median epochs to 0.8 |",
        "|---|---|---:|---:|---:|---:|---:|",
        "| adam | default | 0.00 | 0.00 | 0.00 | 0.00 | never |",
        "| adam | tuned | 0.00 | 0.40 | 0.60 | 0.60 | 3 |",
    ]


def test_the_profile_figure_draws_a_step_line_per_optimizer_and_settings() -> None:
    default, tuned = _runs("default", GAIN_DEFAULT), _runs("tuned", GAIN_TUNED)
    tuned["optimizers"]["adam"] = _profiled(HISTORIES)
    figure = profile_figure(default, tuned, 0.8)
    lines = figure.axes[0].get_lines()
    assert [line.get_label() for line in lines] == [
        "sgd tuned",
        "sgd default",
        "adam tuned",
        "adam default",
    ]
    assert [line.get_linestyle() for line in lines] == ["-", "--", "-", "--"]
    assert list(lines[2].get_ydata()) == [0.0, 0.4, 0.6, 0.6]


def test_a_short_study_is_refused_in_one_line_naming_it() -> None:
    studies = _studies(["sgd", "adam"], finished={"adam": BUDGET - 2})
    with pytest.raises(DataError) as raised:
        check_budgets(studies, _counted(studies), BUDGET)
    message = str(raised.value)
    assert "\n" not in message
    assert "compare-adam-0123456789" in message and "4 finished trials" in message
    assert "budget 6" in message and "dvc repro compare/dvc.yaml" in message


def test_a_count_in_the_storage_that_differs_from_studies_json_is_refused() -> None:
    studies = _studies(["sgd", "adam"])
    with pytest.raises(DataError, match=r"study compare-sgd-0123456789 \(sgd\) holds 7 .* but 6"):
        check_budgets(studies, {"sgd": BUDGET + 1, "adam": BUDGET}, BUDGET)
    with pytest.raises(DataError, match=r"compare-adam-0123456789 .* not in the storage"):
        check_budgets(studies, {"sgd": BUDGET}, BUDGET)


def test_an_extended_study_is_a_note_not_an_error() -> None:
    studies = _studies(["sgd", "adam"], finished={"sgd": BUDGET + 3})
    assert check_budgets(studies, _counted(studies), BUDGET) == [
        "sgd: its study compare-sgd-0123456789 holds 9 finished trials (extended beyond the "
        "budget); its best is from its first 6, as every other study's."
    ]
    report = render_report(
        _runs("default", GAIN_DEFAULT),
        _runs("tuned", GAIN_TUNED),
        studies,
        counted=_counted(studies),
        target_val_acc=0.85,
        profile_file="profile.png",
    )
    # The table counts the first 6 (5 complete, 1 pruned) and says how many there are.
    assert "| inconclusive at n = 5 | 6 of 9 (5/1) | 21 | 63 | lr 0.0023, constant |" in report
    assert f"- {check_budgets(studies, _counted(studies), BUDGET)[0]}" in report.split("\n")


def test_the_report_refuses_unequal_budgets_before_comparing() -> None:
    studies = _studies(["sgd", "adam"], finished={"sgd": 1})
    with pytest.raises(DataError, match="fewer than the budget 6"):
        render_report(
            _runs("default", GAIN_DEFAULT),
            _runs("tuned", GAIN_TUNED),
            studies,
            counted=_counted(studies),
            target_val_acc=0.85,
            profile_file="profile.png",
        )


def test_an_optimizer_whose_tuned_seeds_all_diverged_is_named_as_not_compared() -> None:
    default = _runs("default", {"sgd": BASE, "rmsprop": BASE, "adam": BASE})
    tuned = _runs("tuned", {"sgd": _plus([0.06] * 5), "rmsprop": _plus(NOISE), "adam": [None] * 5})
    gains = gain_rows(default, tuned)
    best, versus = versus_best(tuned)
    answer, tuning = verdict_sentences(best, versus, gains, seeds=5, budget=BUDGET)
    assert answer.endswith("Not compared: adam (every tuned seed diverged).")
    assert "not measured for adam (diverged)" in tuning
