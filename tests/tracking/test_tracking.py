"""deepopt.tracking against real sqlite MLflow stores in tmp_path (and real subprocesses)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import matplotlib
import mlflow.pytorch
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from torch import nn

from deepopt import tracking
from deepopt.errors import TrackingError
from deepopt.tracking import store as store_module

matplotlib.use("Agg")  # no display in tests

EPOCHS = 4
METRICS = ("loss", "acc", "val_loss", "val_acc")


@pytest.fixture(scope="session")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty store with MLflow's schema: creating it takes seconds, copying it ms."""
    db_file = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db_file}").search_experiments(max_results=1)
    return db_file


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, template_db: Path) -> Path:
    """The default store of a repository rooted at tmp_path (no MLFLOW_TRACKING_URI)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = tmp_path / "mlruns"
    folder.mkdir(exist_ok=True)
    with (
        contextlib.closing(sqlite3.connect(template_db)) as source,
        contextlib.closing(sqlite3.connect(folder / "mlflow.db")) as copy,
    ):
        source.backup(copy)
    tracking.configure(root=tmp_path)
    return folder


def _client() -> MlflowClient:
    return MlflowClient(mlflow.get_tracking_uri())


def _tiny_cnn() -> nn.Module:
    """A shrunken lecture CNN: conv-BN-ReLU-pool, dense head (weights seeded)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 5, padding=2),  # [N, 4, 28, 28]
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),  # [N, 4, 14, 14]
        nn.Flatten(),
        nn.Linear(4 * 14 * 14, 10),  # [N, 10] logits
    )


def _free_loopback_port() -> int:
    """A port nothing listens on: bound, then closed again."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# ---------------------------------------------------------------------------------------
# The store


def test_default_store_is_sqlite_in_repo_mlruns_with_wal(store: Path) -> None:
    assert mlflow.get_tracking_uri() == f"sqlite:///{store / 'mlflow.db'}"
    assert (store / "artifacts").is_dir()
    with sqlite3.connect(store / "mlflow.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_relative_sqlite_uri_in_env_is_taken_from_repo_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere/runs.db")
    uri = tracking.configure(root=tmp_path)
    assert uri == f"sqlite:///{tmp_path / 'elsewhere' / 'runs.db'}"
    assert (tmp_path / "elsewhere" / "artifacts").is_dir()  # artifacts beside the database


def test_unreachable_server_fails_within_10_s_naming_the_uri(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri = f"http://127.0.0.1:{_free_loopback_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    with pytest.raises(TrackingError) as caught:
        tracking.configure()
    assert time.monotonic() - start < 10.0
    message = str(caught.value)
    assert uri in message and "\n" not in message


def test_sqlite_folder_that_cannot_be_created_is_a_tracking_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/store/mlflow.db")
    with pytest.raises(TrackingError, match="cannot create folder"):
        tracking.configure()


def test_experiment_is_created_once_with_artifacts_under_the_store(store: Path) -> None:
    first = tracking.ensure_experiment("lecture")
    assert tracking.ensure_experiment("lecture") == first
    experiment = _client().get_experiment(first)
    assert experiment.artifact_location == (store / "artifacts").as_uri()


def test_deleted_experiment_is_a_tracking_error_naming_it(store: Path) -> None:
    experiment_id = tracking.ensure_experiment("gone")
    _client().delete_experiment(experiment_id)
    with pytest.raises(TrackingError, match=r"'gone'.*deleted"):
        tracking.ensure_experiment("gone")


# ---------------------------------------------------------------------------------------
# Params, metrics, tags, artifacts, datasets


def test_flatten_params_uses_dotted_names_and_yaml_like_values() -> None:
    nested = {
        "seed": 4487,
        "optim": {"name": "adam", "lr": 0.02, "betas": (0.9, 0.999), "eps": None},
        "model": {"batchnorm": True, "conv_channels": [10, 40, 80]},
        "experiments": {},
    }
    assert tracking.flatten_params(nested) == {
        "seed": "4487",
        "optim.name": "adam",
        "optim.lr": "0.02",
        "optim.betas": "[0.9, 0.999]",
        "optim.eps": "null",
        "model.batchnorm": "true",
        "model.conv_channels": "[10, 40, 80]",
        "experiments": "{}",
    }


def test_run_contents_read_back(store: Path, tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    experiment_id = tracking.ensure_experiment("lecture")
    tags = {"experiment": "base", "seed": "7"}
    run_id = tracking.start_run(experiment_id, "base", tags=tags)
    tracking.log_params(run_id, {"optim": {"name": "nesterov", "lr": 0.02}, "seed": 7})
    for epoch in range(EPOCHS):
        tracking.log_epoch(run_id, epoch, {key: epoch + i / 10 for i, key in enumerate(METRICS)})
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    tracking.log_artifact(run_id, notes, "extra")
    tracking.log_dict(run_id, {"optim": {"lr": 0.02}}, "config.json")
    figure, axes = plt.subplots()
    axes.plot([0, 1], [1, 0])
    tracking.log_figure(run_id, figure, "history.png")
    plt.close(figure)
    images = np.zeros((6, 28, 28), dtype=np.uint8)
    labels = np.arange(6, dtype=np.int64)
    for _ in range(2):  # a resumed run logs its dataset again: still one input
        tracking.log_dataset(
            run_id,
            "fashion-mnist-train",
            images,
            labels,
            source="data/prepared/train.pt",
            digest="d1g3st",
        )
    tracking.end_run(run_id, "FINISHED")

    client = _client()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "base"
    assert run.data.params == {"optim.name": "nesterov", "optim.lr": "0.02", "seed": "7"}
    assert run.data.tags.items() >= tags.items()
    for i, key in enumerate(METRICS):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert history == [(epoch, epoch + i / 10) for epoch in range(EPOCHS)]
    assert tracking.logged_epochs(run_id, "val_loss") == set(range(EPOCHS))
    downloaded = Path(client.download_artifacts(run_id, "extra/notes.txt", str(tmp_path / "dl")))
    assert downloaded.read_text() == "hello"
    config = Path(client.download_artifacts(run_id, "config.json", str(tmp_path / "dl")))
    assert json.loads(config.read_text()) == {"optim": {"lr": 0.02}}
    assert {a.path for a in client.list_artifacts(run_id)} >= {"history.png", "config.json"}
    # Artifacts live in the store's folder, never in the current directory.
    assert list((store / "artifacts").rglob("notes.txt"))
    (entry,) = run.inputs.dataset_inputs
    assert (entry.dataset.name, entry.dataset.digest) == ("fashion-mnist-train", "d1g3st")
    assert {t.key: t.value for t in entry.tags}["mlflow.data.context"] == "training"
    assert json.loads(entry.dataset.profile)["features_shape"] == [6, 28, 28]


def test_relogging_equal_params_is_a_noop_but_a_changed_value_is_an_error(store: Path) -> None:
    run_id = tracking.start_run(tracking.ensure_experiment("lecture"), "base")
    tracking.log_params(run_id, {"optim": {"lr": 0.02}})
    tracking.log_params(run_id, {"optim": {"lr": 0.02}, "seed": 1})  # resume: adds seed only
    assert _client().get_run(run_id).data.params == {"optim.lr": "0.02", "seed": "1"}
    with pytest.raises(TrackingError, match=r"'optim\.lr' was logged as '0\.02', now '0\.1'"):
        tracking.log_params(run_id, {"optim": {"lr": 0.1}})


def test_missing_artifact_is_a_tracking_error(store: Path, tmp_path: Path) -> None:
    run_id = tracking.start_run(tracking.ensure_experiment("lecture"), "base")
    with pytest.raises(TrackingError, match="does not exist"):
        tracking.log_artifact(run_id, tmp_path / "nope.png")


def _git(folder: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=folder, check=True, capture_output=True)


def test_run_tags_record_commit_dirty_flag_data_and_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    _git(repo, "add", "code.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    monkeypatch.setenv("DVC_EXP_NAME", "sunny-dace")

    tags = tracking.run_tags(dataset="fashion-mnist", meta={"digest": "abc"}, seed=3, cwd=repo)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert tags["git_commit"] == tags["mlflow.source.git.commit"] == commit
    assert tags["git_dirty"] == "false"
    assert tags["dataset"] == "fashion-mnist"
    assert tags["data_digest"] == "abc"
    assert tags["seed"] == "3"
    assert tags["dvc_exp"] == "sunny-dace"
    assert tags["torch_version"] == torch.__version__
    assert tags["deepopt_version"]

    (repo / "code.py").write_text("x = 2\n")
    assert tracking.run_tags(dataset="mnist", cwd=repo)["git_dirty"] == "true"


def test_run_tags_without_git_say_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repo above tmp_path
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    tags = tracking.run_tags(dataset="mnist", meta={"counts": {"train": 5}}, cwd=tmp_path)
    assert tags["git_commit"] == tags["git_dirty"] == "unknown"
    assert "mlflow.source.git.commit" not in tags and "dvc_exp" not in tags
    assert len(tags["data_digest"]) == 64  # no digest in meta: a sha256 of meta itself


def test_run_tags_name_the_cpu_device_and_no_cuda_versions(tmp_path: Path) -> None:
    tags = tracking.run_tags(dataset="mnist", cwd=tmp_path, device=torch.device("cpu"))
    assert tags["device"] == "cpu"
    assert tags["device_name"]  # the CPU's model
    assert "cuda_version" not in tags and "cudnn_version" not in tags
    assert "device" not in tracking.run_tags(dataset="mnist", cwd=tmp_path)  # none given


# ---------------------------------------------------------------------------------------
# Run lifecycle


def test_resume_continues_the_same_run(store: Path) -> None:
    experiment_id = tracking.ensure_experiment("lecture")
    run_id = tracking.start_run(experiment_id, "base", tags={"experiment": "base"})
    tracking.log_epoch(run_id, 0, {"val_loss": 1.0})
    tracking.log_epoch(run_id, 1, {"val_loss": 0.5})
    tracking.end_run(run_id, "KILLED", reason="interrupted")

    assert tracking.run_exists(run_id)
    resumed = tracking.start_run(experiment_id, "base", run_id=run_id, tags={"experiment": "base"})
    assert resumed == run_id
    assert tracking.run_status(run_id) == "RUNNING"
    assert tracking.logged_epochs(run_id, "val_loss") == {0, 1}
    tracking.log_epoch(run_id, 2, {"val_loss": 0.25})
    tracking.end_run(run_id, "FINISHED")

    assert tracking.find_runs(experiment_id, tags={"experiment": "base"}) == [run_id]
    assert tracking.run_status(run_id) == "FINISHED"
    assert tracking.logged_epochs(run_id, "val_loss") == {0, 1, 2}


def test_resuming_an_unknown_run_is_a_tracking_error(store: Path) -> None:
    experiment_id = tracking.ensure_experiment("lecture")
    assert not tracking.run_exists("0" * 32)
    with pytest.raises(TrackingError, match=r"0{32}"):
        tracking.start_run(experiment_id, "base", run_id="0" * 32)


def test_child_run_points_at_its_parent(store: Path) -> None:
    experiment_id = tracking.ensure_experiment("study")
    parent = tracking.start_run(experiment_id, "study")
    child = tracking.start_run(experiment_id, "trial-0", parent_run_id=parent)
    assert _client().get_run(child).data.tags["mlflow.parentRunId"] == parent


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (None, "FINISHED"),
        (ValueError("bad value"), "FAILED"),
        (KeyboardInterrupt(), "KILLED"),
        (SystemExit(2), "FAILED"),
    ],
)
def test_tracked_run_end_status_follows_how_the_block_ends(
    store: Path, error: BaseException | None, status: str
) -> None:
    experiment_id = tracking.ensure_experiment("lecture")
    started: list[str] = []
    expectation = pytest.raises(type(error)) if error else contextlib.nullcontext()
    with expectation, tracking.tracked_run(experiment_id, "base") as run_id:
        started.append(run_id)
        if error is not None:
            raise error
    (run_id,) = started
    run = _client().get_run(run_id)
    assert run.info.status == status
    if isinstance(error, ValueError):
        assert run.data.tags["end_reason"] == "ValueError: bad value"


def test_a_run_ended_inside_the_block_keeps_its_status(store: Path) -> None:
    """tune ends a pruned trial KILLED, then raises TrialPruned through ending_run."""
    run_id = tracking.start_run(tracking.ensure_experiment("lecture"), "trial")
    with pytest.raises(RuntimeError), tracking.ending_run(run_id):
        tracking.end_run(run_id, "KILLED", reason="pruned at epoch 3")
        raise RuntimeError("pruned")
    run = _client().get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["end_reason"] == "pruned at epoch 3"


def test_end_run_refuses_an_unknown_status(store: Path) -> None:
    run_id = tracking.start_run(tracking.ensure_experiment("lecture"), "base")
    with pytest.raises(ValueError, match="FINISHED, FAILED or KILLED"):
        tracking.end_run(run_id, "DONE")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# System metrics (mlflow.system_metrics)

SAMPLING_S = 0.2  # seconds between samples here (MLflow's default is 10)


def _system_steps(run_id: str) -> dict[str, list[int]]:
    """Each system/* metric of the run and the steps it was logged at."""
    client = _client()
    keys = [key for key in client.get_run(run_id).data.metrics if key.startswith("system/")]
    return {key: sorted(m.step for m in client.get_metric_history(run_id, key)) for key in keys}


def test_system_metrics_sample_the_machine_into_the_run(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's sampling interval variable sets how often: a 1 s run gets several samples."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", str(SAMPLING_S))
    experiment_id = tracking.ensure_experiment("lecture")
    with (
        tracking.tracked_run(experiment_id, "base") as run_id,
        tracking.system_metrics(run_id, True),
    ):
        time.sleep(5 * SAMPLING_S)
    steps = _system_steps(run_id)
    assert "system/cpu_utilization_percentage" in steps, sorted(steps)
    assert "system/system_memory_usage_megabytes" in steps
    cpu = steps["system/cpu_utilization_percentage"]
    assert cpu[0] == 0 and cpu == list(range(len(cpu))) and len(cpu) >= 2
    assert tracking.run_status(run_id) == "FINISHED"


def test_system_metrics_of_a_resumed_run_continue_its_steps(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
    experiment_id = tracking.ensure_experiment("lecture")
    run_id = tracking.start_run(experiment_id, "base")
    with (
        tracking.ending_run(run_id),
        tracking.system_metrics(run_id, True, sampling_interval=SAMPLING_S),
    ):
        time.sleep(3 * SAMPLING_S)
    first = _system_steps(run_id)["system/cpu_utilization_percentage"]
    tracking.start_run(experiment_id, "base", run_id=run_id)
    with (
        tracking.ending_run(run_id),
        tracking.system_metrics(run_id, True, sampling_interval=SAMPLING_S),
    ):
        time.sleep(3 * SAMPLING_S)
    both = _system_steps(run_id)["system/cpu_utilization_percentage"]
    assert first and both == list(range(len(both))) and len(both) > len(first)


def test_system_metrics_off_log_nothing(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", str(SAMPLING_S))
    experiment_id = tracking.ensure_experiment("lecture")
    with (
        tracking.tracked_run(experiment_id, "base") as run_id,
        tracking.system_metrics(run_id, False),
    ):
        time.sleep(3 * SAMPLING_S)
    assert _system_steps(run_id) == {}
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]


# ---------------------------------------------------------------------------------------
# Models


@pytest.mark.slow
def test_logged_model_loads_back_predicts_and_shows_under_its_run(store: Path) -> None:
    experiment_id = tracking.ensure_experiment("lecture")
    run_id = tracking.start_run(experiment_id, "base")
    tracking.log_params(run_id, {"optim": {"lr": 0.02}})
    for epoch in range(EPOCHS):
        tracking.log_epoch(run_id, epoch, {"val_loss": 1.0 / (epoch + 1)})
    model = _tiny_cnn().train()
    example = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)

    start = time.perf_counter()
    model_uri = tracking.log_model(run_id, model, example)
    seconds = time.perf_counter() - start
    # Requirement inference alone took 6.4 s here; explicit pins keep it to ~0.2-3.5 s.
    assert seconds < 6.0, f"log_model took {seconds:.1f} s"
    assert model.training  # left in the mode it came in

    batch = np.random.default_rng(1).random((5, 1, 28, 28), dtype=np.float32)
    loaded = mlflow.pytorch.load_model(model_uri)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(batch))
        predicted = loaded(torch.from_numpy(batch))
    torch.testing.assert_close(predicted, expected)
    # tracking.log_model skips MLflow's own check of the serving example; this is that check:
    # the stored serving_input_example.json scores through pyfunc as MLflow's server reads it.
    saved = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(store / "saved")))
    served = store / "served.json"
    mlflow.models.predict(
        model_uri,
        input_path=str(saved / "serving_input_example.json"),
        content_type="json",
        env_manager="local",
        output_path=str(served),
    )
    with torch.no_grad():
        on_example = model(torch.from_numpy(example)).numpy()
    np.testing.assert_allclose(
        json.loads(served.read_text())["predictions"], on_example, rtol=1e-5, atol=1e-6
    )

    client = _client()
    run = client.get_run(run_id)
    model_id = model_uri.removeprefix("models:/")
    assert [output.model_id for output in run.outputs.model_outputs] == [model_id]
    assert run.outputs.model_outputs[0].step == EPOCHS - 1  # linked to the last epoch
    assert run.data.tags["model_uri"] == model_uri
    logged = client.get_logged_model(model_id)
    assert logged.experiment_id == experiment_id and logged.source_run_id == run_id
    assert logged.params == {"optim.lr": "0.02"}
    assert Path(logged.artifact_location.removeprefix("file://")).is_relative_to(
        store / "artifacts"
    )
    signature = mlflow.models.get_model_info(model_uri).signature
    assert signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 1, 28, 28)
    assert signature.outputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 10)
    # Linking the epoch's metrics to the model adds no second value at that step.
    assert len(client.get_metric_history(run_id, "val_loss")) == EPOCHS


# ---------------------------------------------------------------------------------------
# Concurrency


def test_locked_database_retries_until_the_lock_is_gone(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return "logged"

    monkeypatch.setattr(store_module, "_LOCKED_RETRY_DELAYS_S", (0.01, 0.01, 0.01))
    assert store_module._call("log", flaky) == "logged"
    assert len(attempts) == 3


def test_a_lock_that_outlasts_the_retries_is_a_tracking_error(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[int] = []

    def locked() -> None:
        attempts.append(1)
        raise MlflowException("(sqlite3.OperationalError) database is locked")

    monkeypatch.setattr(store_module, "_LOCKED_RETRY_DELAYS_S", (0.01, 0.01))
    with pytest.raises(TrackingError, match=r"MLflow log failed .*database is locked"):
        store_module._call("log", locked)
    assert len(attempts) == 3  # the first try and one per delay


def test_other_mlflow_errors_become_one_line_tracking_errors(store: Path) -> None:
    def broken() -> None:
        raise MlflowException("RESOURCE_DOES_NOT_EXIST:\nno such run")

    with pytest.raises(TrackingError) as caught:
        store_module._call("get run x", broken)
    assert str(caught.value).startswith("MLflow get run x failed (sqlite:///")
    assert "\n" not in str(caught.value)


def test_a_write_lock_held_by_another_connection_is_waited_for(store: Path) -> None:
    """MLflow's 20 s sqlite busy timeout: a writer blocked for 1 s still logs its epoch."""
    run_id = tracking.start_run(tracking.ensure_experiment("lecture"), "base")
    locked = threading.Event()

    def hold_lock() -> None:
        db = sqlite3.connect(store / "mlflow.db", isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        locked.set()
        time.sleep(1.0)
        db.execute("COMMIT")
        db.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    locked.wait(5.0)
    start = time.monotonic()
    tracking.log_epoch(run_id, 0, {"val_loss": 0.5})
    waited = time.monotonic() - start
    holder.join()
    assert waited > 0.5  # it really was blocked, and then succeeded
    assert tracking.logged_epochs(run_id, "val_loss") == {0}


_WORKER = """
import sys, time
from pathlib import Path
from deepopt import tracking

root, index, epochs, go = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
while not go.exists():  # start together, so store creation and experiment creation race
    time.sleep(0.01)
tracking.configure(root=root)
experiment_id = tracking.ensure_experiment("race")
run_id = tracking.start_run(experiment_id, "worker", tags={"worker": index})
tracking.log_params(run_id, {"worker": {"index": int(index)}})
for epoch in range(epochs):
    tracking.log_epoch(run_id, epoch, {k: epoch + int(index) / 10 for k in ("a", "b", "c", "d")})
tracking.end_run(run_id, "FINISHED")
"""


@pytest.mark.slow
def test_concurrent_processes_lose_nothing_and_create_the_experiment_once(
    tmp_path: Path,
) -> None:
    workers, epochs = 3, 150
    go = tmp_path / "go"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI",)}
    env.pop("PYTEST_CURRENT_TEST", None)  # MLflow changes its sessions under pytest
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(tmp_path), str(i), str(epochs), str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(workers)
    ]
    time.sleep(0.5)  # let them import mlflow first
    go.touch()
    for proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    races = [e for e in client.search_experiments() if e.name == "race"]
    assert len(races) == 1
    runs = client.search_runs([races[0].experiment_id])
    assert sorted(r.data.tags["worker"] for r in runs) == [str(i) for i in range(workers)]
    for run in runs:
        index = int(run.data.tags["worker"])
        assert run.info.status == "FINISHED"
        assert run.data.params == {"worker.index": str(index)}
        for key in ("a", "b", "c", "d"):
            history = sorted(
                (m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)
            )
            assert history == [(epoch, epoch + index / 10) for epoch in range(epochs)]


_RACER = """
import json, sys, time
from pathlib import Path
from deepopt import tracking

root, me, other = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
tracking.configure(root=root)
ids = []
for i in range(20):
    # Meet the other process at each name, so both look it up and create it at once.
    (root / f"{i}.{me}").touch()
    deadline = time.monotonic() + 30  # the other process may have died
    while not (root / f"{i}.{other}").exists() and time.monotonic() < deadline:
        time.sleep(0.0005)
    ids.append(tracking.ensure_experiment(f"exp-{i}"))
print(json.dumps(ids))
"""


@pytest.mark.slow
def test_racing_processes_create_each_experiment_once(store: Path, tmp_path: Path) -> None:
    """Two processes create the same 20 names in lock-step; the loser looks it up."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(tmp_path), me, other],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for me, other in (("a", "b"), ("b", "a"))
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert results[0] == results[1]  # both got the same experiment for every name
    names = [e.name for e in _client().search_experiments() if e.name.startswith("exp-")]
    assert sorted(names) == sorted(f"exp-{i}" for i in range(20))


def test_importing_tracking_leaves_torch_and_mlflow_pytorch_unloaded() -> None:
    """Start-up time: only log_model needs mlflow.pytorch, only run_tags torch."""
    probe = (
        "import sys, deepopt.tracking; "
        "print(sorted(m for m in ('mlflow.pytorch', 'torch', 'matplotlib') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]"


def test_keyed_run_is_created_once_and_continued_by_every_later_call(store: Path) -> None:
    experiment_id = tracking.ensure_experiment("studies")
    first, created = tracking.keyed_run(experiment_id, "tune a", key="db a", role="study")
    assert created
    tracking.end_run(first, "KILLED")
    again, created = tracking.keyed_run(experiment_id, "tune a", key="db a", role="study")
    assert (again, created) == (first, False)
    assert tracking.run_status(first) == "RUNNING"  # continued
    other, created = tracking.keyed_run(experiment_id, "tune b", key="db b", role="study")
    assert created and other != first
    assert _client().get_run(first).data.tags["deepopt.role"] == "study"


def test_two_processes_creating_a_keyed_run_at_once_go_on_in_the_earlier(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    experiment_id = tracking.ensure_experiment("studies")
    search = tracking.runs.find_runs
    earlier: list[str] = []

    def other_process_creates_its_run_after_this_search(
        experiment: str, **kwargs: Any
    ) -> list[str]:
        found = search(experiment, **kwargs)
        if not earlier:  # the other process saw no run either, and created its own
            tags = {"deepopt.role": "study", "deepopt.parent_key": "db a"}
            earlier.append(tracking.start_run(experiment, "tune a", tags=tags))
            time.sleep(0.01)  # its start time a millisecond before this one's
        return found

    monkeypatch.setattr(tracking.runs, "find_runs", other_process_creates_its_run_after_this_search)
    run_id, created = tracking.keyed_run(experiment_id, "tune a", key="db a", role="study")
    assert (run_id, created) == (earlier[0], False)
    monkeypatch.undo()
    keyed = {"deepopt.role": "study", "deepopt.parent_key": "db a"}
    assert tracking.find_runs(experiment_id, tags=keyed) == [earlier[0]]  # its own deleted
