"""Where each stage reads and writes, relative to the repository root.

dvc.yaml names the same paths (DVC needs them literally); ``tests/system/test_dvc_yaml.py``
checks the two agree, so a path is changed here and in dvc.yaml together.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "BASE_EXPERIMENT",
    "BEST_EXPERIMENT",
    "BEST_PARAMS",
    "PARAMS_FILE",
    "PREPARED_DIR",
    "REPORT_DIR",
    "REPORT_FILE",
    "REPORT_PLOTS",
    "TRANSFER_DIR",
    "checkpoint_dir",
    "eval_metrics_path",
    "history_path",
    "meta_path",
    "model_path",
    "plots_dir",
    "prepared_split_path",
    "repo_root",
    "run_info_path",
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
REPORT_DIR = Path("reports")  # the report stage's one out: lecture.md and its plots
REPORT_FILE = "lecture.md"
REPORT_PLOTS = {  # figure key -> file in REPORT_DIR
    "val_loss": "val_loss.png",
    "lr": "lr.png",
    "grad_norms": "grad_norms.png",
    "deep_grad_norms": "deep_grad_norms.png",
}
# The transfer pipeline (transfer/dvc.yaml) keeps all its outputs here, apart from the
# main pipeline's metrics/ and plots/, which the report stage depends on as folders.
TRANSFER_DIR = Path("transfer")


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


def checkpoint_dir(root: str | Path, experiment: str) -> Path:
    """Per-experiment checkpoints; never a DVC out, so `dvc repro` does not delete them."""
    return Path(root) / experiment


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
    return Path(root) / "transfer" / stage
