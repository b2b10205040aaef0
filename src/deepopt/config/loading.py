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

__all__ = [
    "load_overrides",
    "load_params",
    "parse_params",
    "resolve_run",
]


def load_overrides(path: str | Path) -> dict[str, Any]:
    """A YAML file of run-config overrides (e.g. params/best.yaml); one-line ConfigErrors."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: overrides file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read: {one_line(err)}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML syntax error: {one_line(err)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    if "data" in raw:
        raise ConfigError(f"{path}: data: overrides share the prepared data; change data.* instead")
    return raw


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
