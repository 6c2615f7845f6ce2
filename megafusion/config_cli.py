"""``megafusion config``: the resolved config, and the reference of every key.

    megafusion config show --config examples/configs/tiny_text.yaml --set train.steps=20
    megafusion config show --config my.yaml --check --world-size 8   # also validate as train would
    megafusion config docs --write docs/config.md                     # regenerate the reference

``show`` prints the config that ``megafusion train`` would run, as YAML with each key's
description, its choices and (where it differs) its default; the output loads back with
``--config``. A config that does not load, or holds a value outside its choices, ends with
one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from megafusion.config import ConfigError, choice_problems, load_config, validate


def _one_line(message: object) -> str:
    """validate's "invalid config:\n  - a\n  - b" (or a YAML error's lines) as one line."""
    text = str(message).replace(":\n  - ", ": ").replace("\n  - ", "; ")
    return " ".join(text.split())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megafusion config", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="print the resolved config with each key's description")
    show.add_argument("--config", default=None, help="YAML config file (default: every key at its default)")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. --set parallel.tp=2 (repeatable)")
    show.add_argument("--check", action="store_true",
                      help="also validate it as `megafusion train` would on this machine")
    show.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")),
                      help="processes to validate --check against (default: $WORLD_SIZE or 1)")
    docs = commands.add_parser("docs", help="print the configuration reference (docs/config.md) as Markdown")
    docs.add_argument("--write", type=Path, default=None, metavar="PATH", help="write it to PATH instead")
    return parser


def show(args: argparse.Namespace) -> int:
    from megafusion.config_doc import render_yaml

    try:
        cfg = load_config(args.config, args.overrides)
        problems = [message for _, message in choice_problems(cfg)]
        if problems:
            raise ConfigError("invalid config: " + "; ".join(problems))
        if args.check:
            validate(cfg, args.world_size)
    except ConfigError as err:
        print(f"megafusion config show: {_one_line(err)}", file=sys.stderr)
        return 2
    command = ["megafusion config show"]
    if args.config is not None:
        command.append(f"--config {shlex.quote(args.config)}")
    command += [f"--set {shlex.quote(item)}" for item in args.overrides]
    header = (" ".join(command) + "\n"
              "The resolved config: each key under its description, with its choices and (where it\n"
              "differs) its default. It loads back with --config.")
    sys.stdout.write(render_yaml(cfg, header))
    return 0


def docs(args: argparse.Namespace) -> int:
    from megafusion.config_doc import render_markdown

    text = render_markdown()
    if args.write is None:
        sys.stdout.write(text)
    else:
        args.write.write_text(text)
        print(f"wrote {args.write}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return show(args) if args.command == "show" else docs(args)


if __name__ == "__main__":
    sys.exit(main())
