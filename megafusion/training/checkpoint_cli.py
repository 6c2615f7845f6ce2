"""``megafusion checkpoint verify RUN_DIR``: check every checkpoint of a run, on demand.

    megafusion checkpoint verify runs/tiny
    megafusion checkpoint verify runs/tiny/checkpoints/step_00000040   # one checkpoint

Runs the check that loading runs (``training.checkpoint.verify_checkpoint``: each file's
size and CRC-32 against ``manifest.json``, ``.metadata`` read with the restricted
unpickler and every shard it names present and long enough) and prints one line per
checkpoint, oldest first: ``step_00000040 ok``, ``step_00000020 ok (unverified: ...)`` for
a checkpoint saved before manifests existed, or ``step_00000060 FAILED: <why>``.
Exit code: 0 when every checkpoint passes, 1 when any fails, 2 for a path that is not a
run dir or checkpoint (one line, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def verify_run(path: Path) -> int:
    """Prints one line per checkpoint under ``path``; returns the exit code (0, 1 or 2)."""
    from megafusion.training.checkpoint import STEP_DIR, checkpoint_root, complete_checkpoints, verify_checkpoint

    if not path.is_dir():
        print(f"megafusion checkpoint verify: '{path}' is not a directory; give a run dir (holding checkpoints/) "
              "or one checkpoint (checkpoints/step_NNNNNNNN)", file=sys.stderr)
        return 2
    if STEP_DIR.match(path.name):
        checkpoints = [path]
    else:
        checkpoints = [p for _, p in complete_checkpoints(path)]
        unfinished = sorted(checkpoint_root(path).glob("step_*.tmp")) if checkpoint_root(path).is_dir() else []
        for p in unfinished:
            print(f"{p.name} incomplete (a save that did not finish; never loaded, removed when training restarts)")
        if not checkpoints:
            print(f"megafusion checkpoint verify: '{path}' has no complete checkpoint under checkpoints/ "
                  "(is it a run dir written by `megafusion train`?)", file=sys.stderr)
            return 2
    failed = 0
    for ckpt in checkpoints:
        verdict = verify_checkpoint(ckpt)
        if verdict.ok:
            print(f"{ckpt.name} ok" + ("" if verdict.verified else f" (unverified: {verdict.reason})"))
        else:
            failed += 1
            print(f"{ckpt.name} FAILED{' (unsafe)' if verdict.unsafe else ''}: {verdict.reason}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megafusion checkpoint", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check every checkpoint of a run against its manifest")
    verify.add_argument("run_dir", type=Path, help="run directory (or one checkpoints/step_N directory)")
    args = parser.parse_args(argv)
    try:
        return verify_run(args.run_dir)
    except OSError as err:  # unreadable directories: one line, not a traceback
        print(f"megafusion checkpoint verify: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
