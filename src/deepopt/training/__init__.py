"""Training: the loop (``fit``) and its resume state, early stopping, the lecture's
diagnostics, checkpoints, data parallelism, and one tracked member (``train_tracked``)."""

from deepopt.training.checkpoint import checkpoint_file, load_checkpoint, save_checkpoint
from deepopt.training.early_stopping import EarlyStopping
from deepopt.training.loop import (
    DataParallel,
    FitResult,
    LoopState,
    StopReason,
    autocast,
    evaluate_logits,
    fit,
    steps_per_epoch,
)
from deepopt.training.member import (
    Member,
    MemberResult,
    fit_member,
    follow_member,
    members_of,
    normalized_splits,
    train_tracked,
)
from deepopt.training.memory import keep_freed_memory

__all__ = [
    "DataParallel",
    "EarlyStopping",
    "FitResult",
    "LoopState",
    "Member",
    "MemberResult",
    "StopReason",
    "autocast",
    "checkpoint_file",
    "evaluate_logits",
    "fit",
    "fit_member",
    "follow_member",
    "keep_freed_memory",
    "load_checkpoint",
    "members_of",
    "normalized_splits",
    "save_checkpoint",
    "steps_per_epoch",
    "train_tracked",
]
