"""IsoFLOP fits (Hoffmann et al. 2022, approach 2), separately for every modality.

For each compute budget C the runs trained different sizes N on D = tokens seen. Per
budget and modality the final loss is fitted with a parabola in log10 N; its vertex is
N_opt, and D_opt is read off the budget's own log D vs log N line. Across budgets,
N_opt = k_N C^a and D_opt = k_D C^b are fitted in log-log space. Confidence intervals come
from a bootstrap that resamples the runs of every budget with replacement and redoes the
whole fit (parabolas, optima, power laws).

A budget whose vertex lies outside its trained sizes ("extrapolated": the grid never
reached the optimum, so the vertex is set by the curve's far-off shape, e.g. N_opt = 18 from
a nearly flat parabola) is reported and plotted but left out of the power laws and their
bootstrap, unless ``include_extrapolated``. Fewer than two budgets left is an error, as is a
sweep of one budget.

Inputs: run dirs (config.yaml + metrics.jsonl, see :func:`read_run_dirs`) or a CSV with
columns budget, params, tokens, modality, loss (:func:`read_csv`). Output:
:func:`write_report` writes ``scaling_laws.json`` and per modality ``isoflop_<m>.png``
(loss vs N per budget) and ``optima_<m>.png`` (N_opt, D_opt vs C).
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import yaml

from megafusion.scaling.flops import params

MODALITIES = ("text", "image", "video")
PARAMS_KINDS = ("active_non_embedding", "active", "total")
TOKENS_KINDS = ("all", "modality")  # D = every position trained on | the positions of the fitted modality


class IsoFLOPError(ValueError):
    """Inputs that cannot give a fit; the message names the run, row or budget at fault."""


@dataclass(frozen=True)
class Observation:
    """The final loss of one run on one modality."""

    budget: float  # training FLOPs the run was planned to spend
    params: float  # N
    tokens: float  # D, tokens trained on
    modality: str
    loss: float
    source: str  # run dir or CSV row, for messages


# --------------------------------------------------------------------------- reading


def read_csv(path: str | Path) -> list[Observation]:
    """Reads rows of (budget, params, tokens, modality, loss); other columns are ignored."""
    path = Path(path)
    if not path.is_file():
        raise IsoFLOPError(f"CSV file '{path}' does not exist")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in ("budget", "params", "tokens", "modality", "loss") if c not in columns]
        if missing:
            raise IsoFLOPError(f"CSV file '{path}' lacks column(s) {', '.join(missing)}; it has "
                               f"{', '.join(columns) or 'none'}. Expected: budget,params,tokens,modality,loss")
        observations = []
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            where = f"{path} line {line}"
            values = {}
            for key in ("budget", "params", "tokens", "loss"):
                try:
                    values[key] = float(row[key])
                except ValueError:
                    raise IsoFLOPError(f"{where}: {key} = {row[key]!r} is not a number") from None
            if not row["modality"]:
                raise IsoFLOPError(f"{where}: modality is empty")
            observations.append(Observation(modality=row["modality"], source=where, **values))
    if not observations:
        raise IsoFLOPError(f"CSV file '{path}' has a header but no rows")
    return observations


def _read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise IsoFLOPError(f"run dir '{run}' has no metrics.jsonl: the run did not log (did it start?); "
                           "finish or remove it")
    records = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise IsoFLOPError(f"{path} line {line_no} is not JSON ({err})") from None
    if not records:
        raise IsoFLOPError(f"{path} is empty: the run logged no step")
    return records


def _loss_keys(run: Path, records: list[dict], chosen: dict[str, str]) -> dict[str, str]:
    """modality -> metrics key of its loss: ``--loss-key`` choice, else ``loss_<m>``, else the
    one key holding both 'loss' and the modality's name."""
    keys = sorted({k for r in records for k in r})
    found = {}
    for m in MODALITIES:
        if m in chosen:
            if chosen[m] not in keys:
                raise IsoFLOPError(f"run dir '{run}': metrics.jsonl has no key '{chosen[m]}' (asked for {m}); "
                                   f"keys: {', '.join(keys)}")
            found[m] = chosen[m]
            continue
        candidates = [k for k in keys if m in k.lower() and "loss" in k.lower()]
        if f"loss_{m}" in candidates:
            found[m] = f"loss_{m}"
        elif len(candidates) == 1:
            found[m] = candidates[0]
        elif candidates:
            raise IsoFLOPError(f"run dir '{run}': several {m} losses in metrics.jsonl ({', '.join(candidates)}); "
                               f"pick one with --loss-key {m}=KEY")
    if not found:
        raise IsoFLOPError(f"run dir '{run}': metrics.jsonl has no per-modality loss (a key containing 'loss' and "
                           f"one of {', '.join(MODALITIES)}, e.g. loss_text); keys: {', '.join(keys)}")
    return found


@dataclass(frozen=True)
class RunCompute:
    """Size and compute of a run, from its config alone."""

    params: float  # N
    tokens: float  # D: every position trained on, train.steps * global_batch_size * seq_length
    flops: float  # C: D's training FLOPs on the packing of the run's data (see plan.packing_of)
    tokens_by_modality: dict  # D split into text / image / video / padding positions


def run_compute(config: dict, params_kind: str = "active_non_embedding") -> RunCompute:
    """N, D, C of a run from its config dict. N: the model section (a Transfusion model's
    latent layout from its representation); C: FLOPs of D on the packing the run trains on
    (measured on its data for a Transfusion model, one document per sequence for a text
    model) - the budget when no plan gives it."""
    from megafusion.scaling.plan import packing_of, shape_of_config

    model, train = config.get("model") or {}, config.get("train") or {}
    shape = shape_of_config(config)
    packing = packing_of({k: v for k, v in config.items() if k != "family"})
    seq = int(model.get("seq_length", 64))
    sequences = int(train.get("steps", 100)) * int(train.get("global_batch_size", 8))
    per_sequence = packing.training_flops_per_sequence(shape)
    return RunCompute(float(getattr(params(shape), params_kind)), float(sequences * seq), sequences * per_sequence,
                      {k: sequences * v for k, v in packing.by_modality.items()})


def _read_plan(plan: str | Path) -> dict[str, dict]:
    """run name -> its plan.json entry (budget, tokens_by_modality, ...)."""
    path = Path(plan)
    if not path.is_file():
        raise IsoFLOPError(f"plan file '{path}' does not exist (it is the plan.json `megafusion isoflop plan` wrote)")
    entries = json.loads(path.read_text()).get("runs", [])
    return {e["name"]: e for e in entries}


def _cluster_budgets(computes: dict[str, float], tolerance: float) -> dict[str, float]:
    """Groups runs whose computed FLOPs lie within ``tolerance`` x of each other; each group's
    budget is its geometric mean."""
    order = sorted(computes, key=computes.get)
    groups: list[list[str]] = []
    for name in order:
        if groups and computes[name] <= tolerance * computes[groups[-1][0]]:
            groups[-1].append(name)
        else:
            groups.append([name])
    budgets = {}
    for group in groups:
        mean = math.exp(sum(math.log(computes[n]) for n in group) / len(group))
        budgets.update({n: mean for n in group})
    return budgets


def read_run_dirs(run_dirs: Sequence[str | Path], plan: str | Path | None = None,
                  loss_keys: dict[str, str] | None = None, average_last: int = 1,
                  params_kind: str = "active_non_embedding", budget_tolerance: float = 1.3,
                  tokens_kind: str = "all") -> list[Observation]:
    """Final per-modality losses of finished runs.

    Each run dir holds ``config.yaml`` (``model.*``, ``train.steps``,
    ``train.global_batch_size``) and ``metrics.jsonl``. The final loss of a modality is the
    mean of its last ``average_last`` logged values. The budget of a run is read from the
    planner's ``plan.json`` (matched by run-dir name) when given, else computed from the
    config and runs within ``budget_tolerance`` x of each other are taken as one budget.
    D is every position a run trained on (``tokens_kind = "all"``) or only the positions of
    the fitted modality (``"modality"``: text tokens for text, image latents for image) - the
    plan's ``tokens_by_modality``, else the run's measured packing. With a fixed data mix the
    two differ by a constant factor: the exponent b is the same, D_opt is not.
    """
    if tokens_kind not in TOKENS_KINDS:
        raise IsoFLOPError(f"tokens kind {tokens_kind!r} is not one of {', '.join(TOKENS_KINDS)}")
    if params_kind not in PARAMS_KINDS:
        raise IsoFLOPError(f"params kind {params_kind!r} is not one of {', '.join(PARAMS_KINDS)}")
    if average_last < 1:
        raise IsoFLOPError(f"average_last = {average_last} must be at least 1")
    planned = _read_plan(plan) if plan is not None else None
    runs: dict[str, tuple[Path, RunCompute, dict[str, float]]] = {}
    for run in map(Path, run_dirs):
        if not run.is_dir():
            raise IsoFLOPError(f"run dir '{run}' does not exist")
        config_path = run / "config.yaml"
        if not config_path.is_file():
            raise IsoFLOPError(f"run dir '{run}' has no config.yaml; is it a megafusion run dir?")
        config = yaml.safe_load(config_path.read_text()) or {}
        try:
            compute = run_compute(config, params_kind)
        except (ValueError, TypeError) as err:
            raise IsoFLOPError(f"{config_path}: cannot size the model: {err}") from None
        records = _read_metrics(run)
        steps = int((config.get("train") or {}).get("steps", 100))
        every = int((config.get("logging") or {}).get("every", 1))
        last = max((r["step"] for r in records if isinstance(r.get("step"), (int, float))), default=None)
        if last is not None and last + every < steps:  # (steps may be logged from 0 or from 1)
            raise IsoFLOPError(f"run dir '{run}' logged up to step {last} of train.steps = {steps}: it has not "
                               "finished; finish it or leave it out (its loss is not final)")
        losses = {}
        for m, key in _loss_keys(run, records, loss_keys or {}).items():
            logged = [(r.get("step"), r[key]) for r in records if key in r and r[key] is not None]
            tail = logged[-average_last:]
            bad = [(step, v) for step, v in tail if not isinstance(v, (int, float)) or not math.isfinite(v)]
            if bad:
                raise IsoFLOPError(f"run dir '{run}': {key} at step {bad[0][0]} is {bad[0][1]!r}; a diverged or "
                                   "broken run cannot enter the fit - rerun it or leave it out")
            losses[m] = float(np.mean([v for _, v in tail]))
        if run.name in runs:
            raise IsoFLOPError(f"two run dirs are named '{run.name}' ({runs[run.name][0]} and {run}); "
                               "run names must be unique")
        runs[run.name] = (run, compute, losses)
    if not runs:
        raise IsoFLOPError("no run dirs given")
    if planned is not None:
        missing = [str(r[0]) for name, r in runs.items() if name not in planned]
        if missing:
            raise IsoFLOPError(f"run dir(s) {', '.join(missing)} are not in plan {plan}")
        budgets = {name: float(planned[name]["budget"]) for name in runs}
    else:
        budgets = _cluster_budgets({name: r[1].flops for name, r in runs.items()}, budget_tolerance)

    def tokens(name: str, compute: RunCompute, modality: str) -> float:
        if tokens_kind == "all":
            return compute.tokens
        split = (planned or {}).get(name, {}).get("tokens_by_modality") or compute.tokens_by_modality
        if not split.get(modality):
            raise IsoFLOPError(f"run '{name}': no {modality} positions in its packing to count as D "
                               f"(tokens_by_modality = {split}); fit with tokens kind 'all'")
        return float(split[modality])

    return [Observation(budget=budgets[name], params=compute.params, tokens=tokens(name, compute, m), modality=m,
                        loss=loss, source=str(run))
            for name, (run, compute, losses) in runs.items() for m, loss in losses.items()]


# --------------------------------------------------------------------------- fitting


@dataclass
class BudgetFit:
    """One IsoFLOP curve: loss = c2 x^2 + c1 x + c0 with x = log10 N."""

    budget: float
    observations: list[Observation]
    parabola: tuple[float, float, float]
    n_opt: float
    d_opt: float
    loss_opt: float
    extrapolated: bool  # the vertex lies outside the sizes that were trained
    used_in_fit: bool = True  # enters the power laws (False: extrapolated and left out)


@dataclass
class PowerLaw:
    """y = coefficient * C ** exponent, with a bootstrap interval on the exponent."""

    exponent: float
    coefficient: float
    ci: tuple[float, float] | None  # None when too few bootstrap samples were valid

    def __call__(self, compute: np.ndarray | float) -> np.ndarray | float:
        return self.coefficient * np.asarray(compute, dtype=float) ** self.exponent


@dataclass
class ModalityFit:
    modality: str
    budgets: list[BudgetFit]
    params_law: PowerLaw  # N_opt ~ C^a
    tokens_law: PowerLaw  # D_opt ~ C^b
    bootstrap_samples: int
    bootstrap_kept: int
    warnings: list[str] = field(default_factory=list)

    @property
    def excluded_budgets(self) -> list[float]:
        """Budgets (FLOPs) reported but left out of the power laws."""
        return [b.budget for b in self.budgets if not b.used_in_fit]


def _weighted_lstsq(design: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Batched weighted least squares: design [n, p], y [n], weights [B, n] -> [B, p]."""
    gram = np.einsum("bn,ni,nj->bij", weights, design, design)
    rhs = np.einsum("bn,ni,n->bi", weights, design, y)
    return np.linalg.solve(gram, rhs[..., None])[..., 0]


@dataclass
class _Curves:
    """Batched per-budget fits, one row per weighting of the runs."""

    parabola: np.ndarray  # [B, 3] loss = c2 x^2 + c1 x + c0, x = log10 N
    log_n_opt: np.ndarray  # [B]
    log_d_opt: np.ndarray  # [B]
    loss_opt: np.ndarray  # [B]


def _fit_curves(x: np.ndarray, log_d: np.ndarray, loss: np.ndarray, weights: np.ndarray) -> _Curves:
    """Parabola of loss in x and line of log D in x for every row of ``weights`` [B, n]."""
    center = x.mean()  # fit in u = x - center: better conditioned
    u = x - center
    c2, c1, c0 = _weighted_lstsq(np.stack([u ** 2, u, np.ones_like(u)], 1), loss, weights).T
    slope, intercept = _weighted_lstsq(np.stack([u, np.ones_like(u)], 1), log_d, weights).T
    with np.errstate(divide="ignore", invalid="ignore"):
        u_opt = -c1 / (2 * c2)
        loss_opt = c0 - c1 ** 2 / (4 * c2)
    parabola = np.stack([c2, c1 - 2 * c2 * center, c2 * center ** 2 - c1 * center + c0], 1)
    return _Curves(parabola, u_opt + center, slope * u_opt + intercept, loss_opt)


def _describe(obs: Iterable[Observation]) -> str:
    return ", ".join(f"{o.source} (N={o.params:.3g})" for o in obs)


def _check(modality: str, by_budget: dict[float, list[Observation]]) -> None:
    for o in (o for group in by_budget.values() for o in group):
        for key in ("budget", "params", "tokens", "loss"):
            value = getattr(o, key)
            if not math.isfinite(value):
                raise IsoFLOPError(f"{o.source}: {key} is {value} ({modality}); leave the run out or fix it")
            if key != "loss" and value <= 0:
                raise IsoFLOPError(f"{o.source}: {key} = {value} must be positive")
    if len(by_budget) < 2:
        (budget, group), = by_budget.items()
        raise IsoFLOPError(f"{modality}: runs at only one compute budget ({budget:.3g} FLOPs: {_describe(group)}); "
                           "fitting N_opt ~ C^a needs at least two budgets")
    for budget, group in by_budget.items():
        sizes = sorted({o.params for o in group})
        if len(sizes) < 3:
            raise IsoFLOPError(f"{modality} at budget {budget:.3g} FLOPs: {len(sizes)} model size(s) "
                               f"({_describe(group)}); a parabola in log N needs at least three sizes")


def fit_modality(observations: Sequence[Observation], modality: str, bootstrap: int = 1000,
                 confidence: float = 0.95, seed: int = 0, include_extrapolated: bool = False) -> ModalityFit:
    """Fits one modality's IsoFLOP curves and power laws; see the module doc.

    Every budget gets its parabola and vertex; the laws N_opt ~ C^a, D_opt ~ C^b (and their
    bootstrap) use only the budgets whose vertex lies inside the trained sizes, or all of them
    with ``include_extrapolated``. Raises IsoFLOPError when fewer than two budgets are left."""
    by_budget: dict[float, list[Observation]] = defaultdict(list)
    for o in observations:
        if o.modality == modality:
            by_budget[o.budget].append(o)
    if not by_budget:
        raise IsoFLOPError(f"no observations for modality '{modality}'")
    _check(modality, by_budget)
    budgets = sorted(by_budget)
    rng = np.random.default_rng(seed)
    fits, warnings = [], []
    # per budget: bootstrap log10 N_opt, log10 D_opt [bootstrap] and which resamples are usable
    boot_logn, boot_logd, boot_ok = [], [], []
    for budget in budgets:
        group = by_budget[budget]
        x = np.log10([o.params for o in group])
        logd = np.log10([o.tokens for o in group])
        loss = np.array([o.loss for o in group])
        curve = _fit_curves(x, logd, loss, np.ones((1, len(x))))
        coeffs, logn = curve.parabola[0], curve.log_n_opt[0]
        if not coeffs[0] > 0:
            raise IsoFLOPError(f"{modality} at budget {budget:.3g} FLOPs: loss vs log N has no minimum (the fitted "
                               f"parabola opens downward) over {_describe(group)} with losses "
                               f"{', '.join(f'{v:.4g}' for v in loss)}; train sizes on both sides of the optimum")
        extrapolated = not x.min() <= logn <= x.max()
        if extrapolated:
            use = ("kept in the N_opt ~ C^a, D_opt ~ C^b fits (--include-extrapolated)" if include_extrapolated else
                   "left out of the N_opt ~ C^a, D_opt ~ C^b fits (--include-extrapolated keeps it)")
            warnings.append(f"{modality} at budget {budget:.3g}: N_opt = {10 ** logn:.3g} lies outside the trained "
                            f"sizes {10 ** x.min():.3g}..{10 ** x.max():.3g}; extend the grid that way; {use}")
        fits.append(BudgetFit(budget, list(group), tuple(float(c) for c in coeffs), float(10 ** logn),
                              float(10 ** curve.log_d_opt[0]), float(curve.loss_opt[0]), bool(extrapolated),
                              used_in_fit=include_extrapolated or not extrapolated))
        if bootstrap:
            weights = rng.multinomial(len(x), np.full(len(x), 1 / len(x)), size=bootstrap).astype(float)
            _, inverse = np.unique(x, return_inverse=True)
            per_size = np.zeros((bootstrap, inverse.max() + 1))
            np.add.at(per_size.T, inverse, weights.T)
            enough = (per_size > 0).sum(1) >= 3
            weights[~enough] = 1.0  # keeps the solves regular; those samples are dropped below
            boot = _fit_curves(x, logd, loss, weights)
            boot_ok.append(enough & (boot.parabola[:, 0] > 0))
            boot_logn.append(boot.log_n_opt)
            boot_logd.append(boot.log_d_opt)

    used = [i for i, f in enumerate(fits) if f.used_in_fit]
    if len(used) < 2:
        left_out = []
        for f in fits:
            if not f.used_in_fit:
                sizes = [o.params for o in f.observations]
                left_out.append(f"{f.budget:.3g} (N_opt = {f.n_opt:.3g} outside {min(sizes):.3g}..{max(sizes):.3g})")
        raise IsoFLOPError(f"{modality}: {len(used)} of {len(fits)} budgets have N_opt inside their trained sizes; "
                           f"left out as extrapolated: {', '.join(left_out)}; fitting N_opt ~ C^a needs at least two "
                           "budgets - extend those grids toward their optimum, or pass --include-extrapolated to fit "
                           "them anyway")
    logc = np.log10([budgets[i] for i in used])
    a, log_kn = np.polyfit(logc, np.log10([fits[i].n_opt for i in used]), 1)
    b, log_kd = np.polyfit(logc, np.log10([fits[i].d_opt for i in used]), 1)
    ci_a = ci_b = None
    # a resample counts when every budget in the fit gave a usable curve; left-out budgets do not vote
    boot_ok = np.logical_and.reduce([boot_ok[i] for i in used]) if bootstrap else None
    kept = int(boot_ok.sum()) if bootstrap else 0
    if bootstrap:
        lc = logc - logc.mean()

        def slopes(values: list[np.ndarray]) -> np.ndarray:
            y = np.stack([values[i] for i in used], 1)[boot_ok]  # [kept, used budgets]
            return (y - y.mean(1, keepdims=True)) @ lc / (lc @ lc)

        if kept >= max(20, bootstrap // 10):
            tail = 100 * (1 - confidence) / 2
            ci_a = tuple(float(v) for v in np.percentile(slopes(boot_logn), [tail, 100 - tail]))
            ci_b = tuple(float(v) for v in np.percentile(slopes(boot_logd), [tail, 100 - tail]))
        if kept < 0.5 * bootstrap:
            warnings.append(f"{modality}: only {kept} of {bootstrap} bootstrap samples were usable (a resample needs "
                            "3 distinct sizes and an upward parabola at every budget in the fit); train more sizes "
                            "per budget for trustworthy intervals")
    return ModalityFit(modality, fits, PowerLaw(float(a), float(10 ** log_kn), ci_a),
                       PowerLaw(float(b), float(10 ** log_kd), ci_b), bootstrap, kept, warnings)


def fit_isoflop(observations: Sequence[Observation], bootstrap: int = 1000, confidence: float = 0.95,
                seed: int = 0, modalities: Sequence[str] | None = None,
                include_extrapolated: bool = False) -> dict[str, ModalityFit]:
    """Fits every modality present (in the order text, image, video, then others), or only
    ``modalities``; ``include_extrapolated`` as in :func:`fit_modality`."""
    if not observations:
        raise IsoFLOPError("no observations to fit")
    if not 0 < confidence < 1 or bootstrap < 0:
        raise IsoFLOPError(f"confidence = {confidence} must lie in (0, 1) and bootstrap = {bootstrap} be >= 0")
    return {m: fit_modality(observations, m, bootstrap, confidence, seed, include_extrapolated)
            for m in modality_order(observations, modalities)}


def modality_order(observations: Sequence[Observation], modalities: Sequence[str] | None = None) -> list[str]:
    """The modalities present (text, image, video, then others), or only ``modalities``."""
    present = {o.modality for o in observations}
    order = [m for m in MODALITIES if m in present] + sorted(present - set(MODALITIES))
    if modalities is not None:
        unknown = [m for m in modalities if m not in present]
        if unknown:
            raise IsoFLOPError(f"no observations for modality {', '.join(unknown)}; present: {', '.join(order)}")
        order = [m for m in order if m in modalities]
    return order


# --------------------------------------------------------------------------- report


def _law_json(law: PowerLaw) -> dict:
    return {"exponent": law.exponent, "coefficient": law.coefficient, "ci": list(law.ci) if law.ci else None}


def to_json(fits: dict[str, ModalityFit], confidence: float = 0.95, params_kind: str | None = None,
            tokens_kind: str | None = None) -> dict:
    return {
        "params_definition": params_kind or "as given",
        "tokens_definition": tokens_kind or "as given",
        "confidence": confidence,
        "modalities": {
            m: {
                "params_law": _law_json(f.params_law),  # N_opt = coefficient * C^exponent (a)
                "tokens_law": _law_json(f.tokens_law),  # D_opt = coefficient * C^exponent (b)
                "bootstrap": {"samples": f.bootstrap_samples, "kept": f.bootstrap_kept},
                "warnings": f.warnings,
                "excluded_budgets": f.excluded_budgets,  # FLOPs of the budgets the laws left out (extrapolated)
                "budgets": [{
                    "flops": b.budget, "n_opt": b.n_opt, "d_opt": b.d_opt, "loss_opt": b.loss_opt,
                    "parabola_log10_params": list(b.parabola), "extrapolated": b.extrapolated,
                    "used_in_fit": b.used_in_fit,
                    "runs": [{"params": o.params, "tokens": o.tokens, "loss": o.loss, "source": o.source}
                             for o in b.observations],
                } for b in f.budgets],
            } for m, f in fits.items()
        },
    }


def _figure(width: float = 6.4, height: float = 4.8, cols: int = 1):
    # Figure + Agg canvas directly: no pyplot, so no global backend is chosen for the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, cols, i + 1) for i in range(cols)]


def _interval(law: PowerLaw) -> str:
    return f" [{law.ci[0]:.3f}, {law.ci[1]:.3f}]" if law.ci else ""


def plot_isoflop_curves(fit: ModalityFit, path: Path) -> None:
    import matplotlib

    fig, (ax,) = _figure()
    colors = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(fit.budgets)))
    for b, color in zip(fit.budgets, colors):
        n = np.array([o.params for o in b.observations])
        ax.scatter(n, [o.loss for o in b.observations], color=color, s=18)
        grid = np.linspace(np.log10(min(n.min(), b.n_opt)) - 0.1, np.log10(max(n.max(), b.n_opt)) + 0.1, 100)
        ax.plot(10 ** grid, np.polyval(b.parabola, grid), color=color, label=f"C = {b.budget:.2g}")
        if b.extrapolated:  # hollow star: the vertex lies outside the trained sizes
            ax.scatter([b.n_opt], [b.loss_opt], marker="*", s=120, zorder=3, facecolor="none", edgecolor=color)
        else:
            ax.scatter([b.n_opt], [b.loss_opt], marker="*", s=120, zorder=3, color=color, edgecolor="black")
    ax.set(xscale="log", xlabel="parameters N", ylabel=f"final {fit.modality} loss",
           title=f"IsoFLOP curves: {fit.modality}")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def plot_optima(fit: ModalityFit, path: Path) -> None:
    fig, axes = _figure(cols=2)
    compute = np.array([b.budget for b in fit.budgets])
    span = np.geomspace(compute.min() / 2, compute.max() * 2, 50)
    for ax, law, values, name, symbol in (
            (axes[0], fit.params_law, [b.n_opt for b in fit.budgets], "N_opt (parameters)", "a"),
            (axes[1], fit.tokens_law, [b.d_opt for b in fit.budgets], "D_opt (tokens)", "b")):
        used = np.array([b.used_in_fit for b in fit.budgets])
        outside = np.array([b.extrapolated for b in fit.budgets])
        values = np.array(values)
        ax.scatter(compute[~outside], values[~outside], color="black", zorder=3)
        if outside.any():  # hollow: N_opt outside the trained sizes
            ax.scatter(compute[outside], values[outside], facecolor="none", edgecolor="black", zorder=3,
                       label="N_opt outside trained sizes" + (" (in the fit)" if used[outside].all()
                                                              else " (left out of the fit)"))
        ax.plot(span, law(span), label=f"{symbol} = {law.exponent:.3f}{_interval(law)}")
        ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel=name, title=f"{fit.modality}: {name}")
        ax.legend(loc="upper left")  # the optima rise to the right; a fixed place is also fast
    fig.savefig(path, dpi=120)


def write_report(fits: dict[str, ModalityFit], out_dir: str | Path, confidence: float = 0.95,
                 params_kind: str | None = None, tokens_kind: str | None = None) -> list[Path]:
    """Writes scaling_laws.json and two PNGs per modality under ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "scaling_laws.json"]
    written[0].write_text(json.dumps(to_json(fits, confidence, params_kind, tokens_kind), indent=2) + "\n")
    for m, fit in fits.items():
        plot_isoflop_curves(fit, out / f"isoflop_{m}.png")
        plot_optima(fit, out / f"optima_{m}.png")
        written += [out / f"isoflop_{m}.png", out / f"optima_{m}.png"]
    return written
