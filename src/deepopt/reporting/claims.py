"""The lecture's claims as data, one row each, and their evaluation on this run's
experiments (pure): the paired difference over replicas with its 95 % t interval, the
paired t test's p-value, Holm's correction across the whole table, and a verdict
(``deepopt.stats``).

A claim compares experiment ``a`` with experiment ``b`` replica by replica (replica r of
both trained with seed + r: the same data order and, where the architectures match, the
same initial weights), or ``a`` alone with a reference value (a one-sample test). A claim
whose experiments are absent from the run is "not run"; one with a single replica is
"inconclusive at n = 1".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from deepopt.reporting.results import (
    ExperimentResult,
    replica_means,
    replica_test_acc,
    train_runs,
)
from deepopt.stats import (
    PairedResult,
    holm,
    one_sample,
    paired_difference,
    verdict,
    wilcoxon_p,
)

__all__ = [
    "CLAIMS",
    "MEASURES",
    "NON_INFERIORITY_MARGIN",
    "SPARSITY_REFERENCE",
    "Claim",
    "ClaimRow",
    "Measure",
    "evaluate_claims",
    "lecture_claims",
]

# "No worse" for test accuracy: at most half a percentage point below (the lecture's four
# constant/decaying runs lie within 0.0006 of each other; a seed moves a row by more).
NON_INFERIORITY_MARGIN = 0.005
# "Most nodes will output zero": more than half of a ReLU layer's outputs are exactly 0.
SPARSITY_REFERENCE = 0.5


@dataclass(frozen=True)
class Measure:
    """What a claim measures, per replica (an ensemble's replica: its members' mean, test
    accuracy the ensemble's own)."""

    label: str
    digits: int  # decimals of the report's difference column
    per_replica: Callable[[ExperimentResult], dict[int, float]]


def _run_value(
    value: Callable[[Mapping[str, Any]], float],
) -> Callable[[ExperimentResult], dict[int, float]]:
    """A measure from train.json's runs: ``value`` of each run, its members' mean."""
    return lambda result: replica_means(train_runs(result), value)


def _number(run: Mapping[str, Any], key: str) -> float:
    value = run.get(key)
    return float(value) if isinstance(value, int | float) else math.nan


def _layers(run: Mapping[str, Any], key: str) -> list[float]:
    layers = run.get(key)
    return [float(v) for v in layers.values()] if isinstance(layers, dict) else []


def _log10_first_grad_norm(run: Mapping[str, Any]) -> float:
    norms = _layers(run, "final_grad_norm")  # layers in forward order: [0] is the first
    return math.log10(norms[0]) if norms and norms[0] > 0 else math.nan


def _mean_zero_fraction(run: Mapping[str, Any]) -> float:
    fractions = _layers(run, "final_zero_fraction")  # ReLU layers only, all hidden
    return sum(fractions) / len(fractions) if fractions else math.nan


MEASURES: dict[str, Measure] = {
    "test_acc": Measure("test acc", 4, replica_test_acc),
    "final_loss": Measure(
        "final train loss", 4, _run_value(lambda run: _number(run, "final_loss"))
    ),
    "log10_first_grad_norm": Measure(
        "log10 gradient norm, first layer (last epoch)", 2, _run_value(_log10_first_grad_norm)
    ),
    "zero_fraction": Measure(
        "fraction of zero ReLU outputs, mean over layers (last epoch)",
        3,
        _run_value(_mean_zero_fraction),
    ),
}


@dataclass(frozen=True)
class Claim:
    """One claim: mean(a - b) on ``measure`` lies on ``side`` of -margin (margin 0: a
    directional claim "a > b" or "a < b"; margin > 0 with side "greater": "a is no worse
    than b"); with ``b`` None, a one-sample claim on a - ``reference``."""

    text: str
    a: str
    b: str | None
    measure: str  # a key of MEASURES
    side: Literal["greater", "less"]
    lecture: str  # the lecture's own figures, or what it says
    margin: float = 0.0
    reference: float = math.nan  # one-sample claims only


def _no_worse(schedule: str, name: str, lecture: str) -> Claim:
    return Claim(
        f"{schedule} is no worse than a constant rate, margin {NON_INFERIORITY_MARGIN:g}",
        name,
        "bn_sgd_earlystop",
        "test_acc",
        "greater",
        f"{lecture} vs 0.9804",
        margin=NON_INFERIORITY_MARGIN,
    )


def _regularizer(what: str, name: str, lecture: str) -> Claim:
    return Claim(
        f"{what} improves the plain no-BN network",
        name,
        "nobn",
        "test_acc",
        "greater",
        f"{lecture} (no plain figure)",
    )


def _sparse(name: str) -> Claim:
    return Claim(
        "ReLU outputs are sparse (most nodes output zero)",
        name,
        None,
        "zero_fraction",
        "greater",
        "“most nodes will output zero”",
        reference=SPARSITY_REFERENCE,
    )


# The lecture's claims, as this run's experiments (params.yaml) test them; the sparsity
# claim gets one row per experiment that recorded zero fractions (lecture_claims).
CLAIMS: tuple[Claim, ...] = (
    Claim(
        "batchnorm improves the lecture CNN",
        "bn_sgd_earlystop",
        "nobn",
        "test_acc",
        "greater",
        "0.9804 vs 0.966–0.970 (no-BN rows)",
    ),
    Claim(
        "batchnorm beats the best no-BN row, the ensemble",
        "bn_sgd_earlystop",
        "nobn_ensemble",
        "test_acc",
        "greater",
        "0.9804 vs 0.970",
    ),
    Claim(
        "ReLU keeps the gradient alive in a deep network where sigmoid loses it",
        "vanishing_relu",
        "vanishing_sigmoid",
        "log10_first_grad_norm",
        "greater",
        "vanishing gradient (no figure)",
    ),
    Claim(
        "BN helps the deep ReLU MLP further",
        "vanishing_relu_bn",
        "vanishing_relu",
        "test_acc",
        "greater",
        "—",
    ),
    _no_worse("inverse-time decay", "bn_sgd_decay", "0.9805"),
    _no_worse("ReduceLROnPlateau", "bn_sgd_plateau", "0.9803"),
    _no_worse("linear decay", "bn_sgd_linear", "0.9799"),
    Claim(
        "Adam at lr 0.01 is worse than Nesterov SGD",
        "bn_adam",
        "bn_sgd_earlystop",
        "test_acc",
        "less",
        "0.9608 vs 0.9804",
    ),
    _regularizer("L2 regularization", "nobn_l2", "0.966"),
    _regularizer("dropout", "nobn_dropout", "0.968"),
    _regularizer("an ensemble", "nobn_ensemble", "0.970"),
    Claim(
        "skip connections let a deep network train better",
        "resnet_20",
        "plain_20",
        "final_loss",
        "less",
        "— (He et al. 2016)",
    ),
)

_SPARSE_FIRST = "vanishing_relu"  # the lecture's deep ReLU network: always a row


def lecture_claims(results: Mapping[str, ExperimentResult]) -> list[Claim]:
    """CLAIMS, with the sparsity claim after the vanishing-gradient ones: for
    vanishing_relu (shown "not run" when absent), then for every other experiment whose
    train.json has zero fractions (ReLU layers with train.diagnostics), in run order."""
    recorded = [
        name
        for name, result in results.items()
        if name != _SPARSE_FIRST and any("final_zero_fraction" in run for run in train_runs(result))
    ]
    sparse = [_sparse(name) for name in (_SPARSE_FIRST, *recorded)]
    split = next(i for i, claim in enumerate(CLAIMS) if claim.a == "vanishing_relu_bn") + 1
    return [*CLAIMS[:split], *sparse, *CLAIMS[split:]]


@dataclass(frozen=True)
class ClaimRow:
    """A claim evaluated; ``result`` None when its experiments did not run."""

    claim: Claim
    result: PairedResult | None  # the one-sided test of the claimed side
    p_holm: float  # result's p, Holm-adjusted across the table
    verdict: str
    wilcoxon: float  # signed-rank p of the same pairs and side, unadjusted
    note: str  # e.g. the replicas paired when the two experiments ran different numbers

    @property
    def n(self) -> int:
        return 0 if self.result is None else self.result.n


@dataclass(frozen=True)
class _Tested:
    claimed: PairedResult
    two_sided: PairedResult
    wilcoxon: float
    note: str


def _unmeasured(claim: Claim, values: Mapping[str, Mapping[int, float]]) -> str:
    """Why the claim cannot be tested although its experiments ran, or "": an experiment
    without the measure in any replica (trained with train.diagnostics off, or every
    replica diverged). Replicas missing from one side only are paired over the rest."""
    missing = [f"`{name}`" for name, per_replica in values.items() if not per_replica]
    if not missing:
        return ""
    label = MEASURES[claim.measure].label
    return f"no {label} in {' or '.join(missing)} (train.diagnostics off, or diverged)"


def _test(claim: Claim, results: Mapping[str, ExperimentResult]) -> _Tested | str | None:
    """The claim's tests; None when an experiment did not run, a reason when it ran but
    did not record the measure."""
    names = [claim.a] if claim.b is None else [claim.a, claim.b]
    if any(name not in results for name in names):
        return None
    measure = MEASURES[claim.measure].per_replica
    a = measure(results[claim.a])
    unmeasured = _unmeasured(claim, {name: measure(results[name]) for name in names})
    if unmeasured:
        return unmeasured
    if claim.b is None:
        values = [a[r] for r in sorted(a)]
        if not values:
            return None
        tests = [
            one_sample(values, claim.reference, alternative=side, margin=claim.margin)
            for side in (claim.side, "two-sided")
        ]
        return _Tested(tests[0], tests[1], math.nan, "")
    b = measure(results[claim.b])
    common = sorted(a.keys() & b.keys())
    if not common:
        return None
    note = ""
    if len(a) != len(b) or len(common) != len(a):
        note = (
            f"paired over the {len(common)} replica(s) both measured "
            f"(`{claim.a}` has {len(a)}, `{claim.b}` {len(b)})"
        )
    first, second = [a[r] for r in common], [b[r] for r in common]
    claimed, two_sided = (
        paired_difference(first, second, alternative=side, margin=claim.margin)
        for side in (claim.side, "two-sided")
    )
    signed = wilcoxon_p(first, second, alternative=claim.side, margin=claim.margin)
    return _Tested(claimed, two_sided, signed, note)


def evaluate_claims(
    claims: Sequence[Claim], results: Mapping[str, ExperimentResult]
) -> list[ClaimRow]:
    """Each claim's test and verdict (pure). Holm's correction runs over the table: over
    the claimed-side p-values for "supported", and over the two-sided ones (at the same
    boundary, -margin) for "contradicted"."""
    tested = [_test(claim, results) for claim in claims]
    p_claimed = holm([t.claimed.p_value if isinstance(t, _Tested) else math.nan for t in tested])
    p_two_sided = holm(
        [t.two_sided.p_value if isinstance(t, _Tested) else math.nan for t in tested]
    )
    rows = []
    for claim, test, p_holm, p_against in zip(claims, tested, p_claimed, p_two_sided, strict=True):
        if test is None:
            rows.append(ClaimRow(claim, None, math.nan, "not run", math.nan, ""))
            continue
        if isinstance(test, str):
            rows.append(ClaimRow(claim, None, math.nan, "not measured", math.nan, test))
            continue
        judged = verdict(
            test.claimed.difference,
            p_holm=p_holm,
            p_two_sided_holm=p_against,
            side=claim.side,
            margin=claim.margin,
        )
        rows.append(ClaimRow(claim, test.claimed, p_holm, judged, test.wilcoxon, test.note))
    return rows
