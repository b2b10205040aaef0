"""Ctrl-C and SIGTERM, held back while a database write must not be cut in half.

Python raises KeyboardInterrupt wherever the main thread happens to be. Inside a sqlite or
SQLAlchemy call (MLflow's store, Optuna's storage) that leaves a transaction half done, a
write lock held until the connection is reset, and library error logs with tracebacks.
While held, a first interrupt is only noted and raised as KeyboardInterrupt when the last
hold is released; a second one is raised at once (a user pressing Ctrl-C again means it).
Holds nest and are counted; they apply to the main thread only, the one that gets signals.

A KeyboardInterrupt raised inside a finalizer or a weakref callback (garbage collection can
run them anywhere) is dropped by Python with an "Exception ignored in ..." traceback, and the
process would carry on. ``handling_interrupts`` remembers every interrupt it raised, so the
training loop (``raise_if_swallowed``, once per batch) raises a dropped one again.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["GATE", "InterruptGate", "deferred", "handling_interrupts", "raise_if_swallowed"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class InterruptGate:
    """Counted holds on SIGINT/SIGTERM; ``release`` says whether one came meanwhile."""

    def __init__(self) -> None:
        self._depth = 0
        self._previous: dict[int, Any] = {}
        self._pending = False

    @staticmethod
    def _in_main_thread() -> bool:
        return threading.current_thread() is threading.main_thread()

    def hold(self) -> None:
        if not self._in_main_thread():
            return
        self._depth += 1
        if self._depth == 1:
            for signum in _SIGNALS:
                self._previous[signum] = signal.signal(signum, self._note)

    @property
    def held(self) -> bool:
        """Whether a hold is on (in the main thread)."""
        return self._in_main_thread() and self._depth > 0

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self._pending:
            raise KeyboardInterrupt  # the second interrupt does not wait
        self._pending = True

    def release(self) -> bool:
        """End one hold. After the last: the handlers are back, and True if an interrupt
        came while held (the caller raises KeyboardInterrupt when it is safe to)."""
        if not self._in_main_thread() or self._depth == 0:
            return False
        self._depth -= 1
        if self._depth > 0:
            return False  # the outermost hold reports it
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
        pending, self._pending = self._pending, False
        return pending


GATE = InterruptGate()  # one per process: signal handlers are process-wide


@contextmanager
def deferred() -> Iterator[None]:
    """Run the block to its end even if Ctrl-C/SIGTERM comes, then raise KeyboardInterrupt."""
    GATE.hold()
    try:
        yield
    finally:
        if GATE.release():
            raise KeyboardInterrupt


_raised = False  # an interrupt was raised by _interrupt and not yet handled


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM (kill, dvc's own cancellation, a scheduler) takes the same path as Ctrl-C:
    # the stage records what it finished and exits 130.
    global _raised
    _raised = True
    raise KeyboardInterrupt


def raise_if_swallowed() -> None:
    """Raise the KeyboardInterrupt that Python dropped in a finalizer, if one was."""
    if _raised:
        raise KeyboardInterrupt


def _quiet_unraisable(unraisable: Any) -> None:
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        return  # raise_if_swallowed raises it again; a traceback would only alarm
    sys.__unraisablehook__(unraisable)


@contextmanager
def handling_interrupts() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the block, remembered until it ends
    (the CLI's whole run); the previous handlers come back afterwards."""
    global _raised
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in _SIGNALS}
    previous_hook = sys.unraisablehook
    for signum in _SIGNALS:
        signal.signal(signum, _interrupt)
    sys.unraisablehook = _quiet_unraisable
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        sys.unraisablehook = previous_hook
        _raised = False
