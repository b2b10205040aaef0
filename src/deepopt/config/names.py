"""Names that become parts of paths (experiments, studies): the one pattern they match and
the one check, made where each name enters (params.yaml, the command line, a file name).

A name is one folder or file name: ``models/<experiment>/``, ``metrics/<experiment>/``,
``plots/<experiment>/``, ``checkpoints/<experiment>/`` and ``checkpoints/tune/<study>/``.
It can therefore never hold a path separator or ``..``, so no name leads outside those
folders; each problem is a one-line ``ConfigError`` raised before anything is written.
"""

from __future__ import annotations

import re
from pathlib import Path

from deepopt.errors import ConfigError

__all__ = [
    "DEVICE_CHOICES",
    "NAME_PATTERN",
    "NAME_RULE",
    "RESERVED_EXPERIMENTS",
    "check_device_spec",
    "check_experiment_name",
    "check_name",
    "name_problem",
    "run_name",
]

# Letters, digits, '_', '.' and '-', starting with a letter or digit: valid as a file name on
# every system DVC runs on, never hidden (a leading '.'), never a separator or '..'. 128
# characters leave room below the 255-byte file-name limit of common file systems.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
MAX_NAME_LENGTH = 128
NAME_RULE = f"{NAME_PATTERN}, at most {MAX_NAME_LENGTH} characters, without '..'"
_NAME = re.compile(NAME_PATTERN)
# checkpoints/<experiment>/ sits beside checkpoints/tune/ and checkpoints/transfer/, where
# the tune and transfer stages keep their own checkpoints: experiments cannot take them.
RESERVED_EXPERIMENTS = ("tune", "transfer", "compare")
# Study names deepopt derives: <experiment>-<10 hex digits> (deepopt.tuning.space).
DERIVED_SUFFIX = len("-0123456789")


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def name_problem(value: object) -> str | None:
    """Why ``value`` is not a valid name, or None when it is one."""
    if not isinstance(value, str):
        return f"is not a string but {type(value).__name__}"
    if not value:
        return "is empty"
    if len(value) > MAX_NAME_LENGTH:
        return f"has {len(value)} characters"
    if _NAME.fullmatch(value) is None or ".." in value:
        return "is not a plain name (names become folder names)"
    return None


def check_name(value: object, source: str) -> str:
    """``value`` when it is a valid name; else a one-line ConfigError naming ``source``
    (where the name came from: a params.yaml key path or a command-line option)."""
    problem = name_problem(value)
    if problem is not None:
        raise ConfigError(f"{source}: {_shown(value)} {problem}; allowed: {NAME_RULE}")
    assert isinstance(value, str)
    return value


def check_experiment_name(value: object, source: str) -> str:
    """``check_name`` for an experiment, which also may not be a folder of tune/transfer."""
    name = check_name(value, source)
    if name in RESERVED_EXPERIMENTS:
        raise ConfigError(
            f"{source}: {name!r} is reserved (checkpoints/{name}/ holds the {name} stage's "
            "checkpoints); choose another experiment name"
        )
    return name


def run_name(experiment: str | None, overrides: str | Path | None, default: str) -> str:
    """The name ``train``/``evaluate`` write under: ``--experiment``, else the file name of
    ``--overrides`` without its suffix, else ``default`` (checked like any name)."""
    if experiment is not None:
        return check_experiment_name(experiment, "--experiment")
    if overrides is not None:
        source = f"--overrides {overrides} (its file name names the outputs; or give --experiment)"
        return check_experiment_name(Path(overrides).stem, source)
    return default


# train.device: a torch device deepopt can resolve (deepopt.devices checks it is there).
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_DEVICE_SPEC = re.compile(r"auto|cpu|mps|cuda(:[0-9]{1,2})?")


def check_device_spec(value: str) -> str:
    """``value`` if it names a device kind deepopt knows (a ValueError otherwise)."""
    if not _DEVICE_SPEC.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a device deepopt knows; allowed: {', '.join(DEVICE_CHOICES)}"
        )
    return value
