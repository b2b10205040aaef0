"""Names that become paths: one pattern, checked where each name enters (params.yaml keys,
tune.experiment, tune.study_name); the names deepopt itself uses all match it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from deepopt import paths
from deepopt.config import NAME_RULE, TuneSpace, check_name, parse_params, run_name
from deepopt.config.names import MAX_NAME_LENGTH, name_problem
from deepopt.errors import ConfigError
from deepopt.transfer.runs import PRETRAIN_RUN
from deepopt.tuning.space import derive_study_name

REPO = Path(__file__).resolve().parents[2]

BAD_NAMES = [
    "../x",
    "../../../../tmp/x",
    "a/b",
    "a\\b",
    "/tmp/x",
    "..",
    ".",
    "a..b",
    ".hidden",
    "-flag",
    "_x",
    "",
    " ",
    "a b",
    "a\nb",
    "café",
    "x" * (MAX_NAME_LENGTH + 1),
    "a:b",
    "*",
]


def _error(raw: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_params(raw)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_every_name_deepopt_uses_is_a_valid_name(base_params: dict[str, Any]) -> None:
    stages = yaml.safe_load((REPO / "transfer" / "dvc.yaml").read_text(encoding="utf-8"))
    names = [
        *base_params["experiments"],
        paths.BASE_EXPERIMENT,
        paths.BEST_EXPERIMENT,
        PRETRAIN_RUN,
        *stages["stages"],
        "x" * MAX_NAME_LENGTH,
    ]
    params = parse_params(base_params)
    start = params.base_run()
    for experiment in ("base", "nobn_ensemble", "x" * (MAX_NAME_LENGTH - 11)):
        names.append(derive_study_name(experiment, TuneSpace(), start, "0" * 64))
    for name in names:
        assert name_problem(name) is None, name
        assert check_name(name, "test") == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_name_that_is_not_a_plain_folder_name_is_refused(name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_name(name, "--experiment")
    message = str(caught.value)
    assert message.startswith(f"--experiment: {repr(name)[:117]}")
    assert message.endswith(f"allowed: {NAME_RULE}") and "\n" not in message


@pytest.mark.parametrize("name", ["../x", "a/b", "/tmp/x", ".git", "tune", "transfer"])
def test_experiment_keys_of_params_yaml_are_checked(base_params: dict[str, Any], name: str) -> None:
    raw = copy.deepcopy(base_params)
    raw["experiments"][name] = {}
    message = _error(raw)
    assert message.startswith(f"params.yaml: experiments: {name!r} ")
    reserved = name in ("tune", "transfer")
    assert ("is reserved" in message) == reserved
    assert reserved or message.endswith(NAME_RULE)


def test_a_key_that_is_not_a_string_is_refused(base_params: dict[str, Any]) -> None:
    raw = copy.deepcopy(base_params)
    raw["experiments"][5] = {}
    assert _error(raw).startswith("params.yaml: experiments: 5 is not a string but int")


@pytest.mark.parametrize(
    ("key", "value"),
    [("experiment", "../x"), ("experiment", "a/b"), ("study_name", "../../x"), ("study_name", "")],
)
def test_tune_names_are_checked(base_params: dict[str, Any], key: str, value: str) -> None:
    raw = copy.deepcopy(base_params)
    raw["tune"][key] = value
    assert _error(raw) == (
        f"params.yaml: tune.{key}: {value!r} "
        f"{'is empty' if not value else 'is not a plain name (names become folder names)'}; "
        f"allowed: {NAME_RULE}"
    )


def test_a_study_name_derived_from_a_long_experiment_must_fit(
    base_params: dict[str, Any],
) -> None:
    long = "x" * (MAX_NAME_LENGTH - 5)
    raw = copy.deepcopy(base_params)
    raw["experiments"][long] = {}
    raw["tune"]["experiment"] = long
    assert "would have 134 characters, more than 128" in _error(raw)
    raw["tune"]["study_name"] = "short"
    assert parse_params(raw).tune.study_name == "short"


def test_run_name_comes_from_the_option_the_file_name_or_the_default() -> None:
    assert run_name("small", None, "base") == "small"
    assert run_name(None, Path("params/best.yaml"), "base") == "best"
    assert run_name("train_best", Path("params/best.yaml"), "base") == "train_best"
    assert run_name(None, None, "base") == "base"
    with pytest.raises(ConfigError, match=r"^--overrides my best\.yaml \(its file name names"):
        run_name(None, Path("my best.yaml"), "base")
    with pytest.raises(ConfigError, match=r"^--experiment: '' is empty"):
        run_name("", None, "base")
    with pytest.raises(ConfigError, match=r"^--experiment: 'tune' is reserved"):
        run_name("tune", None, "base")
