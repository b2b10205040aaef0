"""params.yaml validation: every problem is one line naming the key path and what is allowed."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from deepopt.cli import main as cli_main
from deepopt.config import (
    OPTIMIZER_KNOBS,
    OPTIMIZER_NAMES,
    SCHEDULE_KNOBS,
    SCHEDULE_NAMES,
    Params,
    config_hash,
    load_overrides,
    load_params,
    parse_params,
    resolve_experiment,
    searchable_knobs,
)
from deepopt.errors import ConfigError


def _with(raw: dict[str, Any], section: str, **changes: Any) -> dict[str, Any]:
    changed = copy.deepcopy(raw)
    changed.setdefault(section, {}).update(changes)
    return changed


def _error(raw: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_params(raw)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_repository_params_load_and_match_the_lecture(base_params: dict[str, Any]) -> None:
    params = parse_params(base_params)
    run = params.base_run()
    assert (run.optim.name, run.optim.lr, run.optim.momentum) == ("nesterov", 0.02, 0.9)
    assert (run.train.batch_size, run.data.train_subset, run.data.val_fraction) == (50, 6000, 0.1)
    assert (run.early_stop.monitor, run.early_stop.min_delta, run.early_stop.patience) == (
        "val_loss",
        1e-4,
        5,
    )


def test_unknown_optimizer_lists_the_allowed_ones(base_params: dict[str, Any]) -> None:
    message = _error(_with(base_params, "optim", name="sgdd"))
    assert message == (
        "params.yaml: optim.name: 'sgdd' is not one of "
        "sgd, momentum, nesterov, adagrad, rmsprop, adam, adamw"
    )


def test_unknown_key_suggests_the_closest(base_params: dict[str, Any]) -> None:
    assert "optim.lrr: unknown key (did you mean 'lr'?)" in _error(
        _with(base_params, "optim", lrr=0.1)
    )
    raw = copy.deepcopy(base_params)
    raw["modle"] = {}
    assert "modle: unknown key (did you mean 'model'?)" in _error(raw)


@pytest.mark.parametrize(
    ("section", "changes", "expected"),
    [
        ("optim", {"lr": 0}, "optim.lr: 0"),
        ("optim", {"lr": -0.1}, "optim.lr: -0.1"),
        ("optim", {"momentum": 1.0}, "optim.momentum: 1.0"),
        ("early_stop", {"patience": -1}, "early_stop.patience: -1"),
        ("data", {"val_fraction": 0.0}, "data.val_fraction: 0.0"),
        ("data", {"val_fraction": 1.5}, "data.val_fraction: 1.5"),
        ("train", {"epochs": "many"}, "train.epochs: 'many'"),
        ("train", {"batch_size": 0}, "train.batch_size: 0"),
        ("model", {"activation": "gelu"}, "model.activation: 'gelu' is not one of relu"),
    ],
)
def test_wrong_values_name_key_and_value(
    base_params: dict[str, Any], section: str, changes: dict[str, Any], expected: str
) -> None:
    assert expected in _error(_with(base_params, section, **changes))


def test_knob_of_another_optimizer_is_an_error(base_params: dict[str, Any]) -> None:
    message = _error(_with(base_params, "optim", name="adam"))  # keeps momentum: 0.9
    expected = "optim.momentum: does not apply to optim.name 'adam' (its knobs: betas, eps, "
    assert expected + "eps_placement)" in message


def test_knob_of_another_schedule_is_an_error(base_params: dict[str, Any]) -> None:
    message = _error(_with(base_params, "schedule", name="linear", decay=1e-5))
    assert "schedule.decay: does not apply to schedule.name 'linear'" in message


def test_defaults_of_applicable_knobs_are_filled_in(base_params: dict[str, Any]) -> None:
    run = parse_params(_with(base_params, "schedule", name="inverse_time")).base_run()
    assert run.schedule.decay == 1e-5  # the lecture's Keras decay
    assert run.schedule.final_lr is None


def test_cosine_warmup_of_the_whole_run_fails_at_load_time(base_params: dict[str, Any]) -> None:
    # Checked by the run config, so a bad base config fails before any MLflow run opens.
    raw = _with(base_params, "schedule", name="cosine", warmup_epochs=5)
    raw["train"]["epochs"] = 5
    assert _error(raw) == (
        "params.yaml: schedule.warmup_epochs: 5 must be less than train.epochs (5) "
        "so the cosine phase has at least one epoch"
    )
    raw["train"]["epochs"], raw["experiments"] = 6, {}  # one cosine epoch after the warmup
    assert parse_params(raw).base_run().schedule.warmup_epochs == 5


def test_cosine_warmup_of_an_experiment_names_the_experiment(
    base_params: dict[str, Any],
) -> None:
    raw = copy.deepcopy(base_params)
    raw["experiments"] = {"short": {"schedule": {"name": "cosine", "warmup_epochs": 3}}}
    raw["experiments"]["short"]["train"] = {"epochs": 3}
    assert _error(raw).startswith(
        "params.yaml: experiments.short.schedule.warmup_epochs: 3 must be less than "
        "train.epochs (3)"
    )


def test_searchable_knobs_are_the_numeric_knobs_of_each_schedule() -> None:
    assert searchable_knobs("constant") == []
    assert searchable_knobs("linear") == ["final_lr", "horizon"]
    assert searchable_knobs("plateau") == ["factor", "patience", "min_delta", "cooldown", "min_lr"]
    assert searchable_knobs("cosine") == ["warmup_epochs", "min_lr"]
    for name in SCHEDULE_NAMES:
        assert set(searchable_knobs(name)) <= set(SCHEDULE_KNOBS[name])


def test_library_errors_are_folded_into_one_line(tmp_path: Path) -> None:
    path = tmp_path / "best.yaml"
    path.write_text("optim:\n  lr: 0.1\n\tname: sgd\n")  # a tab: a multi-line YAML error
    with pytest.raises(ConfigError) as caught:
        load_overrides(path)
    assert "\n" not in str(caught.value) and "YAML syntax error" in str(caught.value)


def test_empty_file_and_non_mapping_are_errors() -> None:
    assert "file is empty" in _error(None)
    assert "expected a mapping" in _error([1, 2])


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("seed: 1\noptim:\n  lr: [0.1\n  name: sgd\n")
    with pytest.raises(ConfigError, match=r"line \d+, column \d+: YAML syntax error"):
        load_params(path)


def test_experiment_overrides_resolve_with_the_new_variants_defaults(
    base_params: dict[str, Any],
) -> None:
    raw = copy.deepcopy(base_params)
    raw["experiments"] = {
        "adam": {"optim": {"name": "adam", "lr": 0.01}},
        "decay": {"schedule": {"name": "inverse_time"}, "train": {"epochs": 50}},
    }
    params = parse_params(raw)
    adam = resolve_experiment(params, "adam")
    assert (adam.optim.name, adam.optim.lr, adam.optim.momentum) == ("adam", 0.01, None)
    assert adam.optim.betas == (0.9, 0.999)
    decay = resolve_experiment(params, "decay")
    assert (decay.optim.momentum, decay.schedule.decay, decay.train.epochs) == (0.9, 1e-5, 50)


def test_experiment_with_unknown_key_names_its_path(base_params: dict[str, Any]) -> None:
    raw = copy.deepcopy(base_params)
    raw["experiments"] = {"bad": {"optim": {"lrr": 0.1}}}
    assert "experiments.bad.optim.lrr: unknown key (did you mean 'lr'?)" in _error(raw)
    raw["experiments"] = {"bad": {"data": {"name": "mnist"}}}
    assert "experiments.bad.data" in _error(raw)


def test_unknown_experiment_lists_the_known_ones(base_params: dict[str, Any]) -> None:
    params = parse_params(base_params)
    with pytest.raises(ConfigError, match=r"experiment .nope. is not in params\.yaml"):
        resolve_experiment(params, "nope")


def test_config_is_frozen_and_hash_is_stable(base_params: dict[str, Any]) -> None:
    params = parse_params(base_params)
    with pytest.raises(Exception, match="frozen"):
        params.seed = 1  # type: ignore[misc]
    assert config_hash(params) == config_hash(parse_params(copy.deepcopy(base_params)))
    assert config_hash(params) != config_hash(parse_params(_with(base_params, "optim", lr=0.03)))


def test_round_trip_through_yaml(base_params: dict[str, Any]) -> None:
    params = parse_params(base_params)
    dumped = yaml.safe_dump(params.model_dump(mode="json"))
    assert Params.model_validate(yaml.safe_load(dumped)) == params


def test_cli_reports_one_line_and_exit_2_and_writes_nothing(
    tmp_path: Path,
    base_params: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_with(base_params, "optim", name="sgdd")))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli_main(["prepare"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("deepopt: error: params.yaml: optim.name: 'sgdd' is not one of")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ---------------------------------------------------------------------------------------
# Property: any valid params.yaml survives load -> dump -> load unchanged

_OPTIM_KNOBS = {
    "momentum": st.floats(0.0, 0.99),
    "eps": st.floats(1e-12, 1e-2),
    "rho": st.floats(0.01, 0.99),
    "betas": st.lists(st.floats(0.0, 0.999), min_size=2, max_size=2),
    "initial_accumulator": st.floats(0.0, 100.0),
    "eps_placement": st.sampled_from(["keras", "torch"]),
}
_SCHEDULE_KNOBS = {
    "final_lr": st.floats(1e-8, 1.0),
    "horizon": st.none() | st.integers(1, 200),
    "decay": st.floats(1e-8, 0.99),
    "monitor": st.sampled_from(["val_loss", "val_acc"]),
    "factor": st.floats(0.01, 0.99),
    "patience": st.integers(0, 20),
    "min_delta": st.floats(0.0, 0.1),
    "cooldown": st.integers(0, 5),
    "min_lr": st.floats(1e-8, 0.1),  # cosine refuses 0
    "step_size": st.integers(1, 50),
    "gamma": st.floats(0.01, 1.0),
    "warmup_epochs": st.integers(0, 5),  # below every train.epochs drawn below
}


@st.composite
def _variant(
    draw: st.DrawFn, names: tuple[str, ...], knobs: dict[str, Any], values: dict[str, Any]
) -> dict[str, Any]:
    """A section naming one optimizer/schedule with a random subset of its own knobs."""
    name = draw(st.sampled_from(names))
    chosen = draw(st.lists(st.sampled_from(sorted(knobs[name]) or [""]), unique=True))
    return {"name": name, **{key: draw(values[key]) for key in chosen if key}}


_optim = (
    _variant(OPTIMIZER_NAMES, OPTIMIZER_KNOBS, _OPTIM_KNOBS)
    .flatmap(
        lambda section: st.fixed_dictionaries(
            {"lr": st.floats(1e-6, 10.0), "weight_decay": st.floats(0.0, 0.1)}
        ).map(lambda numbers: {**section, **numbers})
    )
    .filter(  # nesterov with momentum 0 is invalid (test_nesterov_without_momentum_is_...)
        lambda section: not (section["name"] == "nesterov" and section.get("momentum") == 0.0)
    )
)
_schedule = _variant(SCHEDULE_NAMES, SCHEDULE_KNOBS, _SCHEDULE_KNOBS)
_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12)
_params = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31 - 1),
        "data": st.fixed_dictionaries(
            {
                "name": st.sampled_from(["mnist", "fashion-mnist", "kmnist"]),
                "train_subset": st.none() | st.integers(20, 60000),
                "val_fraction": st.floats(0.01, 0.99),
            }
        ),
        "model": st.fixed_dictionaries(
            {
                "name": st.sampled_from(["lecture_cnn", "mlp"]),
                "batchnorm": st.booleans(),
                "activation": st.sampled_from(["relu", "sigmoid", "tanh"]),
                "dropout": st.floats(0.0, 0.9),
                "conv_channels": st.lists(st.integers(1, 64), min_size=3, max_size=3),
                "depth": st.integers(1, 12),
            }
        ),
        "optim": _optim,
        "schedule": _schedule,
        "early_stop": st.fixed_dictionaries(
            {
                "enabled": st.booleans(),
                "monitor": st.sampled_from(["val_loss", "val_acc"]),
                "patience": st.integers(0, 20),
                "mode": st.sampled_from(["auto", "min", "max"]),
            }
        ),
        "train": st.fixed_dictionaries(
            {
                "epochs": st.integers(6, 200),  # > any cosine warmup_epochs drawn
                "batch_size": st.integers(1, 512),
                "threads": st.none() | st.integers(1, 8),
                "ensemble": st.integers(1, 5),
                "precision": st.sampled_from(["fp32", "bf16", "fp16"]),
                "device": st.sampled_from(["auto", "cpu", "cuda", "cuda:1", "mps"]),
                "deterministic": st.booleans(),
            }
        ),
        "mlflow": st.fixed_dictionaries(
            {"experiment": _text, "log_model": st.booleans(), "system_metrics": st.booleans()}
        ),
        "matrix": st.fixed_dictionaries({"seeds": st.integers(1, 5)}),
        "experiments": st.dictionaries(
            st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True),
            st.one_of(
                st.just({}),
                _optim.map(lambda section: {"optim": section}),
                _schedule.map(lambda section: {"schedule": section}),
                st.integers(6, 50).map(lambda epochs: {"train": {"epochs": epochs}}),
            ),
            max_size=3,
        ),
    }
)


@settings(max_examples=60, deadline=None)
@given(raw=_params)
def test_any_valid_params_survive_load_dump_load(raw: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        first_file, second_file = Path(folder) / "params.yaml", Path(folder) / "dumped.yaml"
        first_file.write_text(yaml.safe_dump(raw), encoding="utf-8")
        first = load_params(first_file)
        dumped = yaml.safe_dump(first.model_dump(mode="json"))
        second_file.write_text(dumped, encoding="utf-8")
        second = load_params(second_file)
    assert second == first and config_hash(second) == config_hash(first)
    assert yaml.safe_dump(second.model_dump(mode="json")) == dumped  # a fixed point
    for name in raw["experiments"]:
        assert resolve_experiment(second, name) == resolve_experiment(first, name)


@pytest.mark.parametrize("section", ["optim", "schedule"])
@pytest.mark.parametrize("name", [[], {}, [1], None, 3])
def test_a_variant_name_that_is_not_text_is_one_line(
    base_params: dict[str, Any], section: str, name: Any
) -> None:
    # Found by the params.yaml fuzzer: optim.name [] was a TypeError traceback.
    message = _error(_with(base_params, section, name=name))
    assert message.startswith(f"params.yaml: {section}.name: {name!r} ")


def test_nesterov_without_momentum_is_a_config_error(base_params: dict[str, Any]) -> None:
    # Found by the params.yaml fuzzer: a ValueError traceback from torch.optim.SGD.
    assert _error(_with(base_params, "optim", momentum=0.0)) == (
        "params.yaml: optim.momentum: 0.0 is not allowed with nesterov (it needs momentum > 0); "
        "use momentum in (0, 1) or optim.name sgd"
    )
    assert parse_params(_with(base_params, "optim", name="momentum", momentum=0.0))
    raw = copy.deepcopy(base_params)
    raw["tune"]["space"]["momentum"] = {"low": 0.0, "high": 0.9}
    assert "tune.space.momentum: low 0 could draw momentum 0 for nesterov" in _error(raw)
