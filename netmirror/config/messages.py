"""One-line messages for configuration errors: where the value came from, its key path."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import (
    BaseModel,
    ValidationError,
)
from pydantic_core import ErrorDetails

from netmirror.config.model import (
    _KEY_RE,
    AgentConfig,
    Config,
    EnvConfig,
    KubernetesConfig,
    MirrorConfig,
    OutgoingConfig,
    PcapConfig,
    PortConfig,
    _value_repr,
)

# ---------------------------------------------------------------- error messages

_MODELS: dict[str, type[BaseModel]] = {
    model.__name__: model
    for model in (
        Config,
        PortConfig,
        AgentConfig,
        MirrorConfig,
        PcapConfig,
        KubernetesConfig,
        EnvConfig,
        OutgoingConfig,
    )
}

_TYPE_TEXTS: dict[str, str] = {
    "bool_parsing": "is not true or false",
    "bool_type": "is not true or false",
    "dict_type": "is not a mapping",
    "finite_number": "is not a finite number",
    "float_parsing": "is not a number",
    "float_type": "is not a number",
    "int_from_float": "is not a whole number",
    "int_parsing": "is not an integer",
    "int_parsing_size": "is not an integer of a sensible size",
    "int_type": "is not an integer",
    "list_type": "is not a list",
    "model_attributes_type": "is not a mapping",
    "model_type": "is not a mapping",
    "recursion_loop": "refers to itself",
    "string_type": "is not a string",
    "string_unicode": "is not valid text",
}

_BOUND_TEXTS: dict[str, tuple[str, str]] = {
    "greater_than": ("gt", "must be greater than {}"),
    "greater_than_equal": ("ge", "must be at least {}"),
    "less_than": ("lt", "must be less than {}"),
    "less_than_equal": ("le", "must be at most {}"),
}


def _one_line(text: str) -> str:
    # Last line of defence for the single-line promise of NetmirrorError: parser
    # messages and file names are not ours and may contain line breaks.
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _show(value: object) -> str:
    return _one_line(_value_repr.repr(value))


def _format_path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _KEY_RE.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{_show(part)}]"
    return out


def _expected_keys(title: str, loc: Sequence[int | str]) -> list[str] | None:
    """Field names of the model found at ``loc`` inside the model called ``title``."""
    current: Any = _MODELS.get(title)
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        if isinstance(part, str):
            field = current.model_fields.get(part)
            if field is None:
                return None
            current = field.annotation
            # list[PortConfig] is followed by an index in the location.
            if getattr(current, "__origin__", None) is list:
                current = current.__args__[0]
        # An int is the index into the list whose item type we already stepped into.
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def _describe(error: ErrorDetails, title: str) -> tuple[tuple[int | str, ...], str]:
    """Split one pydantic error into the path it concerns and a text for people."""
    loc = tuple(error["loc"])
    if len(loc) >= 2 and loc[-1] == "[key]" and error.get("input") == loc[-2]:
        # pydantic locates a bad key of a mapping as (..., key, "[key]"), with the key
        # as the input: report it at the mapping, as a key. (A value whose key is the
        # text "[key]" has a location ending the same way, but not that input.)
        inner = error.copy()
        inner["loc"] = loc[:-2]
        where, text = _describe(inner, title)
        return where, f"key {text}"
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    if kind == "missing":
        return loc[:-1], f"missing key {_show(loc[-1])}"
    if kind == "extra_forbidden":
        keys = _expected_keys(title, loc[:-1])
        expected = f" (expected one of {', '.join(keys)})" if keys else ""
        return loc, f"unknown key{expected}"
    if kind == "invalid_key":
        # The location ends in a mangled form of the key; the input is the key itself.
        return loc[:-1], f"key {_show(value)} is not a string"
    if kind == "literal_error":
        # pydantic says "'steal', 'mirror' or 'off'"; we list them plainly.
        expected = str(ctx.get("expected", "")).replace("'", "").replace(" or ", ", ")
        return loc, f"{_show(value)} is not one of {expected}"
    if kind == "http_filter":
        sub = tuple(
            int(index) if index else key
            for key, index in re.findall(r"\.?([A-Za-z_]+)|\[(\d+)\]", str(ctx.get("path", "")))
        )
        return loc + sub, _one_line(str(ctx.get("text", "")))
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return loc, f"{_show(value)} {_one_line(str(ctx['error']))}"
    if kind in _BOUND_TEXTS:
        key, template = _BOUND_TEXTS[kind]
        bound = ctx.get(key)
        # Bounds of float fields arrive as floats; "at most 3600" reads better than 3600.0.
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        return loc, f"{_show(value)} {template.format(bound)}"
    if kind in _TYPE_TEXTS:
        return loc, f"{_show(value)} {_TYPE_TEXTS[kind]}"
    message = _one_line(error["msg"])
    return loc, f"{_show(value)} is invalid: {message[:1].lower()}{message[1:]}"


_Locator = Callable[[tuple[int | str, ...]], tuple[str | None, tuple[int | str, ...]]]


def _render(err: ValidationError, locate: _Locator) -> str:
    errors = err.errors(include_url=False)
    if not errors:  # pydantic never does this, but a message must still come out
        return "invalid configuration"
    loc, text = _describe(errors[0], err.title)
    source, loc = locate(loc)
    parts = [part for part in (source, _format_path(loc)) if part]
    line = ": ".join([*parts, text])
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more)"
    return _one_line(line)


def format_validation_error(err: ValidationError, *, source: str | None = None) -> str:
    """Turn a pydantic error into one line: ``[source: ]path: value problem``.

    Only the first error is described; ``(and N more)`` is appended when there are
    others, since fixing one often fixes the rest.
    """
    return _render(err, lambda loc: (source, loc))
