"""What each config key means, read from the dataclasses' source, for ``megafusion config
show`` (the resolved config as commented YAML) and ``docs/config.md`` (the reference).

A key's description is the comment on its line in the section's dataclass and the comment
lines directly above it, read with ``ast`` (where each field is) and ``tokenize`` (where each
comment is); a field without comments falls back to a ``- ``name``: text`` bullet of its
class's docstring (``FlowMatchingConfig`` documents its fields so). A section's summary is
the first paragraph of its docstring. Types and choices come from the annotations
(``Literal[...]``), defaults from a default ``Config()``: nothing is written twice.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import re
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from megafusion.config import Config, choices_of, config_fields, describe_type, transfusion_only

DOCS_PATH = "docs/config.md"
REGENERATE = f"megafusion config docs --write {DOCS_PATH}"


class Key(NamedTuple):
    key: str  # dotted, as --set takes it
    type: Any  # the annotation
    default: Any
    value: Any  # in the config being shown (the default for the reference)
    comment: str
    transfusion_only: bool  # a key of the model/data sections that model.kind = text refuses


# --------------------------------------------------------------------------- reading the source


def _comments(source: str) -> dict[int, tuple[str, bool]]:
    """line -> (comment text, whether the comment is alone on its line)."""
    found = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            alone = not tok.line[:tok.start[1]].strip()
            found[tok.start[0]] = (tok.string.lstrip("#").strip(), alone)
    return found


def _is_marker(text: str) -> bool:
    """``# ---- Transfusion only``: a divider inside a class, not a field's description."""
    return text.startswith("--")


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """field name -> its description: the comment lines directly above the field and the
    comment at the end of its line, joined; else its docstring bullet; else ''."""
    described = _docstring_fields(cls)
    try:
        source = Path(inspect.getsourcefile(cls) or "").read_text(encoding="utf-8")
    except (OSError, TypeError):  # no source shipped: the docstring is all there is
        return described
    comments = _comments(source)
    classes = [node for node in ast.parse(source).body if isinstance(node, ast.ClassDef) and node.name == cls.__name__]
    if not classes:
        return described
    for node in classes[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above = []
        line = node.lineno - 1
        while line in comments and comments[line][1]:
            above.insert(0, comments[line][0])
            line -= 1
        trailing = [comments[n][0] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1)
                    if n in comments and not comments[n][1]]
        text = " ".join(part for part in above + trailing if part and not _is_marker(part))
        if text:
            described[node.target.id] = text
    return described


def _docstring_fields(cls: type) -> dict[str, str]:
    """``- ``a`` / ``b``: text`` bullets of a class docstring (continued on indented lines)."""
    doc = _own_docstring(cls)
    described: dict[str, str] = {}
    names: list[str] = []
    text: list[str] = []

    def flush() -> None:
        for name in names:
            described[name] = _rst_to_markdown(" ".join(text))

    for line in doc.splitlines():
        bullet = re.match(r"- ((?:``\w+``(?: / )?)+): (.*)", line.strip())
        if bullet:
            flush()
            names, text = re.findall(r"``(\w+)``", bullet.group(1)), [bullet.group(2)]
        elif names and line.startswith("  ") and line.strip():
            text.append(line.strip())
        else:
            flush()
            names, text = [], []
    flush()
    return described


def _own_docstring(cls: type) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    if doc.startswith(cls.__name__ + "("):  # the signature dataclasses writes for an undocumented class
        return ""
    return inspect.cleandoc(doc)


def _rst_to_markdown(text: str) -> str:
    return re.sub(r"``(.+?)``", r"`\1`", text)


def section_summary(cls: type) -> str:
    """The first paragraph of a section's docstring, on one line."""
    return _rst_to_markdown(" ".join(_own_docstring(cls).split("\n\n")[0].split()))


# --------------------------------------------------------------------------- the keys


def _sections(cls: type = Config, prefix: str = "") -> list[tuple[str, type]]:
    """(dotted name, dataclass) of every section, parents before their subsections."""
    found = []
    for name, typ in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(typ):
            found.append((prefix + name, typ))
            found += _sections(typ, f"{prefix}{name}.")
    return found


def keys(cfg: Config | None = None) -> list[Key]:
    """Every key of ``cfg`` (default: the defaults), in the dataclasses' order."""
    defaults = config_fields(Config())
    values = config_fields(cfg) if cfg is not None else defaults
    owners = dict(_sections())
    rows = []
    for (key, default, typ), (_, value, _) in zip(defaults, values, strict=True):
        section, _, name = key.rpartition(".")
        comment = field_comments(owners[section]).get(name, "")
        only = transfusion_only(key) and not transfusion_only(section)  # whole sections say so once
        rows.append(Key(key, typ, default, value, comment, only))
    return rows


def yaml_value(value: Any) -> str:
    """A value as it would be written in a config file, on one line."""
    text = yaml.safe_dump([value], default_flow_style=True, sort_keys=False, width=float("inf")).strip()
    return text[1:-1]


# --------------------------------------------------------------------------- config show


def render_yaml(cfg: Config, header: str = "", width: int = 100) -> str:
    """The config as YAML that loads back to ``cfg``, each key under its description, with
    its choices and (where it differs) its default after it."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    by_section: dict[str, list[Key]] = {}
    for row in keys(cfg):
        by_section.setdefault(row.key.rpartition(".")[0], []).append(row)

    def comment(text: str, indent: str) -> list[str]:
        return [f"{indent}# {line}" for line in textwrap.wrap(text, width - len(indent) - 2)]

    def section(name: str, cls: type, depth: int) -> None:
        indent = "  " * depth
        if depth == 0:
            lines.append("")
        summary = section_summary(cls)
        if transfusion_only(name):
            summary = f"{summary} Transfusion only.".strip()
        lines.extend(comment(summary, indent))
        lines.append(f"{indent}{name.rpartition('.')[2]}:")
        inner = indent + "  "
        for row in by_section.get(name, []):
            lines.extend(comment(row.comment, inner))
            notes = []
            choices = choices_of(row.type)
            if choices is not None:
                notes.append(" | ".join(map(str, choices)))
            if row.transfusion_only:
                notes.append("Transfusion only")
            if row.value != row.default:
                notes.append(f"default: {yaml_value(row.default)}")
            note = f"  # {'; '.join(notes)}" if notes else ""
            lines.append(f"{inner}{row.key.rpartition('.')[2]}: {yaml_value(row.value)}{note}")
        for sub, sub_cls in _sections():
            if sub.rpartition(".")[0] == name:
                section(sub, sub_cls, depth + 1)

    for name, cls in _sections():
        if "." not in name:
            section(name, cls, 0)
    return "\n".join(lines).lstrip("\n") + "\n"


# --------------------------------------------------------------------------- docs/config.md


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _type_cell(typ: Any) -> str:
    choices = choices_of(typ)
    if choices is not None:
        text = " \\| ".join(f"`{choice}`" for choice in choices)
        return text + (" or null" if type(None) in typing.get_args(typ) else "")
    return _cell(describe_type(typ))


def render_markdown() -> str:
    """docs/config.md: every section and key with its type or choices, default and meaning."""
    out = [
        f"<!-- Generated from megafusion/config.py by `{REGENERATE}`: edit the dataclasses' comments, "
        "not this file (tests/test_config_doc.py fails when it is stale). -->",
        "",
        "# Configuration reference",
        "",
        "A run is one YAML file of the sections below (`examples/configs/` holds working ones); every key "
        "is optional and defaults to the value shown. `--set section.key=value` overrides any key (the "
        "value parses as YAML, `null` included). `megafusion config show --config FILE [--set ...]` "
        "prints the resolved config with these descriptions, as YAML that loads back.",
        "",
        "The config is checked before any process starts (`megafusion.config.validate`): an unknown key "
        "names the closest valid one, a value outside its choices names them, and every value or layout "
        "that cannot run is reported in one message, with exit code 2. Keys marked *Transfusion only* "
        "(and the `vision` and `diffusion` sections) are refused with `model.kind = text`, which would "
        "ignore them.",
    ]
    rows = keys()
    for name, cls in _sections():
        out += ["", f"## `{name}`", ""]
        summary = section_summary(cls)
        if summary:
            out += [summary, ""]
        out += ["| key | type | default | description |", "|---|---|---|---|"]
        for row in rows:
            if row.key.rpartition(".")[0] != name:
                continue
            comment = _cell(row.comment) + (" *Transfusion only.*" if row.transfusion_only else "")
            out.append(f"| `{row.key}` | {_type_cell(row.type)} | `{_cell(yaml_value(row.default))}` | "
                       f"{comment.strip()} |")
    return "\n".join(out) + "\n"
