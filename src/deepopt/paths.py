"""Where each stage reads and writes, relative to the repository root, and the wall that
keeps every output there.

dvc.yaml names the same paths (DVC needs them literally); ``tests/system/test_dvc_yaml.py``
checks the two agree, so a path is changed here and in dvc.yaml together.

**Outputs stay inside.** ``check_output`` (called by every writer and lock in
``deepopt.files`` before it creates a folder or opens a file) resolves a target's folder
(symlinks and ``..``) and refuses it (ConfigError, exit 2) unless it lies inside the
workspace (``repo_root``) or inside a folder the user configured for files deepopt writes:
``train.checkpoint_dir`` (registered by ``checkpoint_dir`` and ``transfer_checkpoint_dir``,
its only readers) and ``data.root`` (by ``data.locate_raw``), through
``allow_outputs_under``. This holds whatever a name check before it let through
(``models/../../x``, an absolute "name") and for an output folder that is a symlink to
elsewhere. The Optuna storage and the MLflow store are not checked: each is one path the
user wrote whole, and deepopt joins no name onto it.
"""

from __future__ import annotations

import os
from pathlib import Path

from deepopt.errors import ConfigError

__all__ = [
    "BASE_EXPERIMENT",
    "BEST_EXPERIMENT",
    "BEST_PARAMS",
    "COMPARE_DIR",
    "COMPARE_METRICS",
    "COMPARE_PROFILE_PLOT",
    "COMPARE_REPORT",
    "COMPARE_REPORT_HTML",
    "COMPARE_STUDIES",
    "FIGURES_DIR",
    "LR_FIND_DIR",
    "PARAMS_FILE",
    "PREPARED_DIR",
    "REPORT_DIR",
    "REPORT_FILE",
    "REPORT_HTML",
    "REPORT_PLOTS",
    "SUMMARY_METRICS",
    "TRANSFER_DIR",
    "allow_outputs_under",
    "check_output",
    "checkpoint_dir",
    "checkpoint_lock",
    "compare_best_path",
    "compare_checkpoint_dir",
    "compare_runs_path",
    "eval_metrics_path",
    "history_path",
    "lr_find_curve_path",
    "lr_find_metrics_path",
    "lr_find_plot_path",
    "meta_path",
    "model_path",
    "output_roots",
    "plots_dir",
    "prepared_split_path",
    "repo_root",
    "run_info_path",
    "runs_history_path",
    "train_metrics_path",
    "transfer_checkpoint_dir",
    "transfer_metrics_path",
    "transfer_model_path",
    "transfer_plot_path",
    "transfer_report_path",
]

PARAMS_FILE = Path("params.yaml")
BASE_EXPERIMENT = "base"  # the run config without any experiment applied (no experiments)
BEST_EXPERIMENT = "train_best"  # the study's best params, trained by dvc.yaml's train_best
BEST_PARAMS = Path("params/best.yaml")  # written by tune: the best trial's overrides
PREPARED_DIR = Path("data/prepared")
FIGURES_DIR = Path("figures")  # the figures stage's one out: the lecture's figures
REPORT_DIR = Path("reports")  # the report stage's one out: lecture.md and its plots
REPORT_FILE = "lecture.md"
REPORT_HTML = "index.html"  # the same report as one self-contained page, beside lecture.md
# The report stage's metrics file for `dvc exp show` (reporting/summary.py); not in reports/
# (that folder is one cached out) nor in metrics/ (a dependency of the same stage).
SUMMARY_METRICS = Path("summary.json")
REPORT_PLOTS = {  # figure key -> file in REPORT_DIR
    "val_loss": "val_loss.png",
    "lr": "lr.png",
    "zero_fraction": "zero_fraction.png",
    "grad_norms": "grad_norms.png",
    "deep_grad_norms": "deep_grad_norms.png",
}
# `deepopt lr-find` writes <experiment>.json, .csv and .png here, a folder of its own: an
# experiment name is a folder under models/, metrics/, plots/ and checkpoints/ (in metrics/
# an experiment named lr_find would meet the test's files), never one of lr_find/.
LR_FIND_DIR = Path("lr_find")
# The transfer pipeline (transfer/dvc.yaml) keeps all its outputs here, apart from the
# main pipeline's metrics/ and plots/, which the report stage depends on as folders.
TRANSFER_DIR = Path("transfer")
# The compare pipeline (compare/dvc.yaml): which optimizer, each tuned with the same budget.
COMPARE_DIR = Path("compare")
COMPARE_STUDIES = COMPARE_DIR / "studies.json"  # each study's counts, cost and best trial
COMPARE_REPORT = COMPARE_DIR / "report.md"
COMPARE_REPORT_HTML = COMPARE_DIR / "report.html"  # the same, one offline page
COMPARE_PROFILE_PLOT = COMPARE_DIR / "profile.png"  # seeds at the target by epoch
COMPARE_METRICS = COMPARE_DIR / "metrics.json"  # dvc metrics: mean test accuracies


def prepared_split_path(split: str) -> Path:
    """data/prepared/{train,val,test}.pt: uint8 images and int64 labels."""
    return PREPARED_DIR / f"{split}.pt"


def meta_path() -> Path:
    return PREPARED_DIR / "meta.json"


def model_path(experiment: str) -> Path:
    return Path("models") / experiment / "model.pt"


def run_info_path(experiment: str) -> Path:
    """The MLflow run ids of a trained experiment, for evaluate to log into the same runs."""
    return Path("models") / experiment / "run.json"


def train_metrics_path(experiment: str) -> Path:
    return Path("metrics") / experiment / "train.json"


def eval_metrics_path(experiment: str) -> Path:
    return Path("metrics") / experiment / "eval.json"


def plots_dir(experiment: str) -> Path:
    return Path("plots") / experiment


def history_path(experiment: str) -> Path:
    return plots_dir(experiment) / "history.csv"


def runs_history_path(experiment: str) -> Path:
    """Every member's history (history.csv holds the first run's only, for `dvc plots`)."""
    return plots_dir(experiment) / "runs.csv"


def lr_find_metrics_path(experiment: str) -> Path:
    """The range test's suggestion, the rates it is compared with and its settings."""
    return LR_FIND_DIR / f"{experiment}.json"


def lr_find_curve_path(experiment: str) -> Path:
    """The range test's curve: step, lr and smoothed loss per batch (`dvc plots`)."""
    return LR_FIND_DIR / f"{experiment}.csv"


def lr_find_plot_path(experiment: str) -> Path:
    return LR_FIND_DIR / f"{experiment}.png"


def checkpoint_dir(root: str | Path, experiment: str) -> Path:
    """Per-experiment checkpoints; never a DVC out, so `dvc repro` does not delete them.

    ``root`` (train.checkpoint_dir) becomes an allowed output folder; ``experiment`` must
    stay inside it."""
    return _inside(allow_outputs_under(root), experiment)


# The folders the user configured for outputs (resolved -> as configured), this process.
_CONFIGURED: dict[Path, Path] = {}


def _real(path: Path) -> Path:
    """``path`` made absolute with its folder's symlinks and ``..`` resolved; the last part
    is kept as it is (a file that is a symlink, e.g. into DVC's cache, is replaced by the
    rename, not written through)."""
    if path.name in ("", ".", ".."):
        return Path(os.path.realpath(path))
    return Path(os.path.realpath(path.parent)) / path.name


def allow_outputs_under(folder: str | Path) -> Path:
    """Let deepopt write inside ``folder``, a folder the user configured; ``folder``
    unchanged. A folder that holds the workspace (".." or "/") is not taken: it would let
    every output escape, so writes there are refused as outside."""
    folder = Path(folder)
    real = _real(folder)
    root = repo_root()
    if real == root or not root.is_relative_to(real):
        _CONFIGURED.setdefault(real, folder)
    return folder


def output_roots() -> list[Path]:
    """Where outputs may go: the workspace, then each configured folder (all resolved)."""
    return [repo_root(), *_CONFIGURED]


def check_output(target: str | Path) -> Path:
    """``target`` resolved, when it lies inside one of ``output_roots``; else a ConfigError
    (exit 2, nothing written): an experiment or study name, a configured path or a symlink
    that leads outside the workspace."""
    target = Path(target)
    real = _real(target)
    roots = output_roots()
    if any(real.is_relative_to(root) for root in roots):
        return real
    allowed = " or ".join(str(root) for root in roots)
    raise ConfigError(
        f"refusing to write {target}: it resolves to {real}, outside {allowed}; outputs stay "
        "in the workspace or train.checkpoint_dir (check the experiment or study name, and "
        "any symlink on the way)"
    )


def _inside(base: Path, *names: str) -> Path:
    """``base``/``names``, each name one plain folder name (ConfigError otherwise), so the
    folder stays inside ``base`` (where it leads through symlinks, ``check_output`` sees)."""
    for name in names:
        if Path(name).parts != (name,) or name in (".", ".."):
            raise ConfigError(
                f"{name!r} would put checkpoints at {base.joinpath(*names)}, outside {base}; "
                "a name must be one plain folder name"
            )
    return base.joinpath(*names)


def repo_root(start: Path | None = None) -> Path:
    """The workspace root: the nearest folder with .dvc/ or .git/ above ``start``.

    Inside a `dvc exp run --temp/--queue` copy (under <workspace>/.dvc/tmp/exps/) this is
    the workspace itself, so runs there still log to the workspace's mlruns/.
    """
    here = (start or Path.cwd()).resolve()
    parts = here.parts
    if ".dvc" in parts:
        marker = parts.index(".dvc")
        if parts[marker + 1 : marker + 3] == ("tmp", "exps"):
            return Path(*parts[:marker])
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir() or (folder / ".git").exists():
            return folder
    return here


def checkpoint_lock(folder: str | Path) -> Path:
    """The lock file a process holds while it trains into checkpoint folder ``folder``."""
    return Path(folder) / "deepopt.lock"


def transfer_model_path() -> Path:
    """The pretrained network: its weights, config, data statistics and MLflow run."""
    return TRANSFER_DIR / "models" / "pretrain.pt"


def transfer_metrics_path(stage: str) -> Path:
    """transfer/metrics/{pretrain,finetune}.json."""
    return TRANSFER_DIR / "metrics" / f"{stage}.json"


def transfer_report_path() -> Path:
    return TRANSFER_DIR / "report.md"


def transfer_plot_path() -> Path:
    """Test accuracy against labelled images per class, one line per mode."""
    return TRANSFER_DIR / "accuracy_vs_size.png"


def transfer_checkpoint_dir(root: str | Path, stage: str) -> Path:
    """Checkpoints of the transfer stages, beside the experiments' (never a DVC out)."""
    return _inside(allow_outputs_under(root), "transfer", stage)


def compare_runs_path(settings: str) -> Path:
    """compare/runs/{default,tuned}.json: every optimizer's seeds at those settings."""
    return COMPARE_DIR / "runs" / f"{settings}.json"


def compare_best_path(optimizer: str) -> Path:
    """compare/best/<optimizer>.yaml: its study's best trial, as overrides of its defaults."""
    return COMPARE_DIR / "best" / f"{optimizer}.yaml"


def compare_checkpoint_dir(root: str | Path, name: str) -> Path:
    """Checkpoints of the compare pipeline's seeds, beside the experiments' (never an out)."""
    return _inside(allow_outputs_under(root), "compare", name)
