"""Ctrl-C and SIGTERM held back across a block: real signals sent to this process."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from deepopt import interrupts


def test_an_interrupt_inside_the_block_is_raised_when_the_block_ends() -> None:
    handler = signal.getsignal(signal.SIGINT)
    finished = False
    with pytest.raises(KeyboardInterrupt), interrupts.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        finished = True  # still runs: the interrupt only waits
    assert finished
    assert signal.getsignal(signal.SIGINT) is handler


def test_sigterm_is_held_too_and_its_own_handler_comes_back() -> None:
    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        with pytest.raises(KeyboardInterrupt), interrupts.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is terminate
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_second_interrupt_does_not_wait() -> None:
    reached: list[str] = []
    with pytest.raises(KeyboardInterrupt), interrupts.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        reached.append("first noted")
        os.kill(os.getpid(), signal.SIGINT)
        reached.append("never")
    assert reached == ["first noted"]


def test_nested_holds_raise_once_at_the_outermost_end() -> None:
    reached: list[str] = []
    with pytest.raises(KeyboardInterrupt), interrupts.deferred():
        with interrupts.deferred():
            os.kill(os.getpid(), signal.SIGINT)
        reached.append("after the inner block")
    assert reached == ["after the inner block"]


def test_a_block_without_an_interrupt_and_other_threads_are_untouched() -> None:
    handler = signal.getsignal(signal.SIGINT)
    with interrupts.deferred():
        pass
    seen: list[object] = []

    def elsewhere() -> None:
        with interrupts.deferred():  # no signal handlers outside the main thread
            seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert seen == [handler] and signal.getsignal(signal.SIGINT) is handler


def test_an_interrupt_python_dropped_inside_a_finalizer_is_raised_again(
    capsys: pytest.CaptureFixture[str],
) -> None:
    class SignalsWhenCollected:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)  # KeyboardInterrupt inside __del__: dropped

    handler = signal.getsignal(signal.SIGINT)
    reached: list[str] = []
    with pytest.raises(KeyboardInterrupt), interrupts.handling_interrupts():
        SignalsWhenCollected()
        reached.append("carried on")  # what Python does after dropping it
        interrupts.raise_if_swallowed()  # the training loop's check, once per batch
        reached.append("never")
    assert reached == ["carried on"]
    assert "Traceback" not in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is handler
    interrupts.raise_if_swallowed()  # handled: nothing is left over for later runs
