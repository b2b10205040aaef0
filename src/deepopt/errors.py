"""Errors that end a deepopt command with a one-line message and a known exit code.

The CLI catches ``DeepoptError`` and prints ``deepopt: error: <message>``; anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "EXIT_CONFIG",
    "EXIT_DIVERGED",
    "EXIT_INTERRUPTED",
    "EXIT_RUNTIME",
    "ConfigError",
    "DataError",
    "DeepoptError",
    "DivergedError",
    "TrackingError",
    "one_line",
]

EXIT_RUNTIME = 1  # a runtime failure: data, tracking, storage, files
EXIT_CONFIG = 2  # a configuration or usage error: nothing was run
EXIT_DIVERGED = 3  # training diverged (NaN/inf loss); the run is recorded as FAILED
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM: 128 + SIGINT, as shells report it


class DeepoptError(Exception):
    """An expected failure with a message meant for the user."""

    exit_code = EXIT_RUNTIME


class ConfigError(DeepoptError):
    """params.yaml or the command line is wrong; nothing has been written."""

    exit_code = EXIT_CONFIG


class DataError(DeepoptError):
    """Raw or prepared data is missing, corrupt or from another params version."""


class TrackingError(DeepoptError):
    """The MLflow tracking store or the Optuna storage cannot be used."""


class DivergedError(DeepoptError):
    """The training loss became NaN or infinite."""

    exit_code = EXIT_DIVERGED


def one_line(error: object, limit: int = 300, *, with_type: bool = False) -> str:
    """``error`` (an exception or any text) as one line of at most ``limit`` characters:
    white space folded, "..." where it is cut; ``with_type`` puts the exception's type in
    front ("URLError: ..."), and an exception without text is its type alone.

    The one formatter for library errors quoted inside a deepopt message, so every message
    stays one line however many lines the library printed.
    """
    text = " ".join(str(error).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    if isinstance(error, BaseException) and (with_type or not text):
        return f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text
