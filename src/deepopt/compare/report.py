"""compare/report.md from the compare pipeline's files (pure: no torch, mlflow or optuna).

Every optimizer's test accuracy at its defaults and tuned (mean and 95 % Student-t
interval over the seeds), tuned minus default paired by seed, each other optimizer
against the best tuned one, both families Holm-corrected, and the verdict in the words the
numbers allow. The studies' budgets are checked first: a comparison of unequal budgets
measures the budgets."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from deepopt.compare.profile import profile_figure, profile_table
from deepopt.errors import DataError
from deepopt.stats import (
    ALPHA,
    Interval,
    PairedResult,
    format_p,
    holm,
    mean_interval,
    paired_difference,
)
from deepopt.stats import verdict as claim_verdict

__all__ = [
    "GainRow",
    "VersusRow",
    "accuracies",
    "check_budgets",
    "compare_metrics",
    "gain_rows",
    "profile_figure",  # from deepopt.compare.profile, beside the report it illustrates
    "render_report",
    "verdict_sentences",
    "versus_best",
]

Runs = Mapping[str, Any]  # runs/<settings>.json
MISSING = "—"


def accuracies(entry: Mapping[str, Any]) -> dict[int, float]:
    """seed -> test accuracy of an optimizer's runs that did not diverge."""
    return {run["seed"]: run["test_acc"] for run in entry["runs"] if not run["diverged"]}


def _pairs(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[list[float], list[float]]:
    seeds = sorted(set(a) & set(b))
    return [a[s] for s in seeds], [b[s] for s in seeds]


@dataclass(frozen=True)
class _Test:
    one_sided: PairedResult  # "a > b"
    two_sided: PairedResult


def _test(a: Mapping[int, float], b: Mapping[int, float]) -> _Test:
    first, second = _pairs(a, b)
    return _Test(
        paired_difference(first, second, alternative="greater"),
        paired_difference(first, second),
    )


def _verdicts(tests: Sequence[_Test]) -> tuple[list[float], list[str]]:
    """Holm across the family (one-sided for support, two-sided for contradiction)."""
    p_one = holm([t.one_sided.p_value for t in tests])
    p_two = holm([t.two_sided.p_value for t in tests])
    verdicts = [
        claim_verdict(t.one_sided.difference, p_holm=p, p_two_sided_holm=q, side="greater")
        for t, p, q in zip(tests, p_one, p_two, strict=True)
    ]
    return p_one, verdicts


@dataclass(frozen=True)
class GainRow:
    """One optimizer: default and tuned accuracy, and whether tuning helped."""

    name: str
    default: Interval
    tuned: Interval
    gain: Interval  # tuned - default, paired by seed
    p_holm: float
    verdict: str
    diverged: tuple[int, int]  # seeds that diverged at default, tuned


def _diverged(entry: Mapping[str, Any]) -> int:
    return sum(bool(run["diverged"]) for run in entry["runs"])


def gain_rows(default: Runs, tuned: Runs) -> list[GainRow]:
    """Per optimizer (tuned's order): "tuned is better than default", tuned − default paired
    by seed, one-sided paired t, Holm across the optimizers."""
    names = list(tuned["optimizers"])
    defaults = [default["optimizers"][name] for name in names]
    tuneds = [tuned["optimizers"][name] for name in names]
    tests = [_test(accuracies(t), accuracies(d)) for d, t in zip(defaults, tuneds, strict=True)]
    p_holm, verdicts = _verdicts(tests)
    return [
        GainRow(
            name,
            mean_interval(list(accuracies(d).values())),
            mean_interval(list(accuracies(t).values())),
            test.one_sided.difference,
            p,
            said,
            (_diverged(d), _diverged(t)),
        )
        for name, d, t, test, p, said in zip(
            names, defaults, tuneds, tests, p_holm, verdicts, strict=True
        )
    ]


@dataclass(frozen=True)
class VersusRow:
    """The best tuned optimizer against one other: best - other, paired by seed."""

    name: str
    difference: Interval
    p_holm: float
    verdict: str


def versus_best(tuned: Runs) -> tuple[str, list[VersusRow]]:
    """The tuned optimizer with the highest mean test accuracy, and every other against it."""
    accs = {name: accuracies(entry) for name, entry in tuned["optimizers"].items()}
    means = {name: mean_interval(list(a.values())).mean for name, a in accs.items()}
    measured = [name for name in accs if not math.isnan(means[name])]
    if not measured:
        raise DataError("compare: every tuned run diverged; there is nothing to compare")
    # A diverged seed is a failure of its optimizer: the best is one whose every tuned seed
    # finished, so one lucky seed among diverged ones does not crown an optimizer.
    finished = [n for n in measured if len(accs[n]) == len(tuned["optimizers"][n]["runs"])]
    best = max(finished or measured, key=lambda name: means[name])
    others = [name for name in accs if name != best]
    tests = [_test(accs[best], accs[name]) for name in others]
    p_holm, verdicts = _verdicts(tests)
    rows = [
        VersusRow(name, test.one_sided.difference, p, v)
        for name, test, p, v in zip(others, tests, p_holm, verdicts, strict=True)
    ]
    return best, rows


def check_budgets(studies: Mapping[str, Any], counted: Mapping[str, int], budget: int) -> list[str]:
    """Refuse (DataError, one line) to compare studies whose budgets differ: one that holds
    fewer finished trials than ``budget``, or whose count in the storage (``counted``)
    differs from studies.json's. Notes for studies extended beyond the budget (their best
    was taken from their first ``budget`` finished trials, like every other's)."""
    rerun = "run `dvc repro compare/dvc.yaml` to top it up"
    notes = []
    for name, entry in studies["studies"].items():
        study, finished, count = entry["study"], entry["finished"], counted.get(name)
        if count is None:
            raise DataError(f"compare: study {study} ({name}) is not in the storage; {rerun}")
        if count != finished:
            raise DataError(
                f"compare: study {study} ({name}) holds {count} finished trials in the storage "
                f"but {finished} in compare/studies.json; {rerun}"
            )
        if count < budget:
            raise DataError(
                f"compare: study {study} ({name}) has {count} finished trials, fewer than "
                f"the budget {budget} (compare.budget): budgets that differ are not compared; "
                f"{rerun}"
            )
        if count > budget or entry.get("extended"):
            notes.append(
                f"{name}: its study {study} holds {count} finished trials (extended beyond the "
                f"budget); its best is from its first {budget}, as every other study's."
            )
    return notes


def _cell(interval: Interval, *, signed: bool = False) -> str:
    if interval.n == 0:
        return MISSING
    return f"{interval.format(signed=signed)} (n = {interval.n})"


def _settings(config: Mapping[str, Any]) -> str:
    optim, schedule = config["optim"], config["schedule"]
    parts = [f"lr {optim['lr']:.3g}"]
    for key in ("momentum", "rho", "weight_decay"):
        if optim.get(key):
            parts.append(f"{key} {optim[key]:.3g}")
    if "betas" in optim:
        parts.append("betas " + "/".join(f"{b:.4g}" for b in optim["betas"]))
    knobs = [
        f"{key} {value:.3g}"
        for key, value in schedule.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]
    parts.append(" ".join([schedule["name"], *knobs]))
    return ", ".join(parts)


def _trials(study: Mapping[str, Any], budget: int) -> str:
    """Finished trials (complete/pruned); an extended study's counted ones "6 of 9"."""
    finished = int(study["finished"])
    counted = f"{budget} of {finished}" if finished > budget else str(finished)
    return f"{counted} ({study['complete']}/{study['pruned']})"


def _gain_table(rows: Sequence[GainRow], tuned: Runs, studies: Mapping[str, Any]) -> list[str]:
    lines = [
        "| optimizer | default test acc | tuned test acc | tuned − default (paired) | p (Holm) | "
        "tuned better? | trials (complete/pruned) | trial epochs | trial s | tuned settings |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    budget = int(studies["budget"])
    for row in rows:
        study = studies["studies"][row.name]
        config = tuned["optimizers"][row.name]["config"]
        lines.append(
            f"| {row.name} | {_cell(row.default)} | {_cell(row.tuned)} | "
            f"{_cell(row.gain, signed=True)} | {format_p(row.p_holm)} | {row.verdict} | "
            f"{_trials(study, budget)} | {study['epochs']} | {study['seconds']:.0f} | "
            f"{_settings(config)} |"
        )
    return lines


def _versus_table(best: str, rows: Sequence[VersusRow]) -> list[str]:
    lines = [
        f"| optimizer | {best} − it, tuned (paired) | p (Holm) | {best} ahead? |",
        "|---|---:|---:|---|",
    ]
    lines += [
        f"| {r.name} | {_cell(r.difference, signed=True)} | {format_p(r.p_holm)} | {r.verdict} |"
        for r in rows
    ]
    return lines


def verdict_sentences(
    best: str, versus: Sequence[VersusRow], gains: Sequence[GainRow], seeds: int, budget: int
) -> list[str]:
    """The answer to "which optimizer is best?", claiming no more than the table."""
    ahead = [r.name for r in versus if r.verdict == "supported"]
    tied = [r.name for r in versus if r.verdict.startswith("inconclusive")]
    # Behind: the best by mean over its own seeds, yet behind on the seeds both finished
    # (possible only when seeds diverged); "not run": the other has no finished seed.
    behind = [r.name for r in versus if r.verdict == "contradicted"]
    setting = f"at n = {seeds} seeds and a budget of {budget} trials per optimizer"
    if not versus:
        answer = f"Only {best} was compared: there is no other optimizer to rank it against."
    elif len(ahead) == len(versus):
        answer = (
            f"**{best} is ahead of every other optimizer here** ({setting}; each lead "
            "supported after Holm): on this network, data and budget, not in general."
        )
    elif not ahead and not behind:
        answer = (
            f"**No optimizer is best here**: {best} has the highest mean tuned test accuracy, "
            f"but its lead over every other is inconclusive {setting}: as the lecture says, "
            "there is no best optimizer; the choice depends on the problem and the tuning."
        )
    else:
        answer = (
            f"**No single best optimizer here**: {best} has the highest mean tuned test "
            f"accuracy; it is ahead of {', '.join(ahead) or 'none'} (supported after Holm) "
            f"and cannot be told apart from {', '.join(tied) or 'none'} {setting}."
        )
        if behind:
            answer += (
                f" On the seeds both finished it is behind {', '.join(behind)} (seeds "
                "diverged: see the notes)."
            )
    absent = [r.name for r in versus if r.verdict == "not run"]
    if absent:
        answer += f" Not compared: {', '.join(absent)} (every tuned seed diverged)."
    helped = [r.name for r in gains if r.verdict == "supported"]
    hurt = [r.name for r in gains if r.verdict == "contradicted"]
    unmeasured = [r.name for r in gains if r.verdict == "not run"]
    tuning = (
        f"Tuning beat the Keras defaults for {len(helped)} of {len(gains)} optimizers "
        f"({', '.join(helped) or 'none'}; supported after Holm)"
    )
    tuning += f"; it was worse for {', '.join(hurt)}" if hurt else ""
    tuning += f"; not measured for {', '.join(unmeasured)} (diverged)" if unmeasured else ""
    tuning += (
        "; for the rest the difference is inconclusive."
        if len(helped) + len(hurt) + len(unmeasured) < len(gains)
        else "."
    )
    return [answer, tuning]


def render_report(
    default: Runs,
    tuned: Runs,
    studies: Mapping[str, Any],
    *,
    counted: Mapping[str, int],
    target_val_acc: float,
    profile_file: str,
) -> str:
    """compare/report.md (DataError first if the studies' budgets differ)."""
    budget = int(studies["budget"])
    notes = check_budgets(studies, counted, budget)
    gains = gain_rows(default, tuned)
    best, versus = versus_best(tuned)
    seeds = tuned["seeds"]
    lines = [
        "# Which optimizer is best?",
        "",
        f"Data set {tuned['dataset']}, network `{tuned['model']}`, at most {tuned['epochs']} "
        f"epochs per run; budget {budget} finished trials per study; {len(seeds)} seeds "
        f"({', '.join(map(str, seeds))}); profile target val_acc {target_val_acc:g}.",
        "",
        "Each optimizer ran at its Keras defaults and at the best configuration of its own "
        "Optuna study (the same budget and epoch cap for every optimizer, over its own "
        f"learning rate, knobs and the schedule; objective {studies['monitor']}), both over "
        "the same seeds: a seed gives every optimizer the same data order and initial "
        "weights, so they compare pairwise by seed. Test accuracy: mean ± the half-width of "
        "its 95 % Student-t interval over the seeds, and n; trials, epochs and seconds are "
        "each study's tuning cost.",
        "",
        "## Default and tuned",
        "",
        *_gain_table(gains, tuned, studies),
        "",
        f"## Against the best tuned optimizer: {best}",
        "",
        *_versus_table(best, versus),
        "",
        f"## Performance profile: fraction of seeds at val_acc ≥ {target_val_acc:g} by epoch",
        "",
        *profile_table(default, tuned, target_val_acc),
        "",
        f"![performance profile]({profile_file})",
        "",
        "## Verdict",
        "",
        *verdict_sentences(best, versus, gains, len(seeds), budget),
        "",
    ]
    diverged = [
        f"{r.name}: {d} of {len(seeds)} {s} seeds diverged (left out of its mean and pairs)."
        for r in gains
        for d, s in zip(r.diverged, ("default", "tuned"), strict=True)
        if d
    ]
    if notes or diverged:
        lines += ["Notes:", "", *(f"- {note}" for note in [*notes, *diverged]), ""]
    lines += [
        "Statistics: 95 % Student-t intervals over the seeds (n − 1 degrees of freedom); "
        "differences paired by seed (diverged seeds left out), one-sided paired t tests, "
        "Holm-corrected within each table. Supported: the corrected p below "
        f"{ALPHA:g} and the whole interval above 0; contradicted: the two-sided test, "
        "corrected the same way, rejects and the whole interval is below 0; anything else "
        "is inconclusive at its n.",
        "",
    ]
    return "\n".join(lines)


def compare_metrics(default: Runs, tuned: Runs, studies: Mapping[str, Any]) -> dict[str, Any]:
    """compare/metrics.json (dvc metrics): mean test accuracies and the best optimizer."""

    def means(runs: Runs) -> dict[str, float | None]:
        values = {n: list(accuracies(e).values()) for n, e in runs["optimizers"].items()}
        return {n: statistics.fmean(v) if v else None for n, v in values.items()}

    best, _ = versus_best(tuned)
    return {
        "test_acc": {"default": means(default), "tuned": means(tuned)},
        "best": best,
        "budget": studies["budget"],
        "seeds": len(tuned["seeds"]),
    }
