"""Early stopping as Keras does it: stop after ``patience`` epochs without an improvement
larger than ``min_delta`` of the monitored metric (the lecture's EarlyStopping callback)."""

from __future__ import annotations

import math
from typing import Any

from deepopt.config import EarlyStopConfig

__all__ = ["EarlyStopping"]


class EarlyStopping:
    """Keras' EarlyStopping: stop after ``patience`` epochs without an improvement larger
    than ``min_delta`` (absolute) of the monitored metric."""

    def __init__(self, cfg: EarlyStopConfig) -> None:
        self.enabled = cfg.enabled
        self.monitor = cfg.monitor
        mode = cfg.mode if cfg.mode != "auto" else ("max" if "acc" in cfg.monitor else "min")
        self.sign = 1.0 if mode == "min" else -1.0  # compare sign * value: lower is better
        self.min_delta = cfg.min_delta
        self.patience = cfg.patience
        self.best = math.inf
        self.best_epoch = -1
        self.wait = 0

    def update(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Record an epoch's metrics; return True when this epoch is a new best."""
        value = self.sign * metrics[self.monitor]
        if value < self.best - self.min_delta:
            self.best, self.best_epoch, self.wait = value, epoch, 0
            return True
        self.wait += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.enabled and self.wait >= self.patience

    def state_dict(self) -> dict[str, float | int]:
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state["best"])
        self.best_epoch = int(state["best_epoch"])
        self.wait = int(state["wait"])
