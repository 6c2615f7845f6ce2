"""Dataclass settings from YAML and ``--set key=value`` overrides, for any dataclass.

``megafusion train`` reads its :class:`~megafusion.config.Config` with
:func:`megafusion.config.load_config`; tools with their own settings dataclass (``megafusion
train-decoder``'s ``DecoderTrainConfig``) read theirs here, with the same rules: a YAML
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

from megafusion.config import ConfigError

T = TypeVar("T")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file; ConfigError when it is missing, not YAML or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping, got {type(tree).__name__}")
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


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """``value`` checked against the annotation ``typ`` (an int may stand for a float, a numeric string too)."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(typ):
            return None
        errors = []
        for arg in typing.get_args(typ):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        choices = typing.get_args(typ)
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
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
                return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
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
                   values: dict[str, Any] | None = None) -> T:
    """``cls`` from a YAML file (or its defaults), then ``values`` (e.g. command-line flags:
    top-level fields), then ``key.sub=value`` overrides, in that order."""
    tree = read_yaml(path) if path is not None else {}
    tree.update(values or {})
    for assignment in overrides:
        apply_override(tree, assignment, cls)
    try:
        return build(cls, tree)
    except ConfigError as err:
        raise ConfigError(f"{err}{f' (in {path})' if path is not None else ''}") from None


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
