"""One-line messages for pydantic's validation errors: the key path, the bad value and
what is allowed (with a did-you-mean for unknown keys)."""

from __future__ import annotations

import difflib
from typing import get_args

from pydantic import BaseModel, ValidationError

from deepopt.errors import one_line

__all__ = ["format_validation_error"]


def _model_at(root: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at ``loc`` (for did-you-mean)."""
    model: type[BaseModel] = root
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *get_args(annotation)]
        nested = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if nested is None:
            return None
        model = nested
    return model


def format_validation_error(err: ValidationError, root: type[BaseModel], prefix: str = "") -> str:
    """The first error of ``err`` (validating ``root``) as one line; key paths start with
    ``prefix`` (e.g. ``experiments.<name>``) when given."""
    first = err.errors()[0]
    loc = tuple(first["loc"])
    path = ".".join(str(p) for p in loc)
    if prefix:
        path = f"{prefix}.{path}" if path else prefix
    kind = first["type"]
    value = first.get("input")
    if kind == "extra_forbidden":
        owner = _model_at(root, loc[:-1])
        key = str(loc[-1])
        allowed = sorted(owner.model_fields) if owner else []
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{path}: unknown key{hint}; allowed: {', '.join(allowed)}"
    if kind == "literal_error":
        expected = first.get("ctx", {}).get("expected", "")
        allowed = expected.replace("'", "").replace(" or ", ", ")
        return f"{path}: {value!r} is not one of {allowed}"
    if kind == "value_error":
        # Our own validators already name the key path (from the root) in their message.
        message = str(first["msg"]).removeprefix("Value error, ")
        if "." in message.split(":")[0]:
            return f"{prefix}.{message}" if prefix else message
        return f"{path}: {message}"
    if kind == "missing":
        return f"{path}: required key is missing"
    return f"{path}: {value!r} is invalid: {one_line(first['msg'])}"
