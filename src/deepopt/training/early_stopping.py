"""Early stopping as Keras does it: stop after ``patience`` epochs without an improvement
larger than ``min_delta`` of the monitored metric (the lecture's EarlyStopping callback)."""

from __future__ import annotations

import math
from typing import Any

from deepopt.config import EarlyStopConfig

__all__ = ["EarlyStopping"]


class EarlyStopping:
    """Keras' EarlyStopping: stop after ``patience`` epochs without an improvement larger
    than ``min_delta`` (absolute) of the monitored metric.

    As Keras (keras/src/callbacks/early_stopping.py, ``on_epoch_end``): ``wait`` counts the
    epochs since the last improvement, an improving epoch never stops, and a non-improving
    one stops once ``wait >= patience``. So patience 0 and 1 both stop at the first epoch
    without improvement, and nothing stops before an epoch has been seen. (tf.keras 2
    checked ``wait >= patience`` after improving epochs too, so there patience 0 stopped
    after the first or, from 2021, the second epoch whatever the metric did; every
    patience >= 1, the lecture's 5 included, behaves the same in all versions.)
    """

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
        """True after a non-improving epoch (wait >= 1) once wait has reached patience."""
        return self.enabled and self.wait >= max(self.patience, 1)

    def state_dict(self) -> dict[str, float | int]:
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state["best"])
        self.best_epoch = int(state["best_epoch"])
        self.wait = int(state["wait"])
