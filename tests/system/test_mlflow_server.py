"""deepopt against a real MLflow tracking server (``make mlflow-server`` on loopback):
the run, its metrics and its artifacts are read back through the server's REST API."""

from __future__ import annotations

import json
import os
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deepopt import cli, tracking
from services import DIRECT, mlflow_server

pytestmark = pytest.mark.slow


def _rest(uri: str, endpoint: str, **query: str) -> Any:
    """GET ``/api/2.0/mlflow/<endpoint>`` as JSON (what any client of the server sees)."""
    url = f"{uri}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    with DIRECT.open(url, timeout=30) as response:
        return json.load(response)


def _download(uri: str, run_id: str, path: str) -> bytes:
    url = f"{uri}/get-artifact?{urllib.parse.urlencode({'run_id': run_id, 'path': path})}"
    with DIRECT.open(url, timeout=30) as response:
        data: bytes = response.read()
        return data


@pytest.fixture()
def local_store_after(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Leave mlflow pointing at this test's local store, not at the stopped server: later
    tests of this process may read MLflow before configuring it."""
    local = os.environ["MLFLOW_TRACKING_URI"]
    yield
    monkeypatch.setenv("MLFLOW_TRACKING_URI", local)
    tracking.configure()


def test_train_records_run_metrics_and_artifacts_through_the_server(
    local_store_after: None,
    workspace: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    work = workspace()
    with mlflow_server(tmp_path / "server") as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        assert cli.main(["train", "--experiment", "small"]) == 0
        (member,) = json.loads((work / "models/small/run.json").read_text())["runs"]
        run_id = member["run_id"]

        run = _rest(server.uri, "runs/get", run_id=run_id)["run"]
        assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "small seed 4487"
        assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:/")  # proxied
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["optim.name"] == "nesterov" and params["train.epochs"] == "3"
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["stop_reason"] == "max_epochs" and "git_commit" in tags

        history = _rest(server.uri, "metrics/get-history", run_id=run_id, metric_key="val_loss")
        assert sorted(m["step"] for m in history["metrics"]) == [0, 1, 2]
        train_json = json.loads((work / "metrics/small/train.json").read_text())
        final = max(history["metrics"], key=lambda m: m["step"])["value"]
        assert final == pytest.approx(train_json["final_val_loss"])

        listed = _rest(server.uri, "artifacts/list", run_id=run_id)
        assert {"config.json", "history.png"} <= {f["path"] for f in listed["files"]}
        config = json.loads(_download(server.uri, run_id, "config.json"))
        assert config["model"]["conv_channels"] == [4, 8, 8]
        # Uploaded through the server into its artifact store, the logged model too.
        stored = {p.name for p in server.artifacts.rglob("*") if p.is_file()}
        assert {"config.json", "history.png", "MLmodel"} <= stored
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()  # nothing went to a local store

    # The server is gone now: the next command fails at once, naming the URI.
    capsys.readouterr()
    started = time.monotonic()
    assert cli.main(["train", "--experiment", "small"]) == 1
    assert time.monotonic() - started < 10.0
    err = capsys.readouterr().err
    assert server.uri in err and "unreachable" in err and err.count("\n") == 1
