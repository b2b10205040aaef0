"""deepopt.errors.one_line (the one formatter of library errors) and deepopt.retry."""

from __future__ import annotations

import pytest

from deepopt.errors import one_line
from deepopt.retry import retry


def test_one_line_folds_white_space_and_cuts_with_an_ellipsis() -> None:
    assert one_line(ValueError("a\n  b\tc")) == "a b c"
    cut = one_line("x" * 50, limit=20)
    assert cut == "x" * 17 + "..." and len(cut) == 20


def test_one_line_names_the_type_when_asked_or_when_there_is_no_text() -> None:
    assert one_line(TimeoutError()) == "TimeoutError"
    assert one_line(OSError("no route"), with_type=True) == "OSError: no route"
    assert one_line("plain text", with_type=True) == "plain text"


def test_retry_tries_again_only_while_the_error_is_transient() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("database is locked")
        return "done"

    transient = lambda err: "locked" in str(err)  # noqa: E731
    assert retry(flaky, transient=transient, delays_s=(0.0, 0.0, 0.0)) == "done"
    assert len(calls) == 3

    def broken() -> None:
        raise ValueError("not transient")

    with pytest.raises(ValueError, match="not transient"):
        retry(broken, transient=transient, delays_s=(0.0,))


def test_retry_gives_up_with_the_last_error_after_every_delay() -> None:
    calls: list[int] = []

    def always_locked() -> None:
        calls.append(1)
        raise RuntimeError(f"database is locked ({len(calls)})")

    with pytest.raises(RuntimeError, match=r"locked \(3\)"):
        retry(always_locked, transient=lambda err: True, delays_s=(0.0, 0.0), jitter=False)
    assert len(calls) == 3
