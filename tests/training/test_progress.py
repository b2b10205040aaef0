"""The live progress bar: on a terminal once an epoch has run its delay, with the running
loss; never without a terminal (DVC, CI, logs), which keep the plain per-epoch lines; and it
changes no number the loop computes."""

from __future__ import annotations

import fcntl
import io
import os
import struct
import subprocess
import sys
import termios
from pathlib import Path
from typing import Any

import pytest
import torch

from deepopt.config import EarlyStopConfig, ModelConfig, OptimConfig, ScheduleConfig
from deepopt.models import build_model
from deepopt.optim import build_optimizer, build_schedule
from deepopt.training import LoopState, fit
from deepopt.training.progress import BAR_DELAY_S, EpochBar, epoch_bar, epoch_line
from tiny_data import gaussian_blobs


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as sys.stderr does in an interactive shell."""

    def isatty(self) -> bool:
        return True


def _fit(bar: EpochBar | None, epochs: int = 2) -> list[dict[str, float]]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="mlp", depth=2, width=16), image_shape=(1, 8, 8))
    optimizer = build_optimizer(model.parameters(), OptimConfig(name="nesterov"))
    schedule = build_schedule(
        optimizer, ScheduleConfig(name="constant"), epochs=epochs, steps_per_epoch=8
    )
    result = fit(
        model,
        optimizer,
        schedule,
        gaussian_blobs(200, 1),
        gaussian_blobs(100, 2),
        epochs=epochs,
        batch_size=25,
        early_stop=EarlyStopConfig(enabled=False),
        seed=7,
        on_batch=bar,
    )
    if bar is not None:
        bar.close()
    return [{k: v for k, v in r.items() if k != "seconds"} for r in result.history]


def test_a_terminal_shows_a_bar_of_the_epochs_batches_with_the_running_loss() -> None:
    terminal = Terminal()
    bar = epoch_bar("tiny seed 7", 2, stream=terminal, delay=0.0)  # shown from the start
    assert bar is not None
    _fit(bar)
    shown = terminal.getvalue()
    assert "[tiny seed 7] epoch 1/2" in shown and "[tiny seed 7] epoch 2/2" in shown
    assert "/8 [" in shown  # of 8 batches: 200 images in batches of 25
    assert "loss " in shown


def test_an_epoch_shorter_than_the_delay_shows_no_bar() -> None:
    terminal = Terminal()
    bar = epoch_bar("tiny", 2, stream=terminal)  # the default delay: about 2 s
    assert bar is not None and BAR_DELAY_S == 2.0
    read: list[float] = []

    def running_loss() -> float:
        read.append(1.0)
        return 1.0

    for epoch in range(2):  # two epochs of microseconds (this machine's fits can take 2 s)
        for done in range(1, 9):
            bar(epoch, done, 8, running_loss)
    bar.close()
    assert terminal.getvalue() == ""
    assert read == []  # nor did it read the loss (a device sync) for a bar not shown


def test_no_terminal_no_bar() -> None:
    assert epoch_bar("tiny", 2, stream=io.StringIO()) is None


def test_the_bar_changes_no_number() -> None:
    assert _fit(epoch_bar("tiny", 2, stream=Terminal(), delay=0.0)) == _fit(None)


def test_the_plain_epoch_line_follows_the_cleared_bar() -> None:
    terminal = Terminal()
    bar = epoch_bar("tiny", 3, stream=terminal, delay=0.0)
    line = epoch_line("tiny", 3, bar, stream=terminal)
    assert bar is not None
    bar(0, 1, 8, lambda: 2.5)
    record: dict[str, Any] = {
        "epoch": 0.0,
        "loss": 2.5,
        "acc": 0.25,
        "val_loss": 2.0,
        "val_acc": 0.5,
        "lr": 0.02,
        "seconds": 1.25,
    }
    line(LoopState(epochs_done=1, history=[record]))
    printed = terminal.getvalue()
    expected = (
        "[tiny] epoch 1/3 loss 2.5000 acc 0.2500 val_loss 2.0000 val_acc 0.5000 lr 0.02 1.25s\n"
    )
    assert printed.endswith(expected)
    shown = printed.removesuffix(expected)
    assert "[tiny] epoch 1/3" in shown and shown.endswith("\r")  # the bar, then cleared


def test_without_a_terminal_only_the_plain_line_is_written() -> None:
    log = io.StringIO()
    line = epoch_line("tiny", 1, epoch_bar("tiny", 1, stream=log), stream=log)
    record = {"loss": 1.0, "acc": 0.5, "val_loss": 1.0, "val_acc": 0.5, "lr": 0.1, "seconds": 0.5}
    line(LoopState(epochs_done=1, history=[record]))
    assert log.getvalue() == (
        "[tiny] epoch 1/1 loss 1.0000 acc 0.5000 val_loss 1.0000 val_acc 0.5000 lr 0.1 0.50s\n"
    )


_CHILD = """
import fcntl, sys, termios
sys.path[:0] = [{tests!r}, {here!r}]  # tiny_data, test_progress
if {controlling}:
    fcntl.ioctl(2, termios.TIOCSCTTY, 0)  # the pty becomes this session's terminal
from test_progress import _fit
from deepopt.training.progress import epoch_bar
bar = epoch_bar("pty", 2, delay=0.0)  # on sys.stderr: the pty
print("bar" if bar is not None else "no bar", file=sys.stderr, flush=True)
_fit(bar)
"""


def _in_a_pty(controlling: bool) -> str:
    """What a child process writes to a pseudo-terminal it has as stderr, in a session of
    its own: with the pty as its controlling terminal (an interactive shell's command) or
    without (as tune's workers, which inherit the terminal in a new session)."""
    main, child = os.openpty()
    # 24 rows of 100 columns: a new pty has 0 x 0, and tqdm draws nothing in 0 columns
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    here = Path(__file__).parent
    code = _CHILD.format(tests=str(here.parent), here=str(here), controlling=controlling)
    process = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=child,
        stdout=child,
        stderr=child,
        start_new_session=True,
    )
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    assert process.wait(timeout=300) == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_a_real_terminal_shows_the_bar_and_a_shared_one_does_not() -> None:
    shown = _in_a_pty(controlling=True)
    assert "bar" in shown.splitlines()[0] and "[pty] epoch 2/2" in shown and "loss " in shown
    shared = _in_a_pty(controlling=False)
    assert shared.strip() == "no bar"
