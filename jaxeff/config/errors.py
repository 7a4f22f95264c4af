"""pydantic's validation errors as jaxeff's one-line messages that name the dotted key and the fix.

pydantic reports where (`loc`: field names and list indices) and what (`type`); the expected type is
read back from the section classes, so messages say `model.remat: expected one of 'none' | 'full'
| 'dots_saveable', got 'some'` rather than pydantic's multi-line report.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any, Literal

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ValidationError

from jaxeff.config.base import ConfigError


def type_name(tp: Any) -> str:
    """A reader's name for an annotation: `int`, `'a' | 'b'`, `list of str`, `int or null`."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "a mapping of keys (a section)"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _strip(tp: Any) -> Any:
    """The bare type of `Annotated[T, ...]`."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp


def _unwrap_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if (isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union) and len(args) == 1:
        return args[0]
    return tp


def _section_class(tp: Any) -> type[BaseModel] | None:
    inner = _strip(_unwrap_optional(tp))
    return inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None


def _constraints(tp: Any) -> list[Any]:
    """The annotated_types constraints (Gt, Ge, Lt, Le, ...) inside `Annotated[T, Field(...), ...]`."""
    out = []
    for meta in typing.get_args(tp)[1:] if typing.get_origin(tp) is typing.Annotated else ():
        out += getattr(meta, "metadata", [meta])  # a FieldInfo carries its constraints in .metadata
    return out


def _walk(root: type[BaseModel], loc: tuple) -> tuple[str, type[BaseModel] | None, Any, list[Any]]:
    """(dotted key, the section class it names or None, its annotation, its constraints) for a pydantic `loc`."""
    key, section, annotation, constraints = "", root, root, []
    for part in loc:
        if isinstance(part, int):  # a list index
            key += f"[{part}]"
            args = typing.get_args(annotation) if typing.get_origin(annotation) is list else ()
            annotation, constraints = (_strip(args[0]), _constraints(args[0])) if args else (None, [])
            section = None
            continue
        if section is None or part not in section.model_fields:
            break  # a union-member tag that pydantic adds to the loc: the key is complete
        key = f"{key}.{part}" if key else part
        field = section.model_fields[part]
        # `PositiveInt | None` keeps its bounds inside the union member, not on the field
        constraints = list(field.metadata) or _constraints(_unwrap_optional(field.annotation))
        annotation = _strip(field.annotation)
        section = _section_class(annotation)
    return key, section, annotation, constraints


def allowed_range(constraints: list[Any]) -> str:
    """'positive', '>= 0', 'between 0 and 1 (exclusive)', ... from Gt/Ge/Lt/Le constraints."""
    lower = next(((">", c.gt) if isinstance(c, Gt) else (">=", c.ge) for c in constraints
                  if isinstance(c, (Gt, Ge))), None)
    upper = next((("<", c.lt) if isinstance(c, Lt) else ("<=", c.le) for c in constraints
                  if isinstance(c, (Lt, Le))), None)
    if lower and upper:
        ends = {(">", "<"): "exclusive", (">=", "<="): "inclusive"}.get((lower[0], upper[0]))
        if ends:
            return f"between {lower[1]} and {upper[1]} ({ends})"
        return f"{lower[0]} {lower[1]} and {upper[0]} {upper[1]}"
    if lower == (">", 0):
        return "positive"
    bound = lower or upper
    return f"{bound[0]} {bound[1]}" if bound else "in range"


def unknown_key_error(section: type[BaseModel], dotted: str) -> ConfigError:
    valid = list(section.model_fields)
    name = dotted.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{dotted}'{hint}; valid keys here: {', '.join(valid)}")


def _describe(error: dict[str, Any], root: type[BaseModel]) -> str:
    ctx, kind, value = error.get("ctx") or {}, error["type"], error.get("input")
    if isinstance(ctx.get("error"), ConfigError):  # raised by one of our own validators
        return str(ctx["error"])
    loc = tuple(error["loc"])
    if kind == "extra_forbidden":
        parent_key, parent, _, _ = _walk(root, loc[:-1])
        dotted = f"{parent_key}.{loc[-1]}" if parent_key else str(loc[-1])
        return str(unknown_key_error(parent or root, dotted))
    key, _, annotation, constraints = _walk(root, loc)
    if isinstance(value, dict) and _section_class(annotation) is None:
        return f"'{key}' is a setting, not a section: give it one value, not the keys {', '.join(map(str, value))}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{key}: expected a mapping of keys (a section), got {_short(value)}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{key}={_short(value)}: must be {allowed_range(constraints)}"
    if kind == "finite_number":
        return f"{key}: expected a finite number, got {_short(value)}"
    if kind == "too_short":
        return f"{key}: needs at least {ctx.get('min_length', 1)} entry, got {_short(value)}"
    if annotation is not None:
        expected = type_name(annotation)
        if typing.get_origin(annotation) is Literal:
            expected = f"one of {expected}"
        elif typing.get_origin(annotation) is list and not isinstance(value, list):
            expected = f"a {expected}"
        return f"{key}: expected {expected}, got {_short(value)}"
    return f"{key}: {error['msg']}, got {_short(value)}"


def config_error(exc: ValidationError, root: type[BaseModel], where: str = "") -> ConfigError:
    """The first problem of a ValidationError as one line (with a count of the others)."""
    errors = exc.errors(include_url=False)
    message = _describe(errors[0], root)
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''} after fixing it)"
    return ConfigError(f"{where}{message}")
