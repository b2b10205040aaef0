"""`deepopt prepare` end to end: tiny IDX files, the real Debian Fashion-MNIST, no data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.error import URLError

import pytest
import yaml

from deepopt import cli
from deepopt.config import DataConfig
from deepopt.data import DEBIAN_FASHION_MNIST, RAW_FILES, load_prepared
from tiny_data import write_tiny_idx_dataset

OUTPUTS = ("train.pt", "val.pt", "test.pt", "meta.json")


def _write_params(folder: Path, base: dict[str, Any], **data: Any) -> None:
    params = {**base, "data": {**base["data"], **data}}
    (folder / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")


def _outputs(folder: Path) -> dict[str, bytes]:
    return {name: (folder / "data" / "prepared" / name).read_bytes() for name in OUTPUTS}


def test_prepare_on_tiny_files_in_data_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base_params: dict[str, Any], capsys: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    write_tiny_idx_dataset(tmp_path / "data" / "raw" / "kmnist", n_train=300, n_test=40)
    _write_params(tmp_path, base_params, name="kmnist", train_subset=100, val_fraction=0.2)
    assert cli.main(["prepare"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"] == {"train": 80, "val": 20, "test": 40}
    assert summary["source"] == "data/raw/kmnist"
    meta = json.loads((tmp_path / "data" / "prepared" / "meta.json").read_text())
    assert meta["class_counts"] == {"train": [8] * 10, "val": [2] * 10, "test": [4] * 10}
    assert meta["class_names"][:2] == ["o", "ki"]
    assert meta["source_origin"] == "data.root"


def test_prepare_refuses_a_subset_larger_than_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base_params: dict[str, Any], capsys: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    write_tiny_idx_dataset(tmp_path / "data" / "raw" / "mnist", n_train=100, n_test=10)
    _write_params(tmp_path, base_params, name="mnist", train_subset=500)
    assert cli.main(["prepare"]) == 2
    err = capsys.readouterr().err
    assert "data.train_subset: 500 is more than the 100 training images" in err
    assert not (tmp_path / "data" / "prepared").exists()


def test_prepare_without_data_or_network_exits_1_naming_the_four_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base_params: dict[str, Any], capsys: Any
) -> None:
    import torchvision.datasets

    def no_network(self: Any) -> None:  # replaces the HTTP transfer only
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_network)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    _write_params(tmp_path, base_params, name="mnist", root="empty")
    assert cli.main(["prepare"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("deepopt: error: no mnist data found") and err.count("\n") == 1
    for stem in RAW_FILES.values():
        assert stem in err
    assert "into empty/mnist/" in err
    assert not (tmp_path / "data" / "prepared").exists()


@pytest.mark.slow
@pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist (make setup)"
)
def test_prepare_debian_fashion_mnist_end_to_end_and_byte_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base_params: dict[str, Any]
) -> None:
    monkeypatch.chdir(tmp_path)
    _write_params(tmp_path, base_params)  # the repository's params: fashion-mnist, 6000, 0.1
    assert cli.main(["prepare"]) == 0
    first = _outputs(tmp_path)
    meta = json.loads(first["meta.json"])
    assert meta["source"] == str(DEBIAN_FASHION_MNIST) and meta["source_origin"] == "debian"
    assert meta["counts"] == {"train": 5400, "val": 600, "test": 10000}
    assert meta["class_counts"]["train"] == [540] * 10
    assert meta["class_counts"]["val"] == [60] * 10
    assert meta["class_counts"]["test"] == [1000] * 10
    assert meta["params"] == {"seed": 4487, "train_subset": 6000, "val_fraction": 0.1}
    assert meta["image_shape"] == [28, 28] and meta["class_names"][0] == "T-shirt/top"
    assert 0.2 < meta["mean"] < 0.4 and 0.25 < meta["std"] < 0.45
    data = load_prepared(DataConfig(), 4487, tmp_path)
    assert data.train.images.shape == (5400, 28, 28) and data.test.labels.shape == (10000,)
    # train and val are disjoint parts of the training file
    train_rows = {bytes(img.numpy().tobytes()) for img in data.train.images}
    assert not any(img.numpy().tobytes() in train_rows for img in data.val.images[:200])

    # a second run, as the installed command in a fresh process: the same bytes
    for name in OUTPUTS:
        (tmp_path / "data" / "prepared" / name).unlink()
    result = subprocess.run(
        [sys.executable, "-m", "deepopt.cli", "prepare"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["counts"]["test"] == 10000
    assert _outputs(tmp_path) == first
