"""The compare section: its checks, each optimizer's defaults and study space, the params a
study's session runs with, and the tune space's new knobs (rho, betas) as trials draw them."""

from __future__ import annotations

from typing import Any

import optuna
import pytest

from deepopt.compare.studies import study_params
from deepopt.config import (
    KERAS_DEFAULTS,
    RunConfig,
    TuneSpace,
    parse_params,
    resolve_compare,
    resolve_experiment,
)
from deepopt.errors import ConfigError
from deepopt.tuning import derive_study_name, sample_overrides


def _params(base_params: dict[str, Any], **compare: Any) -> Any:
    raw = {**base_params, "compare": {**base_params["compare"], **compare}}
    return parse_params(raw, "params.yaml")


def test_each_optimizer_starts_from_keras_defaults(base_params: dict[str, Any]) -> None:
    params = _params(base_params)
    assert params.compare.optimizers == [
        "sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw"
    ]  # fmt: skip
    for name in params.compare.optimizers:
        config = resolve_compare(params, name)
        assert config.optim.name == name
        assert config.optim.lr == KERAS_DEFAULTS[name]["lr"]
        assert config.schedule.name == "constant"
        assert config.train.epochs == params.compare.epochs
        assert config.train.fit_on == "train"
        assert config.mlflow.experiment == "deepopt-compare"
        assert config.model == params.model  # the base network: every optimizer trains it
    assert resolve_compare(params, "sgd").optim.lr == 0.01
    assert resolve_compare(params, "adam").optim.lr == 0.001
    adamw = resolve_compare(params, "adamw").optim
    assert (adamw.weight_decay, adamw.betas, adamw.eps) == (0.004, (0.9, 0.999), 1e-7)
    rmsprop = resolve_compare(params, "rmsprop").optim
    assert (rmsprop.rho, rmsprop.momentum, rmsprop.eps) == (0.9, 0.0, 1e-7)
    assert resolve_compare(params, "nesterov").optim.momentum == 0.9


def test_compare_experiment_sets_the_network(base_params: dict[str, Any]) -> None:
    params = _params(base_params, experiment="bn_adam")
    config = resolve_compare(params, "sgd")
    # bn_adam's optimizer is replaced by the compared one; the rest of it stays.
    assert (config.optim.name, config.optim.lr, config.optim.betas) == ("sgd", 0.01, None)
    # An experiment's L2 penalty is not part of any optimizer's defaults.
    l2 = _params(base_params, experiment="nobn_l2")
    assert l2.experiments["nobn_l2"]["optim"]["weight_decay"] > 0
    assert resolve_compare(l2, "adam").optim.weight_decay == 0.0
    assert resolve_compare(l2, "adamw").optim.weight_decay == 0.004
    assert resolve_compare(l2, "adam").model == resolve_experiment(l2, "nobn_l2").model


def test_a_study_session_has_no_deadline(base_params: dict[str, Any]) -> None:
    # A session stopped by tune.timeout would leave one study short of the budget.
    raw = {**base_params, "tune": {**base_params["tune"], "timeout": 60}}
    assert study_params(parse_params(raw, "params.yaml"), "sgd").tune.timeout is None


@pytest.mark.parametrize(
    ("compare", "message"),
    [
        ({"optimizers": ["sgd", "adam", "sgd"]}, "compare.optimizers: sgd listed twice"),
        ({"optimizers": ["sgd"]}, "compare.optimizers"),
        ({"optimizers": ["sgd", "lion"]}, "compare.optimizers"),
        ({"experiment": "nope"}, "compare.experiment: 'nope' is not in experiments"),
        ({"experiment": "../x"}, "compare.experiment"),
        ({"budget": 0}, "compare.budget"),
        ({"seeds": 1}, "compare.seeds"),
        ({"storage": "redis://x"}, "compare.storage: 'redis://x' has an unknown scheme"),
        ({"space": {"momentum": {"low": 0.0, "high": 0.9}}}, "compare.space.momentum: low 0"),
        ({"space": {"beta1": {"low": 0.9, "high": 1.2}}}, "compare.space.beta1"),
        ({"space": {"rho": {"low": 0.5, "high": 1.0}}}, "compare.space.rho: high 1"),
        ({"epochs": 2}, "warmup_epochs: high 2 must be less than compare.epochs (2)"),
    ],
)
def test_bad_compare_settings_are_one_line_errors(
    base_params: dict[str, Any], compare: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        _params(base_params, **compare)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_each_study_searches_its_own_knobs(base_params: dict[str, Any]) -> None:
    params = _params(base_params)
    searched = {}
    for name in params.compare.optimizers:
        session = study_params(params, name)
        assert session.base_run() == resolve_compare(params, name)
        assert session.tune.n_trials == params.compare.budget
        assert session.tune.epochs == params.compare.epochs
        assert session.tune.storage == params.compare.storage
        assert session.tune.startup_trials == params.tune.startup_trials  # shared settings
        space = session.tune.space
        assert space.optimizer is None and not space.nesterov
        trial = optuna.trial.FixedTrial(
            {"lr": 0.01, "momentum": 0.8, "rho": 0.95, "beta1": 0.85, "beta2": 0.995,
             "weight_decay": 0.01, "schedule": "constant"}
        )  # fmt: skip
        searched[name] = sample_overrides(trial, space, name)["optim"]
    assert searched["sgd"] == {"lr": 0.01}
    assert searched["adagrad"] == {"lr": 0.01}
    assert searched["momentum"] == searched["nesterov"] == {"lr": 0.01, "momentum": 0.8}
    assert searched["rmsprop"] == {"lr": 0.01, "rho": 0.95}
    assert searched["adam"] == {"lr": 0.01, "betas": [0.85, 0.995]}
    assert searched["adamw"] == {"lr": 0.01, "weight_decay": 0.01, "betas": [0.85, 0.995]}


def test_one_beta_searched_keeps_the_other_default() -> None:
    space = TuneSpace(nesterov=False, beta2={"low": 0.99, "high": 0.9999})
    trial = optuna.trial.FixedTrial({"lr": 0.01, "beta2": 0.995, "schedule": "constant"})
    assert sample_overrides(trial, space, "adam")["optim"]["betas"] == [0.9, 0.995]
    # Knobs the optimizer lacks are not drawn.
    assert "betas" not in sample_overrides(trial, space, "sgd")["optim"]


def test_study_names_made_before_the_new_knobs_are_kept() -> None:
    # Computed by deepopt before TuneSpace had rho and betas: such a study still resumes.
    assert derive_study_name("base", TuneSpace(), RunConfig(), "abc123") == "base-0751f9fea2"
    searched = TuneSpace(rho={"low": 0.8, "high": 0.99})
    assert derive_study_name("base", searched, RunConfig(), "abc123") != "base-0751f9fea2"
