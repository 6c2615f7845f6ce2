"""The ``megafusion`` command: a thin dispatcher to the module that owns each subcommand.

Each subcommand module exposes ``main(argv: list[str] | None) -> int`` and owns its own
argparse parser, so that ``megafusion train ...`` and ``python -m megafusion.train ...``
are the same program.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("megafusion.train", "train a model (runs under torchrun for several processes)"),
    "generate": ("megafusion.inference.cli", "generate text, images and video frames from a run"),
    "eval": ("megafusion.eval.cli", "evaluate a run on ShapesWorld and held-out text"),
    "quickstart": ("megafusion.quickstart", "generate data, train, evaluate and report, on CPU in minutes"),
    "preprocess-data": ("megafusion.data.preprocess", "turn raw files into indexed datasets (tools/preprocess_data.py)"),
    "train-tokenizer": ("megafusion.data.tokenizer", "train a sentencepiece tokenizer with megafusion's special tokens"),
    "shapes-data": ("megafusion.data.shapes.export", "write a ShapesWorld dataset (text, image-text, video, actions)"),
    "isoflop": ("megafusion.scaling.isoflop_cli", "plan IsoFLOP sweeps and fit scaling laws"),
    "train-decoder": ("megafusion.vision.train_decoder", "train an RAE pixel decoder on frozen features"),
    "checkpoint": ("megafusion.training.checkpoint_cli", "verify a run's checkpoints: `checkpoint verify RUN_DIR`"),
    "export": ("megafusion.interop.export", "export a run's checkpoint to safetensors + config.json"),
    "import": ("megafusion.interop.import_", "turn an exported safetensors directory into a run dir"),
    "config": ("megafusion.config_cli", "print a resolved config with each key's meaning, or the config reference"),
    "bench": ("megafusion.bench", "training throughput of a config: tokens/s, TFLOP/s per GPU, MFU, memory, time split"),
}


def _usage() -> str:
    lines = ["usage: megafusion <command> [options]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `megafusion <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"megafusion: unknown command '{name}'.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            print(f"megafusion: command '{name}' is not available in this build ({module_name} is missing).",
                  file=sys.stderr)
            return 2
        raise
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
