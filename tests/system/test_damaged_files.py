"""Every file deepopt reads back, damaged every way: the whole matrix from one table.

Each row names a file (relative to the workspace; ``../mlruns/mlflow.db`` is the MLflow
store beside it), the stage that reads it, how it is damaged, a fragment of the expected
one-line message and the exit code: 1 for a damaged data or pipeline file, 2 for a damaged
config file (``params/best.yaml``, a ConfigError like params.yaml's). The damages are the
same for every file: empty, truncated (the first half of its bytes), random bytes, and
valid but the wrong type (a JSON array where an object belongs, a tensor of the wrong
shape or dtype, a YAML list, a sqlite database of something else). The rows run in copies
of conftest's finished workspace (and of one tuned once from it, for the files of ``tune``).

A failing row must print exactly one line, ``deepopt: error: ...``, naming the file, what
is wrong and what to do, no traceback, and leave every file of the workspace and of the
MLflow store as it was: the same bytes and modification times, the damaged file included.
Where recovery is safe the row expects exit 0 instead, one ``deepopt: warning:`` line
saying what was done, and only the files the recovery rewrites (``changes``) changed.
"""

from __future__ import annotations

import contextlib
import fnmatch
import gzip
import json
import random
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from test_bad_input import (
    CONFIG,
    RUNTIME,
    TINY_TUNE,
    Make,
    both,
    idx,
    params_set,
    raw_dataset,
    run_cli,
    store_snapshot,
    workspace_snapshot,
)
from test_hardening import _history_without_seconds

from conftest import Finished
from deepopt import cli
from deepopt.config.loading import TUNE_OVERRIDES_END
from deepopt.data import CIFAR_FILES, RAW_FILES

# ---------------------------------------------------------------------------------------
# Damages: each rewrites the file at ``path`` in place


@dataclass(frozen=True)
class Damage:
    name: str
    apply: Callable[[Path], None]


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random(path: Path) -> None:
    """As many random bytes as the file held (at least 256): no magic number of any
    format (zip, pickle, gzip, IDX, sqlite) at the start, and never valid UTF-8."""
    size = max(path.stat().st_size, 256)
    noise = bytearray(random.Random(path.name).randbytes(size))
    noise[:2] = b"\xa5\xff"
    path.write_bytes(bytes(noise))


def _zeroed(path: Path) -> None:
    """64 bytes in the middle set to zero: the archive stays whole, its data does not."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(data))


EMPTY = Damage("empty", _empty)
ZEROED = Damage("bytes-zeroed", _zeroed)
CRC = "in its zip archive fails its CRC check"
TRUNCATED = Damage("truncated", _truncated)
RANDOM = Damage("random", _random)


def torch_file(name: str, content: Any) -> Damage:
    return Damage(name, lambda path: torch.save(content, path))


def edit_torch(name: str, change: Callable[[dict[str, Any]], None]) -> Damage:
    """The file's own (loaded) content, changed by ``change`` and saved again."""

    def apply(path: Path) -> None:
        content = torch.load(path, weights_only=True)
        change(content)
        torch.save(content, path)

    return Damage(name, apply)


def json_file(name: str, content: Any) -> Damage:
    return Damage(name, lambda path: path.write_text(json.dumps(content), encoding="utf-8"))


def edit_json(name: str, change: Callable[[dict[str, Any]], None]) -> Damage:
    def apply(path: Path) -> None:
        content = json.loads(path.read_text(encoding="utf-8"))
        change(content)
        path.write_text(json.dumps(content), encoding="utf-8")

    return Damage(name, apply)


def text_file(name: str, text: str) -> Damage:
    return Damage(name, lambda path: path.write_text(text, encoding="utf-8"))


def keep_lines(name: str, lines: int) -> Damage:
    """The first ``lines`` lines, whole: a file cut at a line end."""

    def apply(path: Path) -> None:
        kept = path.read_text(encoding="utf-8").splitlines(keepends=True)[:lines]
        path.write_text("".join(kept), encoding="utf-8")

    return Damage(name, apply)


def cut_line(line: int, cells: int) -> Callable[[Path], None]:
    """Cut a CSV file after the ``cells``-th cell of line ``line`` (1 is the header): a
    truncation whose place does not depend on how wide the numbers before it are."""

    def apply(path: Path) -> None:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        partial = ",".join(lines[line - 1].split(",")[:cells])
        path.write_text("".join(lines[: line - 1]) + partial, encoding="utf-8")

    return apply


def other_database(path: Path) -> None:
    """A valid sqlite database of something else in place of the file."""
    path.unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        db.executemany("INSERT INTO notes (text) VALUES (?)", [("a note",)] * 50)
        db.commit()


def optuna_database(path: Path) -> None:
    """A real Optuna storage with one study in place of the file."""
    path.unlink(missing_ok=True)
    optuna.create_study(study_name="other", storage=f"sqlite:///{path}")


def mlflow_database(path: Path) -> None:
    """The workspace's real MLflow store in place of the file."""
    store = path.parents[0] / ".." / "mlruns" / "mlflow.db"
    shutil.copyfile(store, path)


def _bump(key: str, change: Callable[[Any], Any]) -> Callable[[dict[str, Any]], None]:
    """Change the value at a dotted key of a loaded dict."""

    def apply(content: dict[str, Any]) -> None:
        *parents, last = key.split(".")
        node = content
        for part in parents:
            node = node[part]
        node[last] = change(node[last])

    return apply


def _first_weight(loop_key: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    def apply(content: dict[str, Any]) -> None:
        weights = content["loop"][loop_key]
        name = next(iter(weights))
        weights[name] = change(weights[name])

    return apply


def _first_member_weight(content: dict[str, Any], change: Callable[[Any], Any]) -> None:
    weights = content["members"][0]["state_dict"]
    name = next(iter(weights))
    weights[name] = change(weights[name])


def _unfinished(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def apply(content: dict[str, Any]) -> None:
        content["finished"] = False
        change(content)

    return apply


# ---------------------------------------------------------------------------------------
# Setups: make the file to damage where the finished workspace has none


def plain_idx(work: Path) -> None:
    """raw_dataset's files gunzipped (data.root may hold them either way)."""
    for packed in (work / "data" / "raw" / "kmnist").glob("*.gz"):
        packed.with_suffix("").write_bytes(gzip.decompress(packed.read_bytes()))
        packed.unlink()


def cifar_dataset(work: Path) -> None:
    """Six tiny CIFAR-10 binary batch files (20 records each) in data/raw/cifar10/."""
    folder = work / "data" / "raw" / "cifar10"
    folder.mkdir(parents=True)
    generator = random.Random(10)
    for name in CIFAR_FILES.values():
        records = [bytes([i % 10]) + generator.randbytes(3 * 32 * 32) for i in range(20)]
        (folder / name).write_bytes(b"".join(records))
    params_set(("data.name", "cifar10"), ("data.train_subset", 100))(work)


# ---------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Row:
    file: str  # relative to the workspace; a glob where the name is a hash
    argv: tuple[str, ...]  # the stage that reads it
    damage: Damage
    message: str  # a fragment of the one line (the warning where code is 0)
    code: int = RUNTIME
    setup: Make | None = None  # makes the file (and the params) before it is damaged
    changes: tuple[str, ...] = ()  # globs of the files a recovery (code 0) rewrites
    tuned: bool = False  # in the tuned workspace (optuna.db, params/best.yaml)
    subprocess: bool = False  # run as `python -m deepopt.cli`: a user's real stderr

    @property
    def id(self) -> str:
        return f"{Path(self.file).name}-{self.damage.name}-{self.argv[0]}"


TRAIN = ("train", "--experiment", "small")
EVALUATE = ("evaluate", "--experiment", "small")
REPORT = ("report",)
PREPARE = ("prepare",)
TUNE = ("tune",)
TRAIN_BEST = ("train", "--experiment", "train_best", "--overrides", "params/best.yaml")

SPLIT_SHAPE = "expected {'images': uint8 [N, 28, 28] or [N, C, H, W], 'labels': int64 [N]}"
CKPT = "checkpoints/small/*.pt"
STORE = "../mlruns/mlflow.db"
# What train rewrites when it trains the member again (and the store a new run goes to).
RETRAINED = (CKPT, "checkpoints/small/*", "models/small/*", "metrics/small/*", "plots/small/*")
RECORDED = ("../mlruns/*",)
IDX_GZ = f"data/raw/kmnist/{RAW_FILES['train_images']}.gz"
IDX = f"data/raw/kmnist/{RAW_FILES['test_labels']}"
CIFAR = f"data/raw/cifar10/{CIFAR_FILES['train_batch_2']}"
RECOVERED = "set aside as "  # the warning of a set-aside checkpoint
NOT_A_CHECKPOINT = "not a deepopt checkpoint"

ROWS = [
    # data/prepared/*.pt: uint8 images and int64 labels, read by every training stage
    Row("data/prepared/train.pt", TRAIN, EMPTY, "train.pt: cannot be loaded (the file is empty)"),
    Row(
        "data/prepared/train.pt",
        TRAIN,
        TRUNCATED,
        "train.pt: cannot be loaded (truncated: its zip archive has no end record); run "
        "`deepopt prepare`",
        subprocess=True,
    ),
    Row(
        "data/prepared/train.pt", TRAIN, RANDOM, "train.pt: cannot be loaded (not a file torch.save"
    ),
    Row("data/prepared/train.pt", TRAIN, ZEROED, "train.pt: cannot be loaded (damaged: "),
    Row("data/prepared/train.pt", TRAIN, torch_file("list", [1, 2]), "train.pt: holds a list"),
    Row(
        "data/prepared/train.pt",
        TRAIN,
        edit_torch("float-images", _bump("images", lambda t: t.float())),
        "train.pt: holds {'images': float32 [450, 28, 28], 'labels': int64 [450]}; " + SPLIT_SHAPE,
    ),
    Row(
        "data/prepared/train.pt",
        TRAIN,
        edit_torch("flat-images", _bump("images", lambda t: t.reshape(len(t), -1))),
        "train.pt: holds {'images': uint8 [450, 784], 'labels': int64 [450]}",
    ),
    Row(
        "data/prepared/train.pt",
        TRAIN,
        edit_torch("labels-short", _bump("labels", lambda t: t[:-1])),
        "'labels': int64 [449]}",
    ),
    Row("data/prepared/val.pt", EVALUATE, EMPTY, "val.pt: cannot be loaded (the file is empty)"),
    Row(
        "data/prepared/val.pt", EVALUATE, TRUNCATED, "val.pt: cannot be loaded (truncated: its zip"
    ),
    Row("data/prepared/val.pt", EVALUATE, RANDOM, "val.pt: cannot be loaded (not a file torch"),
    Row(
        "data/prepared/val.pt",
        EVALUATE,
        edit_torch("int32-labels", _bump("labels", lambda t: t.int())),
        "val.pt: holds {'images': uint8 [50, 28, 28], 'labels': int32 [50]}",
    ),
    Row(
        "data/prepared/test.pt",
        TUNE,
        TRUNCATED,
        "test.pt: cannot be loaded (truncated: its zip archive",
        setup=TINY_TUNE,
    ),
    # data/prepared/meta.json: what the splits were made from, read with them
    Row("data/prepared/meta.json", TRAIN, EMPTY, "meta.json: cannot be read (the file is empty)"),
    Row(
        "data/prepared/meta.json",
        TRAIN,
        TRUNCATED,
        "meta.json: cannot be read (JSONDecodeError: Unterminated string",
    ),
    Row("data/prepared/meta.json", TRAIN, RANDOM, "meta.json: cannot be read (UnicodeDecodeError"),
    Row(
        "data/prepared/meta.json",
        TRAIN,
        json_file("array", [1, 2]),
        "meta.json: holds a JSON array, expected an object",
    ),
    Row(
        "data/prepared/meta.json",
        TRAIN,
        json_file("object-without-keys", {}),
        "meta.json: has no 'dataset' (a dataset name)",
    ),
    Row(
        "data/prepared/meta.json",
        TRAIN,
        edit_json("params-a-list", _bump("params", lambda p: list(p.values()))),
        "meta.json: 'params' is [4487, 500, 0.1], expected {seed, train_subset, val_fraction}",
    ),
    Row(
        "data/prepared/meta.json",
        TRAIN,
        edit_json("mean-a-word", _bump("mean", lambda m: "grey")),
        "meta.json: 'mean' is 'grey', expected a finite number",
    ),
    Row("data/prepared/meta.json", REPORT, EMPTY, "meta.json: the file is empty; run `dvc repro`"),
    Row(
        "data/prepared/meta.json",
        REPORT,
        json_file("array", ["fashion-mnist"]),
        "meta.json: expected a JSON object, got an array",
    ),
    Row(
        "data/prepared/meta.json",
        REPORT,
        json_file("object-without-keys", {}),
        "meta.json: has no 'dataset' name",
    ),
    # checkpoints: a damaged one is set aside and its member trains from the start
    Row(
        CKPT,
        TRAIN,
        EMPTY,
        "not a loadable checkpoint (the file is empty); " + RECOVERED,
        code=0,
        changes=RETRAINED + RECORDED,
        subprocess=True,
    ),
    Row(
        CKPT,
        TRAIN,
        TRUNCATED,
        "not a loadable checkpoint (truncated: its zip archive has no end record)",
        code=0,
        changes=RETRAINED + RECORDED,
    ),
    Row(
        CKPT,
        TRAIN,
        RANDOM,
        "not a loadable checkpoint (not a file torch.save writes",
        code=0,
        changes=RETRAINED + RECORDED,
    ),
    Row(CKPT, TRAIN, ZEROED, CRC, code=0, changes=RETRAINED + RECORDED),
    Row(
        CKPT,
        TRAIN,
        torch_file("list", [1, 2]),
        f"{NOT_A_CHECKPOINT} (it holds a list, not a dict); " + RECOVERED,
        code=0,
        changes=RETRAINED + RECORDED,
    ),
    Row(
        CKPT,
        TRAIN,
        edit_torch("wrong-shape", _first_weight("model", lambda t: t[:1])),
        "model weight 'conv1.weight' is torch.float32 [1, 1, 5, 5], the network's torch.float32 "
        "[4, 1, 5, 5]; " + RECOVERED,
        code=0,
        changes=RETRAINED + RECORDED,
    ),
    Row(
        CKPT,
        TRAIN,
        edit_torch(
            "unfinished-wrong-dtype", _unfinished(_first_weight("model", lambda t: t.double()))
        ),
        "model weight 'conv1.weight' is torch.float64 [4, 1, 5, 5]",
        code=0,
        changes=RETRAINED + RECORDED,
    ),
    Row(
        CKPT,
        TRAIN,
        edit_torch("unfinished-history-short", _unfinished(_bump("loop.history", lambda h: h[1:]))),
        f"{NOT_A_CHECKPOINT} (its history does not hold 3 epoch records of numbers)",
        code=0,
        changes=RETRAINED + RECORDED,
    ),
    # models/<experiment>/model.pt and run.json: what evaluate reads
    Row("models/small/model.pt", EVALUATE, EMPTY, "model.pt: cannot be loaded (the file is empty)"),
    Row(
        "models/small/model.pt",
        EVALUATE,
        TRUNCATED,
        "model.pt: cannot be loaded (truncated: its zip",
    ),
    Row("models/small/model.pt", EVALUATE, RANDOM, "model.pt: cannot be loaded (not a file torch"),
    Row("models/small/model.pt", EVALUATE, ZEROED, "model.pt: cannot be loaded (damaged: "),
    Row(
        "models/small/model.pt",
        EVALUATE,
        torch_file("list", [1, 2]),
        "model.pt: not a model file of train (it holds a list)",
    ),
    Row(
        "models/small/model.pt",
        EVALUATE,
        edit_torch("no-members", lambda content: content.pop("members")),
        "model.pt: not a model file of train ('members')",
    ),
    Row(
        "models/small/model.pt",
        EVALUATE,
        edit_torch("wrong-shape", lambda content: _first_member_weight(content, lambda t: t[:1])),
        "model.pt: not a model file of train (Error(s) in loading state_dict",
    ),
    Row(
        "models/small/model.pt",
        EVALUATE,
        edit_torch("members-empty", _bump("members", lambda m: [])),
        "model.pt: holds no trained members",
    ),
    Row("models/small/run.json", EVALUATE, EMPTY, "run.json: not a run record of train (the file"),
    Row("models/small/run.json", EVALUATE, TRUNCATED, "run.json: not a run record of train ("),
    Row("models/small/run.json", EVALUATE, RANDOM, "run.json: not a run record of train ('utf-8'"),
    Row(
        "models/small/run.json",
        EVALUATE,
        json_file("array", [1, 2]),
        "run.json: not a run record of train (it holds a list)",
    ),
    Row(
        "models/small/run.json",
        EVALUATE,
        edit_json("runs-an-object", _bump("runs", lambda runs: runs[0])),
        "run.json: not a run record of train (it holds no 'runs' list)",
    ),
    Row(
        "models/small/run.json",
        EVALUATE,
        edit_json("run-without-id", lambda info: info["runs"][0].pop("run_id")),
        "run.json: not a run record of train (no 'run_id')",
    ),
    # metrics/ and plots/: what the report reads
    Row(
        "metrics/small/train.json", REPORT, EMPTY, "train.json: the file is empty; run `dvc repro`"
    ),
    Row("metrics/small/train.json", REPORT, TRUNCATED, "train.json: cannot be read as JSON"),
    Row("metrics/small/train.json", REPORT, RANDOM, "train.json: cannot be read as JSON ('utf-8'"),
    Row(
        "metrics/small/train.json",
        REPORT,
        json_file("array", [0.9]),
        "train.json: expected a JSON object, got an array; run `dvc repro`",
    ),
    Row(
        "metrics/small/train.json",
        REPORT,
        edit_json("runs-a-word", lambda train: train.update(runs="all")),
        "train.json: 'runs' must be a non-empty list of objects; run `dvc repro`",
    ),
    Row(
        "metrics/small/train.json",
        REPORT,
        edit_json("number-a-word", _bump("best_val_acc", lambda value: "high")),
        "train.json: 'best_val_acc' is 'high', expected a finite number; run `dvc repro`",
    ),
    Row("metrics/small/eval.json", REPORT, EMPTY, "eval.json: the file is empty; run `dvc repro`"),
    Row("metrics/small/eval.json", REPORT, TRUNCATED, "eval.json: cannot be read as JSON"),
    Row("metrics/small/eval.json", REPORT, RANDOM, "eval.json: cannot be read as JSON ('utf-8'"),
    Row(
        "metrics/small/eval.json",
        REPORT,
        json_file("array", [0.9]),
        "eval.json: expected a JSON object, got an array; run `dvc repro`",
    ),
    Row(
        "metrics/small/eval.json",
        REPORT,
        edit_json("number-a-word", _bump("test_acc", lambda value: "high")),
        "eval.json: 'test_acc' is 'high', expected a finite number",
    ),
    Row(
        "plots/small/history.csv", REPORT, EMPTY, "history.csv: the file is empty; run `dvc repro`"
    ),
    Row(
        "plots/small/history.csv",
        REPORT,
        Damage("truncated", cut_line(3, 2)),
        "history.csv: line 3 has 2 cells, the header 7; run `dvc repro`",
    ),
    Row(
        "plots/small/history.csv",
        REPORT,
        keep_lines("cut-at-a-line-end", 3),
        "history.csv: holds 2 epochs but metrics/small/train.json says the run ran 3",
    ),
    Row("plots/small/history.csv", REPORT, RANDOM, "history.csv: cannot be read ('utf-8' codec"),
    Row(
        "plots/small/history.csv",
        REPORT,
        text_file("json", '{"epoch": [0, 1, 2]}\n'),
        "history.csv: missing column(s) epoch, val_loss, lr",
    ),
    Row(
        "plots/small/history.csv",
        REPORT,
        Damage("cell-a-word", lambda p: p.write_text(p.read_text().replace("0.02", "fast", 1))),
        "history.csv: line 2 holds a value that is not a number; run `dvc repro`",
    ),
    # params/best.yaml: a config file (exit 2), read by train --overrides
    Row("params/best.yaml", TRAIN_BEST, EMPTY, "best.yaml: file is empty", CONFIG, tuned=True),
    Row(
        "params/best.yaml",
        TRAIN_BEST,
        TRUNCATED,
        f"best.yaml: truncated (its last line is not {TUNE_OVERRIDES_END!r}); run `deepopt tune`",
        CONFIG,
        tuned=True,
    ),
    Row("params/best.yaml", TRAIN_BEST, RANDOM, "best.yaml: cannot be read", CONFIG, tuned=True),
    Row(
        "params/best.yaml",
        TRAIN_BEST,
        text_file("list", "- optim\n- train\n"),
        "best.yaml: expected a mapping of sections, got list",
        CONFIG,
        tuned=True,
    ),
    Row(
        "params/best.yaml",
        TRAIN_BEST,
        text_file("section-a-word", "optim: fast\n"),
        "best.yaml: optim",
        CONFIG,
        tuned=True,
    ),
    # optuna.db: tune's storage; an empty file becomes a new one
    Row(
        "optuna.db",
        TUNE,
        EMPTY,
        "optuna.db is empty: a new Optuna storage is created in it",
        code=0,
        changes=("optuna.db", "params/best.yaml", "checkpoints/tune/**", *RECORDED),
        tuned=True,
    ),
    Row(
        "optuna.db",
        TUNE,
        TRUNCATED,
        "optuna.db is not a usable Optuna storage (database disk image is malformed); move it "
        "aside and rerun, or set tune.storage to another file",
        tuned=True,
    ),
    Row(
        "optuna.db",
        TUNE,
        RANDOM,
        "optuna.db is not a usable Optuna storage (file is not a database)",
        tuned=True,
    ),
    Row(
        "optuna.db",
        TUNE,
        Damage("other-database", other_database),
        "optuna.db is not a usable Optuna storage (a sqlite database of something else: tables "
        "notes)",
        tuned=True,
    ),
    Row(
        "optuna.db",
        TUNE,
        Damage("mlflow-store", mlflow_database),
        "optuna.db is not a usable Optuna storage (a sqlite database of something else: tables "
        "alembic_version,",
        tuned=True,
    ),
    # mlruns/mlflow.db: the MLflow store; an empty file becomes a new one
    Row(
        STORE,
        TRAIN,
        EMPTY,
        "mlflow.db is empty: a new MLflow store is created in it",
        code=0,
        changes=RETRAINED + RECORDED,
    ),
    Row(
        STORE,
        TRAIN,
        TRUNCATED,
        "mlflow.db is not a usable MLflow store (database disk image is malformed); move it "
        "aside and rerun, or point MLFLOW_TRACKING_URI elsewhere",
        subprocess=True,
    ),
    Row(STORE, TRAIN, RANDOM, "mlflow.db is not a usable MLflow store (file is not a database)"),
    Row(
        STORE,
        TRAIN,
        Damage("other-database", other_database),
        "mlflow.db is not a usable MLflow store (a sqlite database of something else: "
        "tables notes)",
    ),
    Row(
        STORE,
        TRAIN,
        Damage("optuna-storage", optuna_database),
        "mlflow.db is not a usable MLflow store (a sqlite database of something else: tables "
        "alembic_version, studies,",
    ),
    # raw IDX files (gzipped or not) and CIFAR-10 batches: what prepare reads
    Row(IDX_GZ, PREPARE, EMPTY, "ubyte.gz: the file is empty", setup=raw_dataset()),
    Row(IDX_GZ, PREPARE, TRUNCATED, "ubyte.gz: gzip stream is truncated", setup=raw_dataset()),
    Row(IDX_GZ, PREPARE, RANDOM, "ubyte.gz: not a valid gzip file", setup=raw_dataset()),
    Row(
        IDX_GZ,
        PREPARE,
        Damage("labels-file", lambda p: p.write_bytes(gzip.compress(idx(torch.arange(200) % 10)))),
        "ubyte.gz: magic number 0x00000801, expected 0x00000803 (images)",
        setup=raw_dataset(),
    ),
    Row(IDX, PREPARE, EMPTY, "ubyte: the file is empty", setup=both(raw_dataset(), plain_idx)),
    Row(
        IDX,
        PREPARE,
        TRUNCATED,
        "t10k-labels-idx1-ubyte: truncated: the header promises 50 = 50 bytes of data but only 21",
        setup=both(raw_dataset(), plain_idx),
    ),
    Row(
        IDX,
        PREPARE,
        RANDOM,
        "t10k-labels-idx1-ubyte: magic number 0xa5ff",
        setup=both(raw_dataset(), plain_idx),
    ),
    Row(
        IDX,
        PREPARE,
        Damage("gzip-bytes", lambda p: p.write_bytes(gzip.compress(p.read_bytes()))),
        "t10k-labels-idx1-ubyte: magic number 0x1f8b0800 is not IDX",
        setup=both(raw_dataset(), plain_idx),
    ),
    Row(CIFAR, PREPARE, EMPTY, "data_batch_2.bin: the file is empty", setup=cifar_dataset),
    Row(
        CIFAR,
        PREPARE,
        TRUNCATED,
        "data_batch_2.bin: holds 10 records but the other batch files 20 each",
        setup=cifar_dataset,
    ),
    Row(
        CIFAR,
        PREPARE,
        RANDOM,
        "data_batch_2.bin: label 165 of record 0 is outside 0..9",
        setup=cifar_dataset,
    ),
    Row(
        CIFAR,
        PREPARE,
        Damage("idx-file", lambda p: p.write_bytes(idx(torch.zeros(20, 28, 28)))),
        "data_batch_2.bin: 15696 bytes is not a whole number of CIFAR-10 records",
        setup=cifar_dataset,
    ),
]

# Every line says what to do about it (a config error may say what is allowed instead).
WHAT_TO_DO = ("run `", "move it aside", "replace it with an intact copy", "delete it")
ALLOWED = ("expected", "should be", "must be")


# ---------------------------------------------------------------------------------------
# Workspaces


@pytest.fixture(scope="session")
def tuned_workspace(finished_workspace: Finished, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The finished workspace after a one-trial tune: optuna.db and params/best.yaml."""
    root = tmp_path_factory.mktemp("tuned")
    shutil.copytree(finished_workspace.work, root / "work")
    shutil.copytree(finished_workspace.store, root / "mlruns")
    TINY_TUNE(root / "work")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root / "work")
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlruns'}/mlflow.db")
        assert cli.main(list(TUNE)) == 0
    return root


@pytest.fixture()
def workspace_for(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[[Row], Path]:
    """A private copy of the finished (or tuned) workspace and its store; runs inside it."""

    def make(row: Row) -> Path:
        if row.tuned:
            source = request.getfixturevalue("tuned_workspace")
            work, store = source / "work", source / "mlruns"
        else:
            finished: Finished = request.getfixturevalue("finished_workspace")
            work, store = finished.work, finished.store
        shutil.copytree(work, tmp_path / "work")
        shutil.copytree(store, tmp_path / "mlruns", dirs_exist_ok=True)
        # The session's store may be open in this process: fold the copy's WAL into its
        # file, so that the damage is done to the whole store (and sqlite adds nothing).
        with contextlib.closing(sqlite3.connect(tmp_path / "mlruns" / "mlflow.db")) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        monkeypatch.chdir(tmp_path / "work")
        return tmp_path / "work"

    return make


def locate(work: Path, pattern: str) -> Path:
    (path,) = work.glob(pattern) if "*" in pattern else [work / pattern]
    return path


# Files sqlite creates beside a database while it is open, and removes again.
TRANSIENT = ("*-wal", "*-shm", "*-journal")


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``root`` (its sha256 and modification time) and every folder."""
    return {
        name: (digest, 0 if digest == "folder" else (root / name).stat().st_mtime_ns)
        for name, digest in workspace_snapshot(root).items()
        if not any(fnmatch.fnmatch(name, pattern) for pattern in TRANSIENT)
    }


def _store(root: Path) -> dict[str, Any]:
    with contextlib.suppress(sqlite3.Error):
        return store_snapshot(root / "mlruns" / "mlflow.db")
    return {"unreadable": True}


def _changed(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    return {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}


def _from_root(pattern: str) -> str:
    """A row's glob relative to the workspace as one relative to the test's folder."""
    return pattern.removeprefix("../") if pattern.startswith("../") else f"work/{pattern}"


# ---------------------------------------------------------------------------------------
# The matrix


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_a_damaged_file_gives_one_line_and_changes_nothing(
    row: Row, workspace_for: Callable[[Row], Path], capfd: pytest.CaptureFixture[str]
) -> None:
    work = workspace_for(row)
    root = work.parent
    if row.setup is not None:
        row.setup(work)
    target = locate(work, row.file)
    row.damage.apply(target)
    damaged = target.read_bytes()
    store_before = _store(root)  # first: opening the store folds its WAL into the file
    files_before = snapshot(root)
    capfd.readouterr()

    code, out, err = run_cli(row.argv, work, row.subprocess)
    captured = capfd.readouterr()
    out, err = out or captured.out, err or captured.err

    assert code == row.code, err[-3000:]
    assert "Traceback" not in err and "weights_only" not in err, err[-3000:]
    changed = _changed(files_before, snapshot(root))
    if row.code == 0:  # recovered: said so in one warning line, then done
        warnings = [line for line in err.splitlines() if line.startswith("deepopt: ")]
        assert len(warnings) == 1 and warnings[0].startswith("deepopt: warning: "), err
        assert row.message in warnings[0] and target.name in warnings[0], warnings[0]
        allowed = [_from_root(pattern) for pattern in row.changes]
        assert {n for n in changed if not any(fnmatch.fnmatch(n, p) for p in allowed)} == set()
        assert "RUNNING" not in _store(root)["status"].values()
    else:
        assert err.startswith("deepopt: error: ") and err.count("\n") == 1, err[-3000:]
        assert row.message in err and target.name in err, err
        hints = WHAT_TO_DO + (ALLOWED if row.code == CONFIG else ())
        assert any(hint in err for hint in hints), err
        assert out == "", "a failing command prints no result"
        assert changed == set(), "a failing command changes no file"
        assert _store(root) == store_before
        assert target.read_bytes() == damaged


def test_a_damaged_checkpoint_is_kept_aside_and_its_member_trained_again(
    finished: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The recovery in full: the bytes are kept as <name>.pt.corrupt, the member trains
    from the start into a new MLflow run, and the outputs are those of the first training."""
    (path,) = (finished / "checkpoints" / "small").glob("*.pt")
    before = torch.load(path, weights_only=True)
    history = _history_without_seconds(finished)
    store = finished.parent / "mlruns" / "mlflow.db"
    runs_before = store_snapshot(store)["status"]
    path.write_bytes(b"\x00" * 64)

    assert cli.main(list(TRAIN)) == 0
    err = capfd.readouterr().err
    assert f"{path.name}.corrupt" in err and "epoch 1/3" in err  # trained from the start
    assert (path.parent / f"{path.name}.corrupt").read_bytes() == b"\x00" * 64
    after = torch.load(path, weights_only=True)
    assert after["finished"] and after["loop"]["epochs_done"] == 3
    assert [r["val_loss"] for r in after["loop"]["history"]] == [
        r["val_loss"] for r in before["loop"]["history"]
    ]
    runs = store_snapshot(store)["status"]
    assert set(runs_before) < set(runs) and set(runs.values()) == {"FINISHED"}
    new_run = json.loads((finished / "models" / "small" / "run.json").read_text())["runs"][0]
    assert new_run["run_id"] in set(runs) - set(runs_before)
    assert _history_without_seconds(finished) == history  # the same network again

    # A second damage of the same file keeps the first one's bytes too.
    path.write_bytes(b"")
    assert cli.main(list(TRAIN)) == 0
    assert (path.parent / f"{path.name}.corrupt.2").read_bytes() == b""


def test_a_checkpoint_refused_as_unsafe_is_not_recovered(
    finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file holding objects other than tensors was not written by deepopt: it stays an
    error (exit 1) and stays where it is, for whoever planted it to be found."""
    (path,) = (finished / "checkpoints" / "small").glob("*.pt")
    torch.save({"loop": Finished(work=finished, store=finished)}, path)
    planted = path.read_bytes()
    assert cli.main(list(TRAIN)) == RUNTIME
    err = capsys.readouterr().err
    assert "not a loadable checkpoint (it holds objects other than tensors" in err
    assert path.read_bytes() == planted and not list(path.parent.glob("*.corrupt*"))


def test_the_table_covers_every_file_and_every_damage() -> None:
    files = {
        "train.pt",
        "val.pt",
        "test.pt",
        "meta.json",
        "*.pt",
        "model.pt",
        "run.json",
        "train.json",
        "eval.json",
        "history.csv",
        "best.yaml",
        "optuna.db",
        "mlflow.db",
        Path(IDX_GZ).name,
        Path(IDX).name,
        Path(CIFAR).name,
    }
    assert {Path(row.file).name for row in ROWS} == files
    kinds = {"empty", "truncated", "random"}
    for name in files - {"test.pt"}:  # test.pt: loaded like the other two, by tune here
        damages = {row.damage.name for row in ROWS if Path(row.file).name == name}
        assert kinds < damages, (name, damages)  # and at least one wrong type
    assert len({row.id for row in ROWS}) == len(ROWS)
    assert {row.code for row in ROWS} == {0, RUNTIME, CONFIG}
