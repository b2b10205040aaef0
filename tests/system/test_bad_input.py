"""The bad-input corpus: every malformed input gets one line, its exit code, and no damage.

Each case names how to make the bad input in a copy of a finished workspace (conftest's
``finished``: prepared data, a trained, evaluated and reported experiment ``small``, its
checkpoint and its MLflow store), the command, the exit code (2 configuration/usage,
1 runtime) and a fragment of the one-line message. The real CLI runs (in-process, and as a
subprocess where marked, to see what a user's terminal gets). Every case must leave the
workspace's files byte-identical, change nothing in the MLflow store (runs, statuses,
metrics, params, tags), leave no run RUNNING and print no traceback.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import hashlib
import os
import pickle
import shutil
import socket
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from deepopt import cli
from deepopt.data import RAW_FILES

MARKER = "pwned.txt"  # what a malicious pickle would create in the workspace on load


# ---------------------------------------------------------------------------------------
# Snapshots: the workspace's files and the MLflow store's contents


def workspace_snapshot(folder: Path) -> dict[str, str]:
    """Every file (sha256 of its bytes) and folder under ``folder``, by relative path."""
    snapshot = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_dir() and not path.is_symlink():
            snapshot[name + "/"] = "folder"
        else:
            snapshot[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return snapshot


def store_snapshot(db_file: Path) -> dict[str, Any]:
    """Row counts of every MLflow table and each run's status (read with sqlite3 only)."""
    if not db_file.exists():
        return {}
    with contextlib.closing(sqlite3.connect(db_file)) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        counts = {
            table: db.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0] for table in tables
        }
        statuses = dict(db.execute("SELECT run_uuid, status FROM runs").fetchall())
    return {"rows": counts, "status": statuses}


# ---------------------------------------------------------------------------------------
# Ways to make a bad input (each takes the workspace folder)

Make = Callable[[Path], None]


def params_text(text: str) -> Make:
    def make(work: Path) -> None:
        (work / "params.yaml").write_text(text, encoding="utf-8")

    return make


def params_set(*changes: tuple[str, Any]) -> Make:
    """Set dotted keys of the workspace's params.yaml, e.g. ("optim.lr", 0)."""

    def make(work: Path) -> None:
        params = yaml.safe_load((work / "params.yaml").read_text(encoding="utf-8"))
        for dotted, value in changes:
            *parents, last = dotted.split(".")
            node = params
            for key in parents:
                node = node.setdefault(key, {})
            node[last] = copy.deepcopy(value)
        (work / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")

    return make


def both(*makes: Make) -> Make:
    def make(work: Path) -> None:
        for step in makes:
            step(work)

    return make


def idx(tensor: torch.Tensor, magic: int | None = None) -> bytes:
    dims = tuple(tensor.shape)
    header = struct.pack(">I", 0x800 | len(dims) if magic is None else magic)
    return header + struct.pack(f">{len(dims)}I", *dims) + tensor.to(torch.uint8).numpy().tobytes()


def raw_dataset(corrupt: Callable[[dict[str, bytes]], None] = lambda blobs: None) -> Make:
    """A tiny kmnist in data/raw/kmnist/ (200 train, 50 test images, gzipped IDX), after
    ``corrupt`` changed some of its (uncompressed) file contents; params point at it."""

    def make(work: Path) -> None:
        generator = torch.Generator().manual_seed(0)
        blobs = {
            "train_images": idx(torch.randint(0, 256, (200, 28, 28), generator=generator)),
            "train_labels": idx(torch.arange(200) % 10),
            "test_images": idx(torch.randint(0, 256, (50, 28, 28), generator=generator)),
            "test_labels": idx(torch.arange(50) % 10),
        }
        corrupt(blobs)
        folder = work / "data" / "raw" / "kmnist"
        folder.mkdir(parents=True)
        for role, blob in blobs.items():
            gzipped = blob[:2] == b"\x1f\x8b"  # corrupt gzip data is written as it is
            packed = blob if gzipped else gzip.compress(blob, mtime=0)
            (folder / f"{RAW_FILES[role]}.gz").write_bytes(packed)
        params_set(("data.name", "kmnist"), ("data.train_subset", 100))(work)

    return make


def set_blob(role: str, blob: bytes) -> Callable[[dict[str, bytes]], None]:
    def corrupt(blobs: dict[str, bytes]) -> None:
        blobs[role] = blob

    return corrupt


def truncated_gzip(blobs: dict[str, bytes]) -> None:
    whole = gzip.compress(blobs["train_images"], mtime=0)
    blobs["train_images"] = whole[: len(whole) // 2]  # starts with the gzip magic: kept as is


def write_file(relative: str, content: bytes) -> Make:
    def make(work: Path) -> None:
        path = work / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)

    return make


def block_folder(relative: str) -> Make:
    """Replace a folder by a plain file, so nothing can be written inside it (as root too)."""

    def make(work: Path) -> None:
        shutil.rmtree(work / relative, ignore_errors=True)
        (work / relative).write_text("a file where a folder should be\n")

    return make


def checkpoint(work: Path) -> Path:
    (path,) = (work / "checkpoints" / "small").glob("*.pt")
    return path


class Payload:
    """Unpickling this calls open(<workspace>/pwned.txt, "w"): code run by a mere load."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.target, "w"))


def malicious(locate: Callable[[Path], Path], legacy: bool = False) -> Make:
    """Overwrite a file the stage loads with a pickle that would create MARKER on load:
    torch's zip format, or a bare (legacy) pickle stream."""

    def make(work: Path) -> None:
        path = locate(work)
        payload = {"loop": Payload(work / MARKER), "run_id": "x", "finished": False}
        if legacy:
            path.write_bytes(pickle.dumps(payload))
        else:
            torch.save(payload, path)

    return make


def tracking_uri(uri: str) -> Make:
    def make(work: Path) -> None:
        os.environ["MLFLOW_TRACKING_URI"] = uri  # restored by the test's monkeypatch

    return make


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """A TCP port that accepts connections (the kernel's backlog) but never answers:
    a hung tracking server, the slowest way to be unreachable."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


# ---------------------------------------------------------------------------------------
# The corpus

CONFIG, RUNTIME = 2, 1
TRAIN = ("train", "--experiment", "small")
EVALUATE = ("evaluate", "--experiment", "small")
TUNE = ("tune",)


@dataclass(frozen=True)
class Case:
    id: str
    make: Make
    argv: tuple[str, ...]
    code: int
    message: str  # a fragment of the one-line error
    subprocess: bool = False  # run as `python -m deepopt.cli` and read its real stderr
    one_line: bool = True  # argparse's usage errors print the usage line too
    env: dict[str, str] = field(default_factory=dict)


# Should a tune case not fail, it runs one short trial rather than the default study.
TINY_TUNE = params_set(("tune.n_trials", 1), ("tune.epochs", 3), ("tune.workers", 1))

CASES = [
    # params.yaml: not a config at all
    Case("empty-params", params_text(""), TRAIN, CONFIG, "params.yaml: file is empty", True),
    Case(
        "yaml-syntax",
        params_text("seed: 1\noptim:\n  lr: [0.1\n  name: sgd\n"),
        ("prepare",),
        CONFIG,
        "YAML syntax error",
    ),
    Case(
        "params-a-list", params_text("- seed\n- optim\n"), ("report",), CONFIG, "expected a mapping"
    ),
    # wrong types
    Case(
        "epochs-a-word", params_set(("train.epochs", "many")), TRAIN, CONFIG, "train.epochs: 'many'"
    ),
    Case(
        "batchnorm-not-bool",
        params_set(("model.batchnorm", "maybe")),
        EVALUATE,
        CONFIG,
        "model.batchnorm: 'maybe'",
    ),
    Case(
        "conv-channels-length",
        params_set(("model.conv_channels", [4, 8])),
        TRAIN,
        CONFIG,
        "model.conv_channels",
    ),
    Case("section-not-mapping", params_set(("optim", "fast")), TRAIN, CONFIG, "optim: 'fast'"),
    # out of range
    Case("lr-zero", params_set(("optim.lr", 0)), TRAIN, CONFIG, "optim.lr: 0"),
    Case("lr-negative", params_set(("optim.lr", -0.1)), TRAIN, CONFIG, "optim.lr: -0.1"),
    Case("momentum-one", params_set(("optim.momentum", 1.0)), TRAIN, CONFIG, "optim.momentum: 1.0"),
    Case(
        "patience-negative",
        params_set(("early_stop.patience", -1)),
        TRAIN,
        CONFIG,
        "early_stop.patience: -1",
    ),
    Case(
        "val-fraction-zero",
        params_set(("data.val_fraction", 0.0)),
        ("prepare",),
        CONFIG,
        "data.val_fraction: 0.0",
    ),
    Case(
        "val-fraction-one",
        params_set(("data.val_fraction", 1.0)),
        ("prepare",),
        CONFIG,
        "data.val_fraction: 1.0",
    ),
    Case(
        "train-subset-larger-than-data",
        both(raw_dataset(), params_set(("data.train_subset", 201))),
        ("prepare",),
        CONFIG,
        "data.train_subset: 201 is more than the 200 training images",
    ),
    # unknown keys at every level
    Case("unknown-section", params_set(("modle", {})), TRAIN, CONFIG, "modle: unknown key"),
    Case("unknown-key", params_set(("optim.lrr", 0.1)), TRAIN, CONFIG, "optim.lrr: unknown key"),
    Case("unknown-matrix-key", params_set(("matrix.seed", 2)), ("report",), CONFIG, "matrix.seed"),
    Case(
        "experiment-unknown-section",
        params_set(("experiments.small.optimizer", {"lr": 0.1})),
        TRAIN,
        CONFIG,
        "experiments.small.optimizer: unknown key",
    ),
    Case(
        "experiment-overrides-missing-key",
        params_set(("experiments.small.train.epoch", 5)),
        TRAIN,
        CONFIG,
        "experiments.small.train.epoch: unknown key (did you mean 'epochs'?)",
    ),
    Case(
        "experiment-overrides-data",
        params_set(("experiments.small.data", {"name": "mnist"})),
        TRAIN,
        CONFIG,
        "experiments.small.data",
    ),
    # knobs of another variant
    Case(
        "momentum-on-adam",
        params_set(("optim.name", "adam")),  # keeps the base's momentum: 0.9
        TRAIN,
        CONFIG,
        "optim.momentum: does not apply to optim.name 'adam'",
    ),
    Case(
        "decay-on-linear",
        params_set(("schedule", {"name": "linear", "decay": 1e-5})),
        TRAIN,
        CONFIG,
        "schedule.decay: does not apply to schedule.name 'linear'",
    ),
    # the command line
    Case(
        "unknown-command", lambda work: None, ("trian",), CONFIG, "invalid choice", one_line=False
    ),
    Case(
        "params-file-missing",
        lambda work: None,
        ("--params", "nope.yaml", "train"),
        CONFIG,
        "nope.yaml: file not found",
    ),
    Case(
        "unknown-experiment",
        lambda work: None,
        ("train", "--experiment", "nope"),
        CONFIG,
        "experiment 'nope' is not in params.yaml experiments (small)",
    ),
    # raw data
    Case(
        "dataset-missing-offline",
        # A root that does not exist: the failed download must not leave its folders behind.
        params_set(("data.name", "mnist"), ("data.root", "nowhere/raw")),
        ("prepare",),
        RUNTIME,
        "no mnist data found: put the four IDX files",
        # A proxy that refuses every connection: torchvision's download fails at once.
        env={"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"},
    ),
    Case(
        "idx-wrong-magic",
        raw_dataset(set_blob("train_images", b"\x12\x34\x08\x03" + b"\x00" * 12)),
        ("prepare",),
        RUNTIME,
        "train-images-idx3-ubyte.gz: magic number 0x12340803 is not IDX",
        True,
    ),
    Case(
        "idx-labels-for-images",
        raw_dataset(set_blob("test_images", idx(torch.arange(50) % 10))),
        ("prepare",),
        RUNTIME,
        "magic number 0x00000801, expected 0x00000803 (images)",
    ),
    Case(
        "gzip-truncated",
        raw_dataset(truncated_gzip),
        ("prepare",),
        RUNTIME,
        "train-images-idx3-ubyte.gz: gzip stream is truncated",
    ),
    Case(
        "idx-truncated-data",
        raw_dataset(set_blob("test_images", idx(torch.zeros(50, 28, 28))[:-100])),
        ("prepare",),
        RUNTIME,
        "truncated: the header promises 50x28x28",
    ),
    Case(
        "image-label-count-mismatch",
        raw_dataset(set_blob("train_labels", idx(torch.arange(199) % 10))),
        ("prepare",),
        RUNTIME,
        "holds 200 images but",
    ),
    Case(
        "label-out-of-range",
        raw_dataset(set_blob("test_labels", idx(torch.tensor([3] * 49 + [10])))),
        ("prepare",),
        RUNTIME,
        "label 10 at index 49 is outside 0..9",
    ),
    # prepared data
    Case(
        "prepared-with-another-seed",
        params_set(("seed", 1)),
        TRAIN,
        RUNTIME,
        "data was prepared with seed=4487 but the params have seed=1",
    ),
    Case(
        "prepared-with-another-subset",
        params_set(("data.train_subset", 600)),
        EVALUATE,
        RUNTIME,
        "data was prepared with data.train_subset=500 but the params have data.train_subset=600",
    ),
    Case(
        "prepared-meta-garbage",
        write_file("data/prepared/meta.json", b'{"dataset": "fashion-mn'),
        TRAIN,
        RUNTIME,
        "data/prepared/meta.json: cannot be read",
    ),
    Case(
        "prepared-split-garbage",
        write_file("data/prepared/train.pt", b"PK\x03\x04 not really a zip"),
        TRAIN,
        RUNTIME,
        "data/prepared/train.pt: cannot be loaded",
    ),
    Case(
        "prepared-split-malicious",
        malicious(lambda work: work / "data" / "prepared" / "val.pt"),
        TRAIN,
        RUNTIME,
        "data/prepared/val.pt: cannot be loaded (it holds objects other than tensors",
    ),
    # checkpoints and models (a damaged checkpoint is set aside and its member trained
    # again: tests/system/test_damaged_files.py; one that could run code stays an error)
    Case(
        "checkpoint-malicious",
        malicious(checkpoint),
        TRAIN,
        RUNTIME,
        "not a loadable checkpoint (it holds objects other than tensors and plain data",
        True,
    ),
    Case(
        "checkpoint-malicious-legacy-pickle",
        malicious(checkpoint, legacy=True),
        TRAIN,
        RUNTIME,
        "not a loadable checkpoint",
        True,
    ),
    Case(
        "model-malicious",
        malicious(lambda work: work / "models" / "small" / "model.pt"),
        EVALUATE,
        RUNTIME,
        "models/small/model.pt: cannot be loaded",
    ),
    Case(
        "model-malicious-legacy-pickle",
        malicious(lambda work: work / "models" / "small" / "model.pt", legacy=True),
        EVALUATE,
        RUNTIME,
        "models/small/model.pt: cannot be loaded",
        True,
    ),
    # pipeline files
    Case(
        "eval-metrics-garbage",
        write_file("metrics/small/eval.json", b"[1, 2"),
        ("report",),
        RUNTIME,
        "metrics/small/eval.json: cannot be read as JSON",
    ),
    # the environment
    Case(
        "tracking-server-refuses",
        lambda work: tracking_uri(f"http://127.0.0.1:{closed_port()}")(work),
        TRAIN,
        RUNTIME,
        "is unreachable",
    ),
    Case(
        "tracking-uri-unknown-scheme",
        tracking_uri("mlfow://localhost:5000"),
        TRAIN,
        RUNTIME,
        "MLFLOW_TRACKING_URI 'mlfow://localhost:5000' has an unknown scheme 'mlfow'",
    ),
    Case(
        "tracking-store-folder-blocked",
        lambda work: tracking_uri(f"sqlite:///{work / 'params.yaml'}/store/mlflow.db")(work),
        TRAIN,
        RUNTIME,
        "cannot create folder",
    ),
    Case(
        "output-folder-blocked-train",
        # No checkpoint to reuse: the stage would train (and log a run) before writing.
        both(lambda work: shutil.rmtree(work / "checkpoints"), block_folder("models")),
        TRAIN,
        RUNTIME,
        "cannot write models/small/model.pt",
        True,
    ),
    Case(
        "output-folder-blocked-evaluate",
        # An eval.json from another run: it must survive a stage that cannot finish.
        both(write_file("metrics/small/eval.json", b"{}\n"), block_folder("plots/small")),
        EVALUATE,
        RUNTIME,
        "cannot write plots/small/confusion.png",
    ),
    Case(
        "output-folder-blocked-report",
        block_folder("reports"),
        ("report",),
        RUNTIME,
        "cannot write reports/lecture.md: reports is a file, not a folder",
    ),
    Case(
        "output-folder-blocked-prepare",
        both(raw_dataset(), block_folder("data/prepared")),
        ("prepare",),
        RUNTIME,
        "cannot write data/prepared/train.pt: data/prepared is a file, not a folder",
    ),
    # tune: its search space, its storage, its outputs
    Case(
        "tune-range-low-above-high",
        params_set(("tune.space.lr", {"low": 0.2, "high": 0.01, "log": True})),
        TUNE,
        CONFIG,
        "tune.space.lr: low 0.2 must be < high 0.01",
    ),
    Case(
        "tune-log-range-through-zero",
        params_set(("tune.space.weight_decay", {"low": -0.001, "high": 0.01, "log": True})),
        TUNE,
        CONFIG,
        "tune.space.weight_decay: a log range needs low > 0, got low -0.001",
    ),
    Case(
        "tune-schedule-knob-unknown",
        params_set(("tune.space.schedule", {"linear": {"decay": {"low": 0.1, "high": 0.2}}})),
        TUNE,
        CONFIG,
        "tune.space.schedule.linear.decay: not a searchable knob of schedule 'linear'",
    ),
    Case(
        "tune-unknown-key",
        params_set(("tune.n_trial", 5)),
        TUNE,
        CONFIG,
        "tune.n_trial: unknown key (did you mean 'n_trials'?)",
    ),
    Case(
        "tune-storage-unknown-scheme",
        params_set(("tune.storage", "mongodb://localhost/optuna")),
        TUNE,
        CONFIG,
        "tune.storage: 'mongodb://localhost/optuna' has an unknown scheme 'mongodb'",
        True,
    ),
    Case(
        "tune-storage-option-unknown-scheme",
        lambda work: None,
        ("tune", "--storage", "redis://localhost:6379"),
        CONFIG,
        "--storage: 'redis://localhost:6379' has an unknown scheme 'redis'",
    ),
    Case(
        "tune-no-trials",
        lambda work: None,
        ("tune", "--n-trials", "0"),
        CONFIG,
        "--n-trials: 0 must be at least 1",
    ),
    Case(
        "tune-storage-folder-blocked",
        both(TINY_TUNE, params_set(("tune.storage", "sqlite:///params.yaml/optuna.db"))),
        TUNE,
        RUNTIME,
        "Optuna storage sqlite:///params.yaml/optuna.db: cannot create the folder of its file",
    ),
    Case(
        "output-folder-blocked-tune",
        both(TINY_TUNE, block_folder("params")),
        TUNE,
        RUNTIME,
        "cannot write params/best.yaml: params is a file, not a folder",
        True,
    ),
]


def run_cli(argv: tuple[str, ...], work: Path, as_subprocess: bool) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `deepopt <argv>` in ``work`` (in-process, the caller
    captures the output; argparse's usage errors exit through SystemExit)."""
    if as_subprocess:
        done = subprocess.run(
            [sys.executable, "-m", "deepopt.cli", *argv],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        return done.returncode, done.stdout, done.stderr
    try:
        return cli.main(list(argv)), "", ""
    except SystemExit as exit_:
        return int(exit_.code or 0), "", ""


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gives_its_message_and_exit_code_and_changes_nothing(
    case: Case,
    finished: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    work = finished
    monkeypatch.setenv("MLFLOW_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"])  # restored after
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    case.make(work)
    store = tmp_path / "mlruns" / "mlflow.db"
    files_before, store_before = workspace_snapshot(work), store_snapshot(store)
    capsys.readouterr()

    code, _, stderr = run_cli(case.argv, work, case.subprocess)
    captured = capsys.readouterr()
    stderr = stderr or captured.err

    assert code == case.code, stderr
    assert "Traceback" not in stderr
    assert "weights_only" not in stderr  # never advice to load a refused file the unsafe way
    if case.one_line:
        assert stderr.startswith("deepopt: error: ") and stderr.count("\n") == 1, stderr
    assert case.message in stderr, stderr
    assert captured.out == "", "a failing command prints no result"
    assert workspace_snapshot(work) == files_before
    assert not (work / MARKER).exists()
    assert store_snapshot(store) == store_before
    assert "RUNNING" not in store_before.get("status", {}).values()


def test_corpus_covers_the_issue() -> None:
    assert len(CASES) >= 25 and len({case.id for case in CASES}) == len(CASES)
    assert {case.code for case in CASES} == {CONFIG, RUNTIME}
    assert sum(case.subprocess for case in CASES) >= 3


@pytest.mark.slow
def test_a_hung_tracking_server_fails_within_10_s_naming_it(
    finished: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    files_before = workspace_snapshot(finished)
    with silent_server() as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        start = time.monotonic()
        code = cli.main(list(TRAIN))
        seconds = time.monotonic() - start
    stderr = capsys.readouterr().err
    assert code == RUNTIME and stderr.count("\n") == 1 and "Traceback" not in stderr
    assert f"MLflow tracking server {uri} is unreachable" in stderr
    assert seconds < 10.0
    assert workspace_snapshot(finished) == files_before
