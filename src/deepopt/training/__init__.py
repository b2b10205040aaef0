"""Training: the loop (``fit``) and its resume state, early stopping, the lecture's
diagnostics, checkpoints and data parallelism: the core, which imports neither MLflow nor
Optuna nor DVC (a GPU machine without them trains; tests/system/test_core_without_services).

One tracked member (``train_tracked``, checkpoints + MLflow) is ``deepopt.training.member``,
imported from there: it records to MLflow, so importing this package must not pull it in.
"""

from deepopt.training.checkpoint import checkpoint_file, load_checkpoint, save_checkpoint
from deepopt.training.early_stopping import EarlyStopping
from deepopt.training.loop import (
    DataParallel,
    FitResult,
    LoopState,
    StopReason,
    evaluate_logits,
    fit,
    steps_per_epoch,
)
from deepopt.training.memory import keep_freed_memory

__all__ = [
    "DataParallel",
    "EarlyStopping",
    "FitResult",
    "LoopState",
    "StopReason",
    "checkpoint_file",
    "evaluate_logits",
    "fit",
    "keep_freed_memory",
    "load_checkpoint",
    "save_checkpoint",
    "steps_per_epoch",
]
