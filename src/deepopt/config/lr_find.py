"""The ``lr_find`` section's schema: the learning-rate range test of ``deepopt lr-find``.

The defaults are fastai's ``Learner.lr_find`` (fastai/callback/schedule.py): an
exponential sweep from 1e-7 to 10 over 100 batches that stops once the loss diverges.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from deepopt.config.knobs import Strict

__all__ = ["MAX_LR_FIND_END", "MAX_LR_FIND_ITER", "MIN_LR_FIND_ITER", "LrFindConfig"]

# The sweep goes past the rates any optimizer here trains at (MAX_LR = 10) on purpose: it
# must reach divergence. 1e4 leaves room for torch-lr-finder's end_lr=100 and more; above
# it every step of every network here is NaN at once.
MAX_LR_FIND_END = 1e4
# fastai raises a num_it below 6 to 6: the suggestion skips num_it // 10 points at the start
# and 5 at the end, so fewer leave nothing to suggest from. Here it is refused instead.
MIN_LR_FIND_ITER = 6
# One batch each: 100,000 are about 2,000 epochs of the 5,400 training images.
MAX_LR_FIND_ITER = 100_000


class LrFindConfig(Strict):
    """Leslie Smith's LR range test (Smith 2017, "Cyclical Learning Rates for Training
    Neural Networks", section 3.3) as fastai runs it."""

    start_lr: float = Field(1e-7, gt=0.0, le=MAX_LR_FIND_END)
    end_lr: float = Field(10.0, gt=0.0, le=MAX_LR_FIND_END)
    num_iter: int = Field(100, ge=MIN_LR_FIND_ITER, le=MAX_LR_FIND_ITER)  # batches
    # Stop once the smoothed loss exceeds 4x the best smoothed loss so far (fastai's stop_div).
    stop_div: bool = True

    @model_validator(mode="after")
    def _increasing(self) -> LrFindConfig:
        if self.start_lr >= self.end_lr:
            raise ValueError(
                f"lr_find.start_lr ({self.start_lr:g}) must be below lr_find.end_lr "
                f"({self.end_lr:g}): the test sweeps the rate upwards"
            )
        return self
