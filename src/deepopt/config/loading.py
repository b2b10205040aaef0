"""Reading params.yaml (``load_params``, ``parse_params``) and overrides files
(``load_overrides``); every problem is a one-line ``ConfigError``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from deepopt.config.messages import format_validation_error
from deepopt.config.params import Params, apply_overrides, resolve_experiment
from deepopt.config.run import RUN_SECTIONS, RunConfig
from deepopt.errors import ConfigError, one_line
from deepopt.paths import BEST_PARAMS

__all__ = [
    "TUNE_OVERRIDES_END",
    "TUNE_OVERRIDES_HEADER",
    "load_overrides",
    "load_params",
    "parse_params",
    "resolve_run",
]


# The first and the last line of the overrides ``deepopt tune`` writes (params/best.yaml):
# a file that starts with the first but lacks the last was cut short.
TUNE_OVERRIDES_HEADER = "# Written by `deepopt tune`"
TUNE_OVERRIDES_END = "# (end of the overrides written by `deepopt tune`)"


def load_overrides(path: str | Path) -> dict[str, Any]:
    """A YAML file of run-config overrides (e.g. params/best.yaml); one-line ConfigErrors
    (exit 2, like every config file's), also for an empty file and for tune's file cut short;
    for tune's file they say to run tune again."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: overrides file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read: {one_line(err)}{_hint(path, '')}") from None
    if (
        text.startswith(TUNE_OVERRIDES_HEADER)
        and text.rstrip().splitlines()[-1] != TUNE_OVERRIDES_END
    ):
        raise ConfigError(
            f"{path}: truncated (its last line is not {TUNE_OVERRIDES_END!r}){_hint(path, text)}"
        )
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(
            f"{path}: YAML syntax error: {one_line(err)}{_hint(path, text)}"
        ) from None
    if raw is None:
        allowed = "; expected a mapping of sections such as optim, train"
        raise ConfigError(f"{path}: file is empty{_hint(path, text) or allowed}")
    if not isinstance(raw, dict):
        kind = type(raw).__name__
        raise ConfigError(f"{path}: expected a mapping of sections, got {kind}{_hint(path, text)}")
    if "data" in raw:
        raise ConfigError(f"{path}: data: overrides share the prepared data; change data.* instead")
    return raw


def _hint(path: Path, text: str) -> str:
    """What to do about a damaged overrides file that ``deepopt tune`` wrote ("" for others)."""
    if path == BEST_PARAMS or text.startswith(TUNE_OVERRIDES_HEADER):
        return f"; run `deepopt tune` again (or `dvc repro tune`) to rewrite {BEST_PARAMS}"
    return ""


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate already-parsed YAML data into Params (ConfigError on any problem)."""
    if raw is None:
        raise ConfigError(
            f"{source}: file is empty; expected a mapping with keys such as "
            f"{', '.join(RUN_SECTIONS)}"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    except ValidationError as err:
        raise ConfigError(f"{source}: {format_validation_error(err, Params)}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; every problem is a one-line ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found (run from the repository root)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read: {one_line(err)}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{path}: {where}YAML syntax error: {one_line(err.problem)}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML syntax error: {one_line(err)}") from None
    return parse_params(raw, source=str(path))


def resolve_run(params: Params, experiment: str | None, overrides: str | Path | None) -> RunConfig:
    """What ``deepopt train``/``evaluate --experiment NAME [--overrides FILE]`` run: the
    experiment's config with an overrides file (e.g. params/best.yaml) on top.

    With a file, an ``experiment`` that params.yaml does not define only names the outputs
    and the file applies to the base config.
    """
    if overrides is None:
        return resolve_experiment(params, experiment)
    start = (
        resolve_experiment(params, experiment)
        if experiment in params.experiments
        else params.base_run()
    )
    changes = load_overrides(overrides)
    try:
        return apply_overrides(start, changes)
    except ConfigError as err:
        raise ConfigError(f"{overrides}: {err}") from None
