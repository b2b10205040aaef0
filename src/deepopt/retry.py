"""The one retry loop: try an action again after growing delays while an error is transient.

MLflow's sqlite store ("database is locked") and Optuna's tables on a fresh database (workers
racing to create them) both fail for a moment and then work; everything else fails at once.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["retry"]

_T = TypeVar("_T")


def retry(
    action: Callable[[], _T],
    *,
    transient: Callable[[BaseException], bool],
    delays_s: Sequence[float],
    jitter: bool = True,
) -> _T:
    """``action()``; after an error that ``transient`` accepts, sleep the next of
    ``delays_s`` (times 1 to 2 with ``jitter``, so racing processes retry apart) and try
    again. The error of the last try, or any other error, propagates unchanged."""
    for delay in delays_s:
        try:
            return action()
        except Exception as err:
            if not transient(err):
                raise
        time.sleep(delay * (1.0 + random.random()) if jitter else delay)
    return action()
