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
from megafusion.logging_setup import configure_logging, megatron_warnings

# Exit codes: 2 a config or run directory that cannot run (nothing changed), 3 NaN/inf in a
# loss, gradients or a checkpoint about to be saved (the last checkpoint kept), 143 stopped
# by SIGTERM/SIGINT/SIGUSR1 after saving a checkpoint, 130 a second Ctrl-C.


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

    def fail(message: object, code: int) -> int:
        if is_rank0:  # every rank stops with the same message; one copy is enough
            print(f"megafusion train: {message}", file=sys.stderr, flush=True)
        return code

    # Installed first, so a stop signal during the slow imports and setup below is honoured
    # at the first step boundary instead of ending in a traceback.
    from megafusion.training.preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionWatcher

    watcher = PreemptionWatcher()
    configure_logging()  # rank and time in each record (megafusion.logging_setup)
    try:
        try:
            cfg = load_config(args.config, args.overrides)
            validate(cfg, world_size)
        except ConfigError as err:
            return fail(err, 2)
        run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / Path(args.config).stem

        # megatron-core's import and model-building warnings (TE/Apex fallbacks, deprecations):
        # one line when the first step starts; MEGAFUSION_SHOW_WARNINGS=1 shows them.
        with megatron_warnings() as noise:
            from megafusion.parallel import cpu_compat
            from megafusion.parallel.setup import resolve_device
            from megafusion.training.checkpoint import CheckpointError
            from megafusion.training.guards import NON_FINITE_EXIT_CODE
            from megafusion.training.loop import NonFiniteError, train

            try:
                # On CPU megatron-core runs with the compatibility layer, for this run only.
                with cpu_compat.applied(resolve_device(cfg.train.device)):
                    train(cfg, run_dir, watcher=watcher, started=noise.summarize)
            # A config refused once the process group is up (a provider's checks, the resume
            # check), or checkpoints that cannot be loaded (none verifies, unsafe metadata).
            except (ConfigError, CheckpointError) as err:
                return fail(err, 2)
            except NonFiniteError as err:
                return fail(err, NON_FINITE_EXIT_CODE)
            except Preempted as err:
                return fail(err, PREEMPTED_EXIT_CODE)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the watcher could take it
        return fail("interrupted; the last complete checkpoint is kept (re-run to resume)", 130)
    finally:
        watcher.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
