"""One-line messages for pydantic's validation errors: the key path, the bad value and
what is allowed (with a did-you-mean for unknown keys, the range of a number)."""

from __future__ import annotations

import difflib
import types
from typing import Annotated, Any, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

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
        if "." in message.split(":")[0] or not loc:  # a model-wide check names its keys
            return f"{prefix}.{message}" if prefix else message
        return f"{path}: {message}"
    if kind == "missing":
        return f"{path}: required key is missing"
    rule = _number_rule(root, loc) if kind in _NUMBER_ERRORS else None
    if rule is not None:
        return f"{path}: {_shown(value)} is {_NUMBER_ERRORS[kind]}; allowed: {rule}"
    return f"{path}: {_shown(value)} is invalid: {one_line(first['msg'])}"


# pydantic's errors of a number: what the value is, in our words.
_NUMBER_ERRORS = {
    "greater_than": "out of range",
    "greater_than_equal": "out of range",
    "less_than": "out of range",
    "less_than_equal": "out of range",
    "finite_number": "not a finite number",
    "int_parsing_size": "too large",
    "int_from_float": "not a whole number",
    "int_parsing": "not a whole number",
    "int_type": "not a whole number",
    "float_parsing": "not a number",
    "float_type": "not a number",
}
_BOUNDS = (
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Lt, "lt", "<"),
    (annotated_types.Le, "le", "<="),
)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _without_none(annotation: Any) -> tuple[Any, bool]:
    """``annotation`` without ``| None``, and whether it had it."""
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0], len(members) < len(get_args(annotation))
    return annotation, False


def _unwrapped(annotation: Any, metadata: list[Any]) -> tuple[Any, list[Any], bool]:
    """The type under ``Annotated`` and ``| None``, its constraints, and whether null is allowed."""
    annotation, nullable = _without_none(annotation)
    if get_origin(annotation) is Annotated:
        annotation, *extra = get_args(annotation)
        for item in extra:
            metadata = [*metadata, *(item.metadata if isinstance(item, FieldInfo) else [item])]
    return annotation, metadata, nullable


def _number_rule(root: type[BaseModel], loc: tuple[int | str, ...]) -> str | None:
    """What the number at ``loc`` may be ("whole numbers >= 1 and <= 100000"), from the
    schema's constraints; None when ``loc`` is not a number field."""
    annotation: Any = root
    metadata: list[Any] = []
    nullable = False
    for part in loc:
        annotation, metadata, nullable = _unwrapped(annotation, metadata)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(str(part))
            if field is None:
                return None
            annotation, metadata = field.annotation, list(field.metadata)
        elif get_origin(annotation) is dict:
            annotation, metadata = get_args(annotation)[1], []
        elif get_origin(annotation) in (tuple, list) and isinstance(part, int):
            entries = [a for a in get_args(annotation) if a is not Ellipsis]
            annotation, metadata = entries[min(part, len(entries) - 1)], []
        else:
            return None
    annotation, metadata, nullable = _unwrapped(annotation, metadata)
    if annotation not in (int, float):
        return None
    bounds = [
        f"{sign} {getattr(item, attr)!r}"
        for kind, attr, sign in _BOUNDS
        for item in metadata
        if isinstance(item, kind)
    ]
    what = "whole numbers" if annotation is int else "finite numbers"
    rule = f"{what} {' and '.join(bounds)}" if bounds else what
    return f"null or {rule}" if nullable else rule
