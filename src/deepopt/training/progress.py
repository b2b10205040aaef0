"""What a training shows while it runs, on stderr: one plain line per epoch (a log under DVC,
CI and redirects alike) and, on a terminal only, a live bar of the epoch's batches with the
running loss once the epoch has run ``BAR_DELAY_S`` (short epochs never show one).

The bar is tqdm's. Importing tqdm alone takes ~60 ms (``python -X importtime -c 'import
tqdm'``), but torch imports it itself, so a training process pays nothing for it here. The
bar is cleared when its epoch ends: a terminal keeps the same per-epoch lines as a log.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from typing import IO

from tqdm import tqdm

from deepopt.training.loop import LoopState

__all__ = ["BAR_DELAY_S", "EpochBar", "epoch_bar", "epoch_line"]

BAR_DELAY_S = 2.0  # an epoch shorter than this shows no bar (tqdm's delay)
_LOSS_EVERY_S = 0.5  # the running loss is read (a device sync) at most this often


def _is_terminal(stream: IO[str]) -> bool:
    """A terminal this process draws on: a tty whose foreground process group is ours. A
    process in a session of its own (tune's workers: start_new_session) or in a background
    job shares the tty's stderr but would overwrite the other bars' line: no bar there."""
    isatty = getattr(stream, "isatty", None)
    if isatty is None or not isatty():
        return False
    try:
        descriptor = stream.fileno()
    except (OSError, ValueError):
        return True  # a terminal without a descriptor (a test's stand-in)
    try:
        return os.tcgetpgrp(descriptor) == os.getpgrp()
    except OSError:  # not this session's controlling terminal
        return False


class EpochBar:
    """A ``loop.BatchCallback``: one tqdm bar per epoch, with the running mean loss."""

    def __init__(self, label: str, epochs: int, stream: IO[str], delay: float) -> None:
        self._label, self._epochs, self._stream, self._delay = label, epochs, stream, delay
        self._bar: tqdm[None] | None = None
        self._epoch = -1
        self._started = 0.0
        self._loss_read = -math.inf

    def __call__(
        self, epoch: int, done: int, total: int, running_loss: Callable[[], float]
    ) -> None:
        if self._bar is None or epoch != self._epoch:
            self._start(epoch, total)
        assert self._bar is not None
        now = time.perf_counter()
        if now - self._started >= self._delay and now - self._loss_read >= _LOSS_EVERY_S:
            self._loss_read = now
            # refreshed at once: after the delay (tqdm's clock starts before ours), so early
            # enough to show the first reading even in an epoch that ends within mininterval
            self._bar.set_postfix_str(f"loss {running_loss():.4f}", refresh=True)
        self._bar.update(done - self._bar.n)

    def _start(self, epoch: int, total: int) -> None:
        self.close()
        self._bar = tqdm(
            total=total,
            desc=f"[{self._label}] epoch {epoch + 1}/{self._epochs}",
            unit="batch",
            file=self._stream,
            delay=self._delay,
            leave=False,  # the epoch's plain line replaces it
            dynamic_ncols=True,
        )
        self._epoch = epoch
        self._started = time.perf_counter()
        self._loss_read = -math.inf

    def close(self) -> None:
        """Clear the bar (nothing was shown if its epoch ended before the delay)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def epoch_bar(
    label: str, epochs: int, stream: IO[str] | None = None, delay: float = BAR_DELAY_S
) -> EpochBar | None:
    """A bar for ``stream`` (default stderr) when it is a terminal, else None: no bar under
    DVC, CI or a redirect, and the loop then calls nothing per batch."""
    target = stream if stream is not None else sys.stderr
    return EpochBar(label, epochs, target, delay) if _is_terminal(target) else None


def epoch_line(
    label: str, epochs: int, bar: EpochBar | None = None, stream: IO[str] | None = None
) -> Callable[[LoopState], None]:
    """One plain line per epoch on ``stream`` (default stderr), after clearing ``bar``."""

    def report(state: LoopState) -> None:
        if bar is not None:
            bar.close()
        r = state.history[-1]
        print(
            f"[{label}] epoch {state.epochs_done}/{epochs} loss {r['loss']:.4f} acc {r['acc']:.4f} "
            f"val_loss {r['val_loss']:.4f} val_acc {r['val_acc']:.4f} lr {r['lr']:.3g} "
            f"{r['seconds']:.2f}s",
            file=stream if stream is not None else sys.stderr,
            flush=True,
        )

    return report
