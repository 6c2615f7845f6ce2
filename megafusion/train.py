"""``megafusion train`` / ``python -m megafusion.train``: train from a YAML config.

    megafusion train --config examples/configs/tiny_text.yaml --run-dir runs/tiny --set train.steps=20
    torchrun --nproc_per_node 2 -m megafusion.train --config ... --set parallel.tp=2
    megafusion train --dry-run --world-size 64 --config examples/configs/transfusion_7b_64gpu.yaml

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
from megafusion.scaling.step_time import Hardware

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
    plan = parser.add_argument_group(
        "dry run", "build each rank's model on the meta device in a fake world of --world-size processes "
                   "and report what it holds per GPU (megafusion.scaling.dry_run); nothing is trained or written "
                   "except --json")
    plan.add_argument("--dry-run", action="store_true", help="report memory per rank instead of training")
    plan.add_argument("--world-size", type=int, default=None, metavar="N", help="GPUs to plan for (needs --dry-run)")
    plan.add_argument("--rank", type=int, default=None, metavar="R",
                      help="report this global rank only (default: one rank per pipeline stage)")
    plan.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON to OUT")
    plan.add_argument("--gpu-memory-gb", type=float, default=None, metavar="GIB",
                      help="device memory the totals are compared with, in GiB (default 80)")
    hw = Hardware()
    plan.add_argument("--gpu", default=None, help=f"the GPU whose dense peak the step time uses (default {hw.gpu!r}; "
                                                  "any GPU of megafusion/scaling/flops.py's peak table)")
    plan.add_argument("--mfu", type=float, default=None,
                      help=f"assumed fraction of the peak the matmuls reach (default {hw.mfu})")
    plan.add_argument("--nvlink-gb-s", type=float, default=None,
                      help=f"NVLink bandwidth per GPU and direction, GB/s (default {hw.nvlink_gb_s:g})")
    plan.add_argument("--ib-gb-s", type=float, default=None,
                      help=f"InfiniBand bandwidth per GPU between nodes, GB/s (default {hw.ib_gb_s:g})")
    plan.add_argument("--gpus-per-node", type=int, default=None,
                      help=f"GPUs sharing one NVLink domain (default {hw.gpus_per_node})")
    return parser


_HARDWARE_FLAGS = {"--gpu": "gpu", "--mfu": "mfu", "--nvlink-gb-s": "nvlink_gb_s", "--ib-gb-s": "ib_gb_s",
                   "--gpus-per-node": "gpus_per_node"}


def _hardware(args) -> Hardware:
    """The step-time assumptions: the defaults, with the flags given (ValueError names a bad one)."""
    given = {field: getattr(args, field) for field in _HARDWARE_FLAGS.values() if getattr(args, field) is not None}
    return Hardware(**given)


def _dry_run_args_problem(args) -> str | None:
    """One line naming a dry-run flag that cannot be used as given, and the fix."""
    plan_flags = {"--world-size": args.world_size, "--rank": args.rank, "--json": args.json,
                  "--gpu-memory-gb": args.gpu_memory_gb,
                  **{flag: getattr(args, field) for flag, field in _HARDWARE_FLAGS.items()}}
    if not args.dry_run:
        given = [flag for flag, value in plan_flags.items() if value is not None]
        return f"{given[0]} is a dry-run option; add --dry-run (or drop {given[0]} to train)" if given else None
    if args.world_size is None:
        return "--dry-run needs --world-size N (the number of GPUs to plan for)"
    if args.world_size < 1:
        return f"--world-size {args.world_size} must be at least 1"
    if args.rank is not None and not 0 <= args.rank < args.world_size:
        return (f"--rank {args.rank} is outside the world of --world-size {args.world_size} "
                f"(use 0..{args.world_size - 1})")
    if args.gpu_memory_gb is not None and not args.gpu_memory_gb > 0:
        return f"--gpu-memory-gb {args.gpu_memory_gb} must be positive (e.g. 80 for an H100)"
    try:
        _hardware(args)
    except ValueError as err:
        return f"{err} (a dry-run step-time assumption)"
    return None


def dry_run_main(args) -> int:
    """``--dry-run``: validate for --world-size (without this machine's memory), build each
    reported rank on the meta device, print the table, write --json."""
    def fail(message: object) -> int:
        print(f"megafusion train: {message}", file=sys.stderr, flush=True)
        return 2

    try:
        cfg = load_config(args.config, args.overrides)
        model_parallel = cfg.parallel.tp * cfg.parallel.pp
        if args.world_size % model_parallel:  # the usual slip; validate would list its consequences too
            return fail(f"--world-size {args.world_size} is not a multiple of parallel.tp * parallel.pp = "
                        f"{model_parallel} (data parallelism takes what is left); use a multiple of {model_parallel}")
        # The memory guard compares with THIS machine's memory: not the one being planned for.
        validate(cfg, args.world_size, check_memory=False)
    except ConfigError as err:
        return fail(err)
    with megatron_warnings():
        from megafusion.parallel import cpu_compat
        from megafusion.scaling.dry_run import dry_run, format_table, write_json

        try:
            # Meta-device models through megatron-core need its CPU layer (no CUDA is asked for).
            with cpu_compat.applied("cpu"):
                report = dry_run(cfg, args.world_size, args.rank, config_name=args.config,
                                 gpu_memory_gb=args.gpu_memory_gb or 80.0, hardware=_hardware(args))
        except ConfigError as err:  # a provider's own checks
            return fail(err)
        except ValueError as err:  # a GPU without a peak for the config's matmul dtype
            return fail(err)
    print(format_table(report), flush=True)
    if args.json:
        write_json(report, args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = _dry_run_args_problem(args)
    if problem:
        print(f"megafusion train: {problem}", file=sys.stderr, flush=True)
        return 2
    if args.dry_run:
        return dry_run_main(args)
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
