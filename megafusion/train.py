"""``megafusion train`` / ``python -m megafusion.train``: train from a YAML config.

    megafusion train --config examples/configs/tiny_text.yaml --run-dir runs/tiny --set train.steps=20
    torchrun --nproc_per_node 2 -m megafusion.train --config ... --set parallel.tp=2

The config is loaded and validated against the world size *before* any process group
starts, so a broken config fails fast with a message and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megafusion.config import ConfigError, load_config, validate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megafusion train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file (see examples/configs/)")
    parser.add_argument("--run-dir", default=None,
                        help="where config.yaml, metrics.jsonl, tensorboard/ and checkpoints/ go "
                             "(default: runs/<config name>); an existing run dir is resumed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set parallel.tp=2 (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    is_rank0 = os.environ.get("RANK", "0") == "0"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, world_size)
    except ConfigError as err:
        if is_rank0:
            print(f"megafusion train: {err}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.config).stem

    from megafusion.training.loop import NonFiniteLossError, train

    try:
        train(cfg, run_dir)
    except NonFiniteLossError as err:
        print(f"megafusion train: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
