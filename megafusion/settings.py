"""Dataclass settings from YAML and ``--set key=value`` overrides, for any dataclass.

``megafusion train``'s :class:`~megafusion.config.Config` (:func:`megafusion.config.load_config`)
and tools with their own settings dataclass (``megafusion train-decoder``'s
``DecoderTrainConfig``) are all read here, with the same rules: a YAML
mapping of field names (nested dataclasses as nested mappings), then ``section.key=value``
overrides whose values are parsed as YAML, then each value checked against its annotation
(an int where an int is declared, ``1e-3`` read as a number, ...), unknown keys refused with
the nearest valid name. :func:`as_overrides` turns such a mapping back into override strings
(the quickstart's recipe, ``megafusion/configs/quickstart.yaml``, as ``--set`` arguments).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, TypeVar

import yaml


T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot run. The message names the key, the value and the fix."""


def read_yaml(path: str | Path, what: str = "a mapping") -> dict[str, Any]:
    """The mapping in a YAML file; ConfigError when it is missing, not YAML or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file '{path}' must hold {what}, got {type(tree).__name__}")
    return tree


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(cls: type, name: str, prefix: str) -> ConfigError:
    valid = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    where = f"{prefix}.{name}" if prefix else name
    hint = f" Did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{where}'.{hint} Valid keys here: {', '.join(valid)}")


def apply_override(tree: dict[str, Any], assignment: str, cls: type) -> None:
    """Sets ``a.b=value`` (value parsed as YAML; empty: null) in ``tree``, a mapping of ``cls``'s fields."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key.sub=value, got '{assignment}'")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = tree
    for depth, key in enumerate(keys):
        hints = _hints(cls)
        if key not in hints:
            raise _unknown(cls, key, ".".join(keys[:depth]))
        if depth == len(keys) - 1:
            try:
                node[key] = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError as err:
                raise ConfigError(f"--set {assignment}: the value is not valid YAML: {err}") from None
            return
        cls = hints[key]
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"config key '{'.'.join(keys[:depth + 1])}' is a value, not a section")
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{'.'.join(keys[:depth + 1])}' must be a mapping")


def describe_type(typ: Any) -> str:
    """A field's type in words, as the docs and messages name it: ``text | transfusion``,
    ``integer or null``, ``auto or number``."""
    origin = typing.get_origin(typ)
    if origin is Literal:
        return " | ".join(str(choice) for choice in typing.get_args(typ))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(arg) for arg in typing.get_args(typ))
    if origin is list:
        return f"list of {describe_type(typing.get_args(typ)[0])}"
    if origin is dict:
        return "mapping of {} to {}".format(*(describe_type(arg) for arg in typing.get_args(typ)))
    names = {bool: "true or false", int: "integer", float: "number", str: "string", type(None): "null"}
    return names.get(typ, getattr(typ, "__name__", str(typ)))


def _coerce(value: Any, typ: Any, key: str, strict: bool = False) -> Any:
    """Checks (and gently converts) ``value`` to the annotated type ``typ``.

    A choice (``Literal``) outside its list is kept when it has the choices' type, so that
    ``validate`` names it with every other problem; ``strict`` (an arm of a union such as
    ``Literal["auto"] | float``) refuses it, so the next arm can try."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(typ) if arg is not type(None)]
        if value is None and len(args) < len(typing.get_args(typ)):
            return None
        if len(args) == 1:  # X | None
            return _coerce(value, args[0], key, strict)
        for arg in args:
            try:
                return _coerce(value, arg, key, strict=True)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}' must be {describe_type(typ)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(typ)
        if value in choices or (not strict and type(value) in {type(choice) for choice in choices}):
            return value
        raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, choices))}, got {value!r}")
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping of {typ.__name__} fields, got {value!r}")
        return build(typ, value, key)
    if origin is dict:
        key_type, value_type = typing.get_args(typ)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        item = typing.get_args(typ)[0] if typing.get_args(typ) else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 1e-3 as a string
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    return value


def build(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    """An instance of the dataclass ``cls`` from a mapping of its fields (checked and converted)."""
    hints = _hints(cls)
    kwargs = {}
    for name, value in values.items():
        if name not in hints:
            raise _unknown(cls, name, prefix)
        kwargs[name] = _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # the dataclass's own checks
        raise ConfigError(f"config section '{prefix or 'top level'}': {err}") from None


def load_dataclass(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = (),
                   values: dict[str, Any] | None = None, what: str = "a mapping") -> T:
    """``cls`` from a YAML file (or its defaults), then ``values`` (e.g. command-line flags:
    top-level fields), then ``key.sub=value`` overrides, in that order."""
    tree = read_yaml(path, what) if path is not None else {}
    tree.update(values or {})
    for assignment in overrides:
        apply_override(tree, assignment, cls)
    try:
        return build(cls, tree)
    except ConfigError as err:
        raise ConfigError(f"{err}{f' (in {path})' if path is not None else ''}") from None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"section.key": value}`` (dotted keys, as ``--set`` takes them)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def yaml_value(value: Any) -> str:
    """``value`` as the right-hand side of a ``key=value`` override (YAML that reads back as ``value``)."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 30).strip()
    return text[:-3].strip() if text.endswith("\n...") else text  # a scalar's end-of-document marker


def as_overrides(tree: dict[str, Any], cls: type, prefix: str = "") -> list[str]:
    """A mapping of ``cls``'s fields as ``key.sub=value`` override strings, one per leaf (a nested
    dataclass's mapping is walked; any other value, a dict field's included, is one value)."""
    out = []
    hints = _hints(cls)
    for name, value in tree.items():
        if name not in hints:
            raise _unknown(cls, name, prefix.rstrip("."))
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
            out += as_overrides(value, hints[name], f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}={yaml_value(value)}")
    return out
