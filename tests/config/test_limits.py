"""Numbers at their edges: every number of the config at 0, negative, NaN, infinities, above
int64 and absurdly large is a one-line config error (key path, value, what is allowed)."""

from __future__ import annotations

import copy
import csv
import math
import shutil
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import annotated_types
import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from deepopt import cli
from deepopt.config import (
    OPTIMIZER_KNOBS,
    SCHEDULE_KNOBS,
    Params,
    SearchRange,
    parse_params,
    resolve_experiment,
    resolve_transfer,
)
from deepopt.config.limits import MAX_BATCH_VALUES, MAX_WEIGHTS, model_size
from deepopt.config.run import RUN_SECTIONS
from deepopt.errors import ConfigError


def _plain(annotation: Any, metadata: list[Any]) -> tuple[Any, list[Any]]:
    """``annotation`` without ``| None`` and ``Annotated``, with the constraints it carried."""
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            annotation = members[0]
    if get_origin(annotation) is Annotated:
        annotation, *extra = get_args(annotation)
        for item in extra:
            metadata = [*metadata, *(item.metadata if isinstance(item, FieldInfo) else [item])]
    return annotation, metadata


def numeric_fields(
    model: type[BaseModel], prefix: str = ""
) -> Iterator[tuple[str, type, list[Any]]]:
    """(dotted key path, int or float, constraints) of every number of ``model``'s schema;
    an entry of a tuple field is ``key.0``. Dict-valued fields (experiments, overrides,
    the search space's schedules) hold run configs or ranges, reached below."""
    for key, field in model.model_fields.items():
        annotation, metadata = _plain(field.annotation, list(field.metadata))
        path = f"{prefix}{key}"
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from numeric_fields(annotation, f"{path}.")
        elif annotation in (int, float):
            yield path, annotation, metadata
        elif get_origin(annotation) is tuple:
            entry, entry_metadata = _plain(get_args(annotation)[0], [])
            if entry in (int, float):
                yield f"{path}.0", entry, entry_metadata


FIELDS = list(numeric_fields(Params))


def _bound(metadata: list[Any], kind: type) -> float | None:
    for item in metadata:
        if isinstance(item, kind):
            return float(getattr(item, kind.__name__.lower()))
    return None


def edge_values(kind: type, metadata: list[Any]) -> list[Any]:
    """Values no number of the config accepts, given its type and constraints."""
    values: list[Any] = [math.nan, math.inf, -math.inf, 1e300, -1e300]
    if kind is int:
        values += [2**63, 2**64, -(2**63), 2.5, "many"]
    low = _bound(metadata, annotated_types.Ge)
    above = _bound(metadata, annotated_types.Gt)
    if low is not None:
        values.append(int(low) - 1 if kind is int else low - 1.0)
    if above is not None:
        values += [above, above - 1.0]
    high = _bound(metadata, annotated_types.Le)
    under = _bound(metadata, annotated_types.Lt)
    if high is not None:
        values.append(int(high) + 1 if kind is int else high * 2 + 1)
    if under is not None:
        values.append(under)
    return values


# Numbers a validator bounds rather than the field itself (class indices, Adam's betas), and
# the search ranges, which are checked against the knob they feed.
BOUNDED_ELSEWHERE = ("transfer.source.classes.0", "transfer.target.classes.0", "optim.betas.0")
SEARCH_SPACES = ("tune.space", "compare.space")
TUPLE_DEFAULTS: dict[str, list[Any]] = {"betas": [0.9, 0.999], "conv_channels": [4, 8, 8]}


def with_value(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``base`` with the number at ``path`` set to ``value`` (and what that number needs:
    the optimizer or schedule that has the knob, a search range to hold it)."""
    raw = copy.deepcopy(base)
    raw["experiments"] = {}
    *parents, last = path.split(".")
    if parents[:1] == ["optim"] and last in {k for v in OPTIMIZER_KNOBS.values() for k in v}:
        name = next(n for n, knobs in OPTIMIZER_KNOBS.items() if last in knobs)
        raw["optim"] = {"name": name, "lr": 0.01}
    if parents[:1] == ["schedule"] and last in {k for v in SCHEDULE_KNOBS.values() for k in v}:
        raw["schedule"] = {"name": next(n for n, k in SCHEDULE_KNOBS.items() if last in k)}
    if last == "0":  # a tuple entry: the first entry of a valid tuple
        *parents, last = parents
    node: Any = raw
    for key in parents:
        if node.get(key) is None:
            node[key] = {"low": 1e-5, "high": 1e-3} if path.startswith(SEARCH_SPACES) else {}
        node = node[key]
    if path.endswith(".0"):
        entries = list(node.get(last) or TUPLE_DEFAULTS.get(last, [1]))
        node[last] = [value, *entries[1:]]
    else:
        node[last] = value
    return raw


def test_the_schema_walk_finds_every_section() -> None:
    sections = {path.split(".")[0] for path, _, _ in FIELDS}
    assert sections >= {"seed", "data", "model", "optim", "schedule", "early_stop", "train"}
    assert sections >= {"matrix", "tune", "transfer"}
    assert len(FIELDS) >= 55


@pytest.mark.parametrize(("path", "kind", "metadata"), FIELDS, ids=[f[0] for f in FIELDS])
def test_every_number_refuses_its_edges_in_one_line(
    base_params: dict[str, Any], path: str, kind: type, metadata: list[Any]
) -> None:
    if not path.startswith(SEARCH_SPACES) and path not in BOUNDED_ELSEWHERE:
        assert any(isinstance(m, (annotated_types.Le, annotated_types.Lt)) for m in metadata), (
            f"{path} has no upper bound"
        )
    for value in edge_values(kind, metadata):
        raw = with_value(base_params, path, value)
        with pytest.raises(ConfigError) as caught:
            parse_params(raw)
        message = str(caught.value)
        assert "\n" not in message
        # The message names this key; a tuple's validator or a search range's check may
        # name the tuple or the range.
        parent = path.rsplit(".", 1)[0]
        named = path if not (path.endswith(".0") or path.startswith(SEARCH_SPACES)) else parent
        assert message.startswith(f"params.yaml: {named}"), (value, message)


# The numbers an experiment may override (not seed, data, matrix, tune or transfer).
RUN_FIELDS = [f for f in FIELDS if f[0].split(".")[0] in set(RUN_SECTIONS) - {"seed", "data"}]


@pytest.mark.parametrize("path", [f[0] for f in RUN_FIELDS])
def test_every_number_refuses_its_edges_inside_an_experiment(
    base_params: dict[str, Any], path: str
) -> None:
    section = path.split(".")[0]
    for value in (math.nan, math.inf, 2**63, 1e300):
        override = with_value({"experiments": {}}, path, value)
        override.pop("experiments")
        raw = copy.deepcopy(base_params)
        raw["experiments"] = {"edge": override}
        with pytest.raises(ConfigError) as caught:
            parse_params(raw)
        assert str(caught.value).startswith(f"params.yaml: experiments.edge.{section}")


@pytest.mark.parametrize(
    ("section", "changes", "expected"),
    [
        (
            "train",
            {"epochs": 0},
            "train.epochs: 0 is out of range; allowed: whole numbers >= 1 and <= 100000",
        ),
        (
            "train",
            {"epochs": 1e300},
            "train.epochs: 1e+300 is too large; allowed: whole numbers >= 1 and <= 100000",
        ),
        (
            "optim",
            {"lr": math.inf},
            "optim.lr: inf is not a finite number; allowed: finite numbers > 0.0 and <= 10.0",
        ),
        (
            "model",
            {"conv_channels": [0, 8, 8]},
            "model.conv_channels.0: 0 is out of range; allowed: whole numbers >= 1 and <= 65536",
        ),
        (
            "train",
            {"threads": 10**8},
            "train.threads: 100000000 is out of range; allowed: null or whole numbers >= 1 "
            "and <= 1024",
        ),
        (
            "tune",
            {"sampler_seed": -1},
            "tune.sampler_seed: -1 is out of range; allowed: null or whole numbers >= 0 and "
            "<= 2147483647",
        ),
        (
            "data",
            {"val_fraction": math.nan},
            "data.val_fraction: nan is not a finite number; allowed: finite numbers > 0.0 and "
            "< 1.0",
        ),
    ],
)
def test_the_message_names_the_key_the_value_and_the_range(
    base_params: dict[str, Any], section: str, changes: dict[str, Any], expected: str
) -> None:
    raw = copy.deepcopy(base_params)
    raw[section].update(changes)
    with pytest.raises(ConfigError) as caught:
        parse_params(raw)
    assert str(caught.value) == f"params.yaml: {expected}"


def test_a_search_range_is_finite_and_its_step_fits(base_params: dict[str, Any]) -> None:
    for key, value in (("low", math.nan), ("high", math.inf), ("step", math.nan)):
        raw = copy.deepcopy(base_params)
        raw["tune"]["space"]["lr"] = {"low": 0.01, "high": 0.1, key: value}
        with pytest.raises(ConfigError, match=rf"^params\.yaml: tune\.space\.lr\.{key}: "):
            parse_params(raw)
    raw = copy.deepcopy(base_params)
    raw["tune"]["space"]["lr"] = {"low": 0.01, "high": 0.1, "step": 1.0}
    with pytest.raises(ConfigError, match="step 1 is more than high - low"):
        parse_params(raw)
    assert SearchRange(low=0.01, high=0.1, step=0.01).step == 0.01


@pytest.mark.parametrize(
    ("model", "train", "expected"),
    [
        (
            {"conv_channels": [65536, 65536, 65536]},
            {},
            "model: lecture_cnn with conv_channels [65536, 65536, 65536], dense_units 50 has "
            "about 2.1e+11 weights, more than the 1e+09 allowed",
        ),
        (
            {"name": "mlp", "depth": 2000, "width": 65536},
            {},
            "model: mlp with depth 2000, width 65536 has about 8.6e+12 weights",
        ),
        (
            {"conv_channels": [1000, 1000, 1000]},
            {"batch_size": 100000},
            "train.batch_size: 100000 images x about 294050 layer outputs each (lecture_cnn "
            "with conv_channels [1000, 1000, 1000], dense_units 50) are 2.9e+10 values",
        ),
        (
            {"name": "resnet", "depth": 20, "base_channels": 256},
            {"eval_batch_size": 10000},
            "train.eval_batch_size: 10000 images x about",
        ),
    ],
)
def test_a_model_or_batch_that_would_not_fit_in_memory_is_refused(
    base_params: dict[str, Any], model: dict[str, Any], train: dict[str, Any], expected: str
) -> None:
    raw = copy.deepcopy(base_params)
    raw["experiments"] = {}
    raw["model"].update(model)
    raw["train"].update(train)
    with pytest.raises(ConfigError) as caught:
        parse_params(raw)
    assert str(caught.value).startswith(f"params.yaml: {expected}")


def test_every_network_of_the_repository_fits_with_room(base_params: dict[str, Any]) -> None:
    params = parse_params(base_params)
    configs = [resolve_experiment(params, name) for name in params.experiments]
    configs += [params.base_run(), resolve_transfer(params)]
    for config in configs:
        model = config.model
        weights, outputs = model_size(
            model.name,
            (1, 28, 28),
            10,
            conv_channels=model.conv_channels,
            dense_units=model.dense_units,
            depth=model.depth,
            width=model.width,
            base_channels=model.base_channels,
        )
        assert weights < MAX_WEIGHTS / 1000
        assert 10_000 * outputs < MAX_BATCH_VALUES  # batches of 10,000 images fit


def test_the_estimate_counts_the_lectures_network() -> None:
    # Conv 1->10, 10->40, 40->80 (5x5), dense 3920->50, logits 50->10, without biases.
    weights, outputs = model_size(
        "lecture_cnn",
        (1, 28, 28),
        10,
        conv_channels=(10, 40, 80),
        dense_units=50,
        depth=8,
        width=128,
        base_channels=16,
    )
    assert weights == 25 * (10 + 400 + 3200) + 3920 * 50 + 500
    assert outputs == 10 * 14 * 14 + 40 * 7 * 7 + 80 * 7 * 7 + 50


def test_a_finetune_epoch_that_would_not_fit_is_refused(base_params: dict[str, Any]) -> None:
    raw = copy.deepcopy(base_params)
    raw["transfer"]["finetune_min_batches"] = 100_000
    with pytest.raises(ConfigError) as caught:
        parse_params(raw)
    assert str(caught.value) == (
        "params.yaml: transfer.finetune_min_batches: 100000 batches of 50 images "
        "(train.batch_size) make fine-tune epochs of 5000000 images, more than the 1000000 "
        "allowed (held in memory); lower either"
    )


def test_the_repository_params_are_far_from_every_bound(base_params: dict[str, Any]) -> None:
    params = parse_params(base_params)
    assert params.train.epochs * 10 <= 100_000 and params.seed < 2**31 - 1


# ---------------------------------------------------------------------------------------
# The holes found through the CLI before these bounds (tiny workspace, `train --experiment
# small`): each was a traceback, a crash, a hang or an exit 3 after training had started.

HOLES = [
    # RuntimeError "expected weight to be at least 1 at dimension 0" deep in torch
    ("model", {"conv_channels": [0, 8, 8]}, "model.conv_channels.0: 0 is out of range"),
    # exit 3 "diverged ... try a lower optim.lr" after the first epoch started
    ("optim", {"lr": math.inf}, "optim.lr: inf is not a finite number"),
    ("optim", {"lr": 1e10}, "optim.lr: 10000000000.0 is out of range"),
    ("optim", {"weight_decay": math.inf}, "optim.weight_decay: inf is not a finite number"),
    ("optim", {"weight_decay": 1e300}, "optim.weight_decay: 1e+300 is out of range"),
    ("schedule", {"name": "linear", "final_lr": math.inf}, "schedule.final_lr: inf is not"),
    # the process crashed (SIGSEGV) in torch.set_num_threads
    ("train", {"threads": 10**8}, "train.threads: 100000000 is out of range"),
    # trained on: 2**63 epochs, 10**11 ensemble members (the command never ended)
    ("train", {"epochs": 2**63}, "train.epochs: 9223372036854775808 is out of range"),
    ("train", {"ensemble": 10**11}, "train.ensemble: 100000000000 is out of range"),
    # ValueError "Overflow when unpacking long long" (a traceback) at prepare
    ("seed", 2**64, "seed: 18446744073709551616 is out of range"),
    # tune: ValueError "expected non-negative integer" from numpy (a traceback)
    ("tune", {"sampler_seed": -1}, "tune.sampler_seed: -1 is out of range"),
    # accepted, and an early stopping that can never see an improvement
    ("early_stop", {"min_delta": math.inf}, "early_stop.min_delta: inf is not a finite number"),
]


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
    }


@pytest.mark.parametrize(
    ("section", "change", "expected"), HOLES, ids=[h[2].split(":")[0] for h in HOLES]
)
def test_the_holes_found_are_config_errors_before_anything_runs(
    workspace: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
    section: str,
    change: Any,
    expected: str,
) -> None:
    work = workspace(mlflow={"log_model": False})
    params = yaml.safe_load((work / "params.yaml").read_text(encoding="utf-8"))
    if isinstance(change, dict):
        params[section].update(change)
    else:
        params[section] = change
    (work / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    before = _files(work.parent)
    capsys.readouterr()
    for argv in (["train", "--experiment", "small"], ["prepare"], ["tune"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err == f"deepopt: error: params.yaml: {err.split('params.yaml: ', 1)[1]}"
        assert err.startswith(f"deepopt: error: params.yaml: {expected}") and err.count("\n") == 1
    assert _files(work.parent) == before


@pytest.mark.slow
def test_a_batch_larger_than_the_training_split_trains_one_batch_of_all_of_it(
    workspace: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """450 training images: batch_size 5,000 trains exactly as batch_size 450 does, one
    step per epoch on the whole split (same seed, so the same histories)."""
    histories = []
    for batch_size in (450, 5_000):
        work = workspace(
            mlflow={"log_model": False},
            train={"epochs": 2, "threads": 1, "batch_size": batch_size},
            early_stop={"enabled": False},
        )
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
        assert cli.main(["train", "--experiment", "small"]) == 0, capsys.readouterr().err
        history = (work / "plots" / "small" / "history.csv").read_text(encoding="utf-8")
        histories.append(list(csv.DictReader(history.splitlines())))
    assert len(histories[0]) == len(histories[1]) == 2
    for full, larger in zip(*histories, strict=True):
        for key in ("loss", "val_loss", "val_acc"):
            assert float(larger[key]) == pytest.approx(float(full[key]), rel=1e-4), key
