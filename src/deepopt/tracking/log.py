"""Recording into an MLflow run: params, per-epoch metrics, tags, artifacts, figures, the
prepared data as input, and the trained model as an MLflow 3 LoggedModel."""

from __future__ import annotations

import functools
import json
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

from deepopt.errors import TrackingError
from deepopt.tracking.provenance import pip_requirements
from deepopt.tracking.store import _call, _client

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import nn

__all__ = [
    "flatten_params",
    "log_artifact",
    "log_dataset",
    "log_dict",
    "log_epoch",
    "log_figure",
    "log_metrics",
    "log_model",
    "log_params",
    "log_series",
    "logged_epochs",
    "set_tags",
]

_PARAMS_PER_BATCH = 100  # MLflow's log_batch limit
_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit


def flatten_params(nested: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"optim": {"lr": 0.02}}`` -> ``{"optim.lr": "0.02"}``; values as in params.yaml
    (JSON: true, null, [10, 40, 80]), strings unquoted."""
    flat: dict[str, str] = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        elif isinstance(value, str):
            flat[name] = value
        else:
            flat[name] = json.dumps(_plain(value))
    return flat


def _plain(value: Any) -> Any:
    """``value`` as JSON-serializable data: mappings, sequences and scalars kept, else str."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def log_params(run_id: str, params: Mapping[str, Any]) -> None:
    """Log (nested) params under dotted names. Re-logging equal values, as a resumed run
    does, is a no-op; a different value for a logged name is a TrackingError (MLflow
    params are immutable: changed settings need a new run)."""
    flat = flatten_params(params)
    client = _client()
    logged = _call(f"get run {run_id}", lambda: client.get_run(run_id)).data.params
    for key, value in flat.items():
        if key in logged and logged[key] != value:
            raise TrackingError(
                f"MLflow run {run_id}: param '{key}' was logged as {logged[key]!r}, now "
                f"{value!r}; a changed config needs a new run (delete its checkpoint)"
            )
    new = [Param(key, value) for key, value in flat.items() if key not in logged]
    for start in range(0, len(new), _PARAMS_PER_BATCH):
        _call(
            f"log params of run {run_id}",
            functools.partial(
                client.log_batch, run_id, params=new[start : start + _PARAMS_PER_BATCH]
            ),
        )


def log_epoch(run_id: str, epoch: int, metrics: Mapping[str, float]) -> None:
    """All of one epoch's metrics in one call, at ``step=epoch``."""
    log_metrics(run_id, metrics, step=epoch)


def log_metrics(run_id: str, metrics: Mapping[str, float], *, step: int = 0) -> None:
    """Metrics at one step (e.g. test metrics of a finished run at step 0)."""
    now_ms = int(time.time() * 1000)
    _send_metrics(run_id, [Metric(key, float(v), now_ms, step) for key, v in metrics.items()])


def _send_metrics(run_id: str, batch: Sequence[Metric]) -> None:
    """``batch`` in MLflow's largest log_batch calls (each retried as every call here)."""
    client = _client()
    for start in range(0, len(batch), _METRICS_PER_BATCH):
        _call(
            f"log metrics of run {run_id}",
            functools.partial(
                client.log_batch, run_id, metrics=batch[start : start + _METRICS_PER_BATCH]
            ),
        )


def log_series(run_id: str, series: Mapping[str, Sequence[float]]) -> None:
    """Whole curves at once: value ``i`` of each key at ``step=i`` (e.g. an LR range test's
    rate and loss per batch), in MLflow's largest batches instead of a call per step."""
    now_ms = int(time.time() * 1000)
    batch = [
        Metric(key, float(value), now_ms, step)
        for key, values in series.items()
        for step, value in enumerate(values)
    ]
    _send_metrics(run_id, batch)


def logged_epochs(run_id: str, key: str) -> set[int]:
    """The steps at which ``key`` was logged: a resumed run re-logs the epochs a kill lost."""
    history = _call(
        f"read metric '{key}' of run {run_id}", lambda: _client().get_metric_history(run_id, key)
    )
    return {int(metric.step) for metric in history}


def set_tags(run_id: str, tags: Mapping[str, str]) -> None:
    """Set (or overwrite) string tags in one call."""
    batch = [RunTag(key, str(value)) for key, value in tags.items()]
    if batch:
        _call(f"set tags of run {run_id}", lambda: _client().log_batch(run_id, tags=batch))


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Copy a local file or folder into the run's artifacts (under ``artifact_path``)."""
    if not Path(path).exists():
        raise TrackingError(f"artifact {path} does not exist; nothing logged to run {run_id}")
    _call(
        f"log artifact {path} to run {run_id}",
        lambda: _client().log_artifact(run_id, str(path), artifact_path),
    )


def log_figure(run_id: str, figure: Figure, artifact_file: str) -> None:
    """A matplotlib figure as an image artifact, e.g. ``"history.png"`` (format from the
    extension). Already-written PNG files go through ``log_artifact``."""
    _call(
        f"log figure {artifact_file} to run {run_id}",
        lambda: _client().log_figure(run_id, figure, artifact_file),
    )


def log_dict(run_id: str, data: Mapping[str, Any], artifact_file: str) -> None:
    """A JSON/YAML artifact (by extension), e.g. the resolved config as ``config.json``."""
    _call(
        f"log {artifact_file} to run {run_id}",
        lambda: _client().log_dict(run_id, dict(data), artifact_file),
    )


def log_dataset(
    run_id: str,
    name: str,
    features: np.ndarray,
    targets: np.ndarray | None = None,
    *,
    source: str | Path,
    digest: str | None = None,
    context: str = "training",
) -> None:
    """Record a prepared split as the run's input dataset (the "Datasets used" of the run).

    ``digest`` ties it to the prepared files (e.g. meta.json's ``digest``); without it
    MLflow hashes the arrays. Give each split its own ``name``: MLflow keeps one input per
    (name, digest) and run. Logging the same dataset again (a resumed run) adds nothing.
    """
    from mlflow.data.numpy_dataset import from_numpy
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    with warnings.catch_warnings():
        # MLflow registers its local-file source for both "" and "file:" and then warns
        # that a path matches two (identical) sources.
        warnings.filterwarnings("ignore", message="The specified dataset source can be")
        dataset = from_numpy(
            features,
            source=str(source),
            targets=targets,  # type: ignore[arg-type]  # MLflow's annotation omits its None default
            name=name,
            digest=digest,
        )
    entry = DatasetInput(
        dataset=Dataset(**dataset.to_dict()),
        tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)],
    )
    what = f"log dataset '{name}' to run {run_id}"
    try:
        _call(what, lambda: _client().log_inputs(run_id, datasets=[entry]))
    except TrackingError as err:
        # Two processes (tune's workers) logging the same new dataset at once: MLflow looks
        # it up, both insert it, one insert breaks the unique key. The dataset is there now:
        # once more links this run to it.
        if not _duplicate_key(err):
            raise
        _call(what, lambda: _client().log_inputs(run_id, datasets=[entry]))


def _duplicate_key(error: TrackingError) -> bool:
    """A database's unique-key violation (sqlite, PostgreSQL, MySQL) behind ``error``."""
    text = f"{error} {error.__cause__}"
    return any(
        marker in text
        for marker in ("UNIQUE constraint failed", "duplicate key value", "Duplicate entry")
    )


def log_model(
    run_id: str,
    model: nn.Module,
    input_example: np.ndarray,
    *,
    epoch: int | None = None,
    name: str = "model",
) -> str:
    """Log ``model`` as an MLflow 3 LoggedModel of the run; return its ``models:/`` URI.

    The model is created in the run's experiment and linked to the run as an output:
    ``mlflow ui`` lists it in the run's "Logged models" section and the experiment's
    "Models" tab (not the run's Artifacts tab); it loads with
    ``mlflow.pytorch.load_model("models:/<model_id>")`` (``runs:/<run_id>/model`` no longer
    resolves), and the run's ``model_uri`` tag points at it.

    With a signature inferred from ``input_example`` and the model's output on it, the
    example itself (and MLflow's serving form of it), and explicit pip pins (no requirement
    inference). Saved as ``pt2`` (``torch.export``: loads without deepopt's code and without
    unpickling; the first call in a process pays ~2 s importing torch.export, later ones
    ~0.3 s). The metrics at step ``epoch`` (default: the last logged step) are linked to the
    model in the UI's Models tab. The model runs in eval mode and is left in the mode it
    came in.
    """
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    client = _client()
    run = _call(f"get run {run_id}", lambda: client.get_run(run_id))
    step = epoch if epoch is not None else _last_logged_step(run_id, list(run.data.metrics))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(torch.from_numpy(input_example)).numpy()
        signature = infer_signature(input_example, output)
        # Created here rather than by log_model, which would file it under the fluent
        # "current" experiment (Default, artifacts in the working folder), not the run's.
        logged = _call(
            f"create logged model for run {run_id}",
            lambda: client.create_logged_model(
                experiment_id=run.info.experiment_id,
                name=name,
                source_run_id=run_id,
                params=dict(run.data.params),
                model_type="pytorch",
            ),
        )
        info = _call(
            f"log model of run {run_id}",
            lambda: mlflow.pytorch.log_model(
                model,
                name=name,
                model_id=logged.model_id,
                run_id=run_id,
                step=step,
                signature=signature,
                input_example=input_example,
                pip_requirements=pip_requirements(),
                serialization_format="pt2",
                # MLflow would load the saved model back and run it on the serving example
                # (0.08 s median a warm lecture-CNN model: bench_log_model.py; more for the first
                # in a process; one model per seed). The example is this model's own input,
                # and the test suite checks that the stored serving example scores through
                # pyfunc, so the check runs once there rather than in every run.
                validate_serving_input=False,
            ),
        )
    finally:
        model.train(was_training)
    model_uri = str(info.model_uri)
    set_tags(run_id, {"model_uri": model_uri})
    return model_uri


def _last_logged_step(run_id: str, keys: list[str]) -> int:
    """The last step at which any of ``keys`` was logged (0 for none)."""
    client = _client()
    steps = [0]
    for key in keys:
        history = _call(
            f"read metric '{key}' of run {run_id}",
            functools.partial(client.get_metric_history, run_id, key),
        )
        steps.extend(metric.step for metric in history)
    return max(steps)
