"""``megafusion isoflop plan|run|fit``: plan an IsoFLOP sweep, train it, and fit scaling laws to its runs.

    megafusion isoflop plan --budgets 1e15,3e15,1e16 --family family.yaml --out sweep/ [--sizes 5]
    megafusion isoflop run sweep/ [--out sweep/] [--launcher local|slurm]   # resumable; slurm: an array script
    megafusion isoflop fit sweep/runs/* --plan sweep/plan.json --out sweep/fit/
    megafusion isoflop fit --csv published.csv --out fit/

run (local) skips finished runs, resumes killed ones from their checkpoint, and stops at a
failed run (exit 1; the same command continues); a run dir trained with another config than
the plan's is refused (exit 2). fit leaves a budget whose N_opt lies outside its trained sizes
out of the power laws (it is still reported, flagged and plotted hollow) unless
--include-extrapolated; it exits 0 when every modality was fitted, 1 when some were (the
report holds those; the others' errors are printed), 2 when none could be - a modality with
fewer than two budgets left is not fitted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from megafusion.scaling import isoflop
from megafusion.scaling.plan import PlanError, plan_sweep, write_plan


def _budgets(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budgets {text!r}: give comma-separated FLOPs, e.g. 1e15,3e15") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"--budgets {text!r}: give positive FLOPs, e.g. 1e15,3e15")
    return sorted(set(values))


def _loss_key(text: str) -> tuple[str, str]:
    modality, sep, key = text.partition("=")
    if not sep or modality not in isoflop.MODALITIES or not key:
        raise argparse.ArgumentTypeError(f"--loss-key {text!r}: expected MODALITY=KEY with MODALITY one of "
                                         f"{', '.join(isoflop.MODALITIES)}, e.g. text=loss_text")
    return modality, key


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megafusion isoflop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="write one trainer config per (budget, size) and a launch script")
    plan.add_argument("--budgets", type=_budgets, required=True, help="compute budgets in FLOPs, comma-separated")
    plan.add_argument("--family", type=Path, required=True,
                      help="trainer config YAML with a family: section (see megafusion/scaling/plan.py)")
    plan.add_argument("--out", type=Path, required=True, help="directory for configs/, plan.json and the launcher")
    plan.add_argument("--sizes", type=int, default=None,
                      help="model sizes per budget, centred on family.tokens_per_param (default: all that fit)")
    plan.add_argument("--launcher", choices=("local", "slurm"), default="local")
    plan.add_argument("--gpus-per-run", type=int, default=1, help="processes per run (torchrun when > 1)")

    run = sub.add_parser("run", help="train a plan's runs one after another here (resumable), or write a SLURM "
                                     "array script with one task per run")
    run.add_argument("plan", type=Path, help="the plan directory (or its plan.json) from `isoflop plan`")
    run.add_argument("--out", type=Path, default=None,
                     help="sweep directory: runs go to OUT/runs/<run> (default: the plan directory)")
    run.add_argument("--launcher", choices=("local", "slurm"), default="local",
                     help="local: train here now; slurm: write OUT/launch.sbatch and print the sbatch command")
    run.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                     help="checkpoint interval of every run, for resuming (default: the config's checkpoint.every, "
                          "or a tenth of the run's steps when it is 0)")

    fit = sub.add_parser("fit", help="fit per-modality IsoFLOP curves and N_opt, D_opt ~ C power laws")
    fit.add_argument("run_dirs", nargs="*", type=Path, help="run directories (config.yaml + metrics.jsonl)")
    fit.add_argument("--csv", type=Path, help="instead of run dirs: CSV with budget,params,tokens,modality,loss")
    fit.add_argument("--out", type=Path, required=True, help="directory for scaling_laws.json and the PNG plots")
    fit.add_argument("--plan", type=Path, help="plan.json of the sweep: exact budgets of the runs (by run name)")
    fit.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (0: none)")
    fit.add_argument("--confidence", type=float, default=0.95)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--modalities", type=lambda t: [m for m in t.split(",") if m],
                     help="fit only these modalities, comma-separated (default: every one present)")
    fit.add_argument("--loss-key", type=_loss_key, action="append", default=[], metavar="MODALITY=KEY",
                     help="metrics key of a modality's loss when the default choice is ambiguous")
    fit.add_argument("--average-last", type=int, default=1, help="average the last K logged losses of each run")
    fit.add_argument("--params", choices=isoflop.PARAMS_KINDS, default="active_non_embedding",
                     help="which parameter count is N (run dirs only)")
    fit.add_argument("--tokens", choices=isoflop.TOKENS_KINDS, default="all",
                     help="what D counts (run dirs only): every position trained on, or only the fitted modality's "
                          "(text tokens / image latents; same exponent b with a fixed data mix)")
    fit.add_argument("--budget-tolerance", type=float, default=1.3,
                     help="without --plan: runs whose computed FLOPs are within this factor share a budget")
    fit.add_argument("--include-extrapolated", action="store_true",
                     help="also fit N_opt ~ C^a and D_opt ~ C^b (and their bootstrap) to budgets whose N_opt lies "
                          "outside their trained sizes (the behaviour before this flag existed). Default: such "
                          "budgets are reported and flagged but left out of the laws, since their vertex is an "
                          "extrapolation of the parabola")
    return parser


def _plan(args: argparse.Namespace) -> int:
    if not args.family.is_file():
        raise PlanError(f"family file '{args.family}' does not exist")
    config = yaml.safe_load(args.family.read_text()) or {}
    if not isinstance(config, dict):
        raise PlanError(f"family file '{args.family}' must hold a mapping (a trainer config with a family: section)")
    try:
        runs = plan_sweep(config, args.budgets, args.sizes)
    except PlanError as err:
        raise PlanError(f"{args.family}: {err}") from None
    written = write_plan(config, runs, args.out, args.launcher, args.gpus_per_run, source=str(args.family))
    print(f"{'run':<28} {'budget':>9} {'params':>10} {'tokens':>11} {'steps':>7} {'FLOPs/budget':>12}")
    for r in runs:
        print(f"{r.name:<28} {r.budget:>9.3g} {r.params:>10.3g} {r.tokens:>11.4g} {r.steps:>7d} "
              f"{r.flops / r.budget:>12.4f}")
    print(f"{len(runs)} runs; launch with {written[-1]}")
    return 0


def _fit(args: argparse.Namespace) -> int:
    if bool(args.run_dirs) == bool(args.csv):
        raise isoflop.IsoFLOPError("give either run directories or --csv FILE (not both, not neither)")
    if args.csv:
        observations = isoflop.read_csv(args.csv)
        kind = tokens_kind = None
    else:
        observations = isoflop.read_run_dirs(args.run_dirs, plan=args.plan, loss_keys=dict(args.loss_key),
                                              average_last=args.average_last, params_kind=args.params,
                                              budget_tolerance=args.budget_tolerance, tokens_kind=args.tokens)
        kind, tokens_kind = args.params, args.tokens
    # Each modality on its own: one modality's curves without a minimum do not hide another's result.
    fits, failures = {}, {}
    for m in isoflop.modality_order(observations, args.modalities):
        try:
            fits.update(isoflop.fit_isoflop(observations, args.bootstrap, args.confidence, args.seed, [m],
                                            include_extrapolated=args.include_extrapolated))
        except isoflop.IsoFLOPError as err:
            failures[m] = err
    if not fits:
        raise next(iter(failures.values()))
    written = isoflop.write_report(fits, args.out, args.confidence, kind, tokens_kind)
    for m, f in fits.items():
        for b in f.budgets:
            note = ("" if not b.extrapolated else "  (outside the trained sizes; in the law fit)" if b.used_in_fit
                    else "  (outside the trained sizes; left out of the law fit)")
            print(f"{m:<6} C = {b.budget:.3g}: N_opt = {b.n_opt:.4g}, D_opt = {b.d_opt:.4g}, "
                  f"loss at optimum = {b.loss_opt:.4g}{note}")
        for law, name in ((f.params_law, "N_opt ~ C^a, a"), (f.tokens_law, "D_opt ~ C^b, b")):
            ci = f" [{law.ci[0]:.3f}, {law.ci[1]:.3f}]" if law.ci else " (no interval)"
            print(f"{m:<6} {name} = {law.exponent:.3f}{ci}")
        if f.excluded_budgets:
            print(f"{m:<6} laws fitted without budget(s) {', '.join(f'{c:.3g}' for c in f.excluded_budgets)}: "
                  "N_opt outside the trained sizes (--include-extrapolated keeps them)")
        for warning in f.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in written))
    for m, err in failures.items():
        print(f"megafusion isoflop fit: error: {err} (the report has {', '.join(fits)} only)", file=sys.stderr)
    return 1 if failures else 0


def _run(args: argparse.Namespace) -> int:
    from megafusion.scaling.isoflop_run import RunFailed, run_plan

    try:
        return run_plan(args.plan, args.out, args.launcher, args.checkpoint_every)
    except RunFailed as err:
        print(f"megafusion isoflop run: error: {err}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"plan": _plan, "run": _run, "fit": _fit}[args.command](args)
    except (PlanError, isoflop.IsoFLOPError) as err:
        print(f"megafusion isoflop {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
