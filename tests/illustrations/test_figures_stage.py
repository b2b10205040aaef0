"""`deepopt figures` end to end in tmp_path: every lecture figure written to figures/ and
logged into a real sqlite MLflow store, the same bytes on a rerun, the measured figures
drawn from the vanishing_* experiments' runs.csv when they exist; dvc.yaml agrees."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow import MlflowClient

from deepopt import cli, paths
from deepopt.illustrations import LECTURE_FIGURES, MEASURED_EXPERIMENTS
from deepopt.illustrations.catalogue import drawn_figures

REPO = Path(__file__).resolve().parents[2]
MEASURED = {"zero_fraction", "vanishing_gradient"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_runs_csv(name: str, relu: bool) -> None:
    """runs.csv as train writes it: two replicas of a 3-layer MLP, 2 epochs each."""
    grads = [f"grad_norm/{layer}" for layer in ("dense1", "dense2", "logits")]
    zeros = [f"zero_fraction/{layer}" for layer in ("act1", "act2")] if relu else []
    path = paths.runs_history_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["replica", "member", "seed", "epoch", "val_loss", "lr", *grads, *zeros])
        for replica in range(2):
            for epoch in range(2):
                norms = [10.0 ** (depth - 3 + replica) for depth in range(len(grads))]
                fractions = [0.5 + 0.1 * replica] * len(zeros)
                writer.writerow([replica, 0, 4487 + replica, epoch, 1.0, 0.02, *norms, *fractions])


def _pngs() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(paths.FIGURES_DIR.glob("*.png"))}


def _figures_runs() -> list[Any]:
    client = MlflowClient()
    experiment = client.get_experiment_by_name("deepopt")
    assert experiment is not None
    return list(client.search_runs([experiment.experiment_id], "tags.`deepopt.role` = 'figures'"))


def _run_stage(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert cli.main(["figures"]) == 0
    summary: dict[str, Any] = json.loads(capsys.readouterr().out)
    return summary


@pytest.mark.slow
def test_figures_are_written_logged_and_the_same_on_a_rerun(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    base_params: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(base_params), encoding="utf-8")
    _write_runs_csv("vanishing_relu", relu=True)
    _write_runs_csv("vanishing_sigmoid", relu=False)  # no ReLU: grad norms only

    first = _run_stage(capsys)
    written = _pngs()
    assert set(written) == {file for file, _ in LECTURE_FIGURES.values()}
    assert all(blob.startswith(PNG_SIGNATURE) for blob in written.values())
    assert first["measured_from"] == ["vanishing_relu", "vanishing_sigmoid"]
    rates = first["rates"]
    for method in ("gradient descent", "heavy ball"):
        assert rates[method]["measured"] == pytest.approx(rates[method]["theory"], rel=0.02)

    (runs,) = _figures_runs()
    assert runs.info.run_id == first["mlflow_run"] and runs.info.status == "FINISHED"
    client = MlflowClient()
    logged = {a.path for a in client.list_artifacts(runs.info.run_id, "figures")}
    assert logged == {f"figures/{name}" for name in written}
    artifact = client.download_artifacts(runs.info.run_id, "figures/paths_quadratic.png")
    assert Path(artifact).read_bytes() == written["paths_quadratic.png"]
    assert runs.data.metrics["rate/heavy_ball/theory"] == pytest.approx(9 / 11)

    # Without the experiments' files: the measured figures go, the drawn ones are unchanged.
    for name in ("vanishing_relu", "vanishing_sigmoid"):
        paths.runs_history_path(name).unlink()
    second = _run_stage(capsys)
    drawn = {LECTURE_FIGURES[key][0] for key in drawn_figures()}
    assert _pngs() == {name: blob for name, blob in written.items() if name in drawn}
    assert second["measured_from"] == []
    assert len(_figures_runs()) == 2  # one run per execution


def test_the_catalogue_names_every_figure_once() -> None:
    assert set(LECTURE_FIGURES) == set(drawn_figures()) | MEASURED
    files = [file for file, _ in LECTURE_FIGURES.values()]
    assert len(set(files)) == len(files) and all(f.endswith(".png") for f in files)
    assert all(caption.strip() for _, caption in LECTURE_FIGURES.values())


def test_reading_the_catalogue_imports_no_torch() -> None:
    # the report embeds the files LECTURE_FIGURES names; it must not pay for torch
    code = "import sys, deepopt.illustrations; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_dvc_stage_reads_the_measured_experiments_and_writes_figures() -> None:
    with open(REPO / "dvc.yaml", encoding="utf-8") as handle:
        stage = yaml.safe_load(handle)["stages"]["figures"]
    with open(REPO / "params.yaml", encoding="utf-8") as handle:
        experiments = yaml.safe_load(handle)["experiments"]
    data_deps = [d for d in stage["deps"] if not d.startswith("src/")]
    # the folder, not the three runs.csv: a params.yaml without a vanishing_* experiment
    # must still run (a missing file dep stops dvc repro); the stage skips what is absent
    assert data_deps == [str(paths.runs_history_path(MEASURED_EXPERIMENTS[0]).parent.parent)]
    assert all(name in experiments for name in MEASURED_EXPERIMENTS)  # train@ writes them
    assert stage["outs"] == [str(paths.FIGURES_DIR)]
    assert stage["params"] == ["mlflow.experiment"]
