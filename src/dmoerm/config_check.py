"""Typed construction of config dataclasses from YAML/JSON mappings, driven by the fields' type hints.

Every value is checked against its field's annotation before the dataclass is built, so a bad config fails
before any work with an error naming the field path (``phase1.learning_rate``), the value and what is allowed.
Supported annotations: ``int``, ``float``, ``bool``, ``str``, ``list[X]``, ``dict``, ``X | None``, unions of
these (``list[str] | str``) and nested dataclasses (sections).

YAML 1.1 reads ``1e-3`` (no dot) as a string; a float field accepts such numeric strings. An int field does
not accept strings (``epochs: "3"``), nor floats (``batch_size: 2.5``); a list field does not accept a bare
string (``sources: a.jsonl`` would otherwise be iterated character by character).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A config value that its field does not allow (a ``ValueError``, so callers catching that still do)."""


class RunStopped(RuntimeError):
    """A run stopped on purpose with a message saying why and what to do (a changed input on resume, a judge
    outage, a damaged run file); ``dmoerm`` prints it without a traceback and exits 2."""


def _describe(tp: Any) -> str:
    """How an annotation reads in an error: ``an integer``, ``a list of strings``, ``a section``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in typing.get_args(tp) if a is not type(None)]
        if type(None) in typing.get_args(tp):
            parts.append("null")
        return " or ".join(parts)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_describe(args[0]).split(' ', 1)[-1]}s" if args else "a list"
    if tp is bool:
        return "a boolean (true/false)"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is dict or origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a section (mapping) with fields {', '.join(f.name for f in dataclasses.fields(tp))}"
    return getattr(tp, "__name__", str(tp))


def _fail(path: str, value: Any, tp: Any, hint: str = "") -> ConfigError:
    shown = (
        repr(value) if not isinstance(value, (dict, list)) or len(repr(value)) < 80 else type(value).__name__
    )
    return ConfigError(f"{path}: {shown} is not allowed; expected {_describe(tp)}{hint}")


def check_value(tp: Any, value: Any, path: str) -> Any:
    """``value`` checked (and, for numbers and sections, converted) against annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _fail(path, value, tp)
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return check_value(option, value, path)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(options) == 1 else _fail(path, value, tp)
    if value is None:
        raise _fail(path, value, tp, "; null is not allowed here")
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            check_instance(value, path)
            return value
        if not isinstance(value, dict):
            raise _fail(path, value, tp, f" (set one field with {path}.FIELD=VALUE)")
        return build(tp, value, path)
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str):
            raise _fail(path, value, tp, f"; write a list, e.g. [{value}]")
        if not isinstance(value, (list, tuple)):
            raise _fail(path, value, tp)
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return [check_value(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise _fail(path, value, tp)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(path, value, tp)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            quoted = isinstance(value, str) and value.strip().lstrip("-").isdigit()
            raise _fail(path, value, tp, "; write it without quotes" if quoted else "")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                raise _fail(path, value, tp) from None
            if not math.isfinite(number):
                raise _fail(path, value, tp, " (finite)")
            return number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(path, value, tp)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _fail(path, value, tp, "; quote it if it is meant as text")
        return value
    return value  # Any or an annotation this checker does not know: left to the dataclass


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def build(cls: type, obj: Any, path: str = "", root: str = "config") -> Any:
    """Build dataclass ``cls`` from mapping ``obj``; every value typed, unknown keys rejected.

    A ``ValueError`` of the dataclass's own checks (``"<field>: ..."``) is re-raised with the field's full
    path (``data.test_records: must be >= 1``).
    """
    where = path or root
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a mapping of fields, got {obj!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(k) for k in obj if k not in known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(known)}")
    kwargs = {name: check_value(hints[name], value, _join(path, name)) for name, value in obj.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(_with_path(str(e), cls, path, root)) from None


def _with_path(message: str, cls: type, path: str, root: str) -> str:
    head, sep, rest = message.partition(":")
    first = head.strip().split(".")[0].split("[")[0]
    if sep and first in {f.name for f in dataclasses.fields(cls)}:
        return f"{_join(path, head.strip())}:{rest}"
    return f"{path or root}: {message}"


def check_instance(config: Any, path: str = "") -> None:
    """Type-check every field of a built dataclass (nested sections included); raise :class:`ConfigError`."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        checked = check_value(hints[f.name], value, _join(path, f.name))
        if isinstance(value, int) and not isinstance(value, bool) and isinstance(checked, float):
            setattr(config, f.name, checked)  # an int given for a float field becomes that float
