"""IsoFLOP sweep planning: for each compute budget, model sizes and the steps that spend it.

The family file is a trainer config plus a ``family:`` section (removed from the configs
written for the runs)::

    model: {seq_length: 256, vocab_size: 512, ...}   # the trainer config, as usual
    train: {global_batch_size: 32, ...}
    family:
      widths: [64, 96, 128, 192, 256]   # hidden sizes (or `sizes:`, below)
      aspect_ratio: 32                  # num_layers = round(hidden_size / aspect_ratio), >= 1
      head_dim: 32                      # num_heads = hidden_size / head_dim
      ffn_ratio: 4                      # ffn_hidden_size = ffn_ratio * hidden_size, rounded
      ffn_multiple: 8                   #   up to a multiple of ffn_multiple
      moe:                              # optional: MoE family
        num_experts: 8                  #   one value, or one per width
        expert_ffn_ratio: 0.5           #   moe.ffn_hidden_size = ratio * hidden_size
        shared_expert_ffn_ratio: 0.5    #   moe.shared_expert_ffn_hidden_size (0 = none)
      # sizes: [{hidden_size: 64, num_layers: 2, num_heads: 2, ffn_hidden_size: 256}, ...]
      #   (explicit model-section overrides instead of the rule)
      tokens_per_param: 20              # each budget's grid is centred where D/N is this
      min_steps: 10                     # sizes that would train fewer steps are left out
      packing: {doc_length: null, span_length: 0, spans_per_doc: 0, latent_dim: null}
      # or, for a Transfusion family: packing: {measure: 32} (the default there)

FLOPs per step come from :mod:`megafusion.scaling.flops` on the packing of
``model.seq_length`` positions the runs will train on; steps = budget /
(global_batch_size x FLOPs per sequence), rounded to the nearest whole step. The packing is

- measured (``measure: K``, the default for ``model.kind: transfusion``): the mean over
  the first K packed sequences of the family's own data (``data.kind`` shapes or indexed),
  i.e. its real mix of text tokens, image/frame latents, padding and attention pairs;
  the latent width and the U-Net layout come from the ``vision:`` representation;
- or nominal: documents of ``doc_length``, each ending with ``spans_per_doc`` image spans
  of ``span_length`` latent positions of width ``latent_dim``.

Every run's ``tokens`` (D) counts all positions it trains on, ``tokens_by_modality`` splits
them into text, image, video (latent positions) and padding.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import math
import shlex
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml

from megafusion.scaling.flops import (TEXT, ModelShape, PackingCounts, flop_breakdown_of_counts, nominal_packing,
                                      packing_counts, params)

_FAMILY_KEYS = {"widths", "aspect_ratio", "head_dim", "ffn_ratio", "ffn_multiple", "moe", "sizes",
                "tokens_per_param", "min_steps", "packing"}
_MOE_KEYS = {"num_experts", "expert_ffn_ratio", "shared_expert_ffn_ratio", "top_k"}
_PACKING_KEYS = {"doc_length", "span_length", "spans_per_doc", "latent_dim", "measure"}
_NOMINAL_KEYS = {"doc_length", "span_length", "spans_per_doc"}
_DEFAULT_MEASURE = 32  # sequences, for Transfusion families
MODALITY_NAMES = {0: "text", 1: "image", 2: "video"}  # megafusion.data.sample
# model-section keys a family may set per size (others belong in the shared model section)
_SIZE_KEYS = {"hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size", "moe"}


class PlanError(ValueError):
    """A family file that cannot be planned; the message names the key and the fix."""


@dataclass(frozen=True)
class PlannedRun:
    name: str
    budget: float  # FLOPs to spend
    model: dict  # model-section overrides of this size
    steps: int
    tokens: int  # steps * global_batch_size * seq_length
    params: int  # active non-embedding parameters (the fitter's N)
    params_total: int
    flops: int  # planned training FLOPs: steps * FLOPs per step
    tokens_by_modality: dict = field(default_factory=dict)  # text / image / video / padding positions

    @property
    def flops_per_step(self) -> float:
        return self.flops / self.steps


def _check_keys(section: dict, valid: set[str], where: str) -> None:
    for key in section:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean '{where}.{close[0]}'?" if close else ""
            raise PlanError(f"unknown key '{where}.{key}'.{hint} Valid keys: {', '.join(sorted(valid))}")


def _round_up(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def candidate_sizes(family: dict) -> list[dict]:
    """Model-section overrides of every size the family allows, in the file's order."""
    _check_keys(family, _FAMILY_KEYS, "family")
    if ("sizes" in family) == ("widths" in family):
        raise PlanError("family: give either 'widths' (with the rule keys) or an explicit 'sizes' list, not both "
                        "and not neither")
    if "sizes" in family:
        sizes = family["sizes"]
        if not isinstance(sizes, list) or not sizes:
            raise PlanError("family.sizes must be a non-empty list of model-section mappings")
        for i, size in enumerate(sizes):
            if not isinstance(size, dict):
                raise PlanError(f"family.sizes[{i}] must be a mapping like {{hidden_size: 64, num_layers: 2}}")
            _check_keys(size, _SIZE_KEYS, f"family.sizes[{i}]")
        return [copy.deepcopy(s) for s in sizes]
    widths = family["widths"]
    if not isinstance(widths, list) or not widths:
        raise PlanError("family.widths must be a non-empty list of hidden sizes")
    for key in ("aspect_ratio", "head_dim"):
        if key not in family:
            raise PlanError(f"family.{key} is needed with family.widths (depth and heads follow from the width)")
    moe = family.get("moe") or {}
    _check_keys(moe, _MOE_KEYS, "family.moe")
    experts = moe.get("num_experts", 0)
    if isinstance(experts, list) and len(experts) != len(widths):
        raise PlanError(f"family.moe.num_experts has {len(experts)} values for {len(widths)} widths; give one "
                        "value or one per width")
    out = []
    for i, width in enumerate(widths):
        if width % family["head_dim"]:
            raise PlanError(f"family.widths[{i}] = {width} is not a multiple of family.head_dim = "
                            f"{family['head_dim']}")
        size = {"hidden_size": int(width),
                "num_layers": max(1, round(width / family["aspect_ratio"])),
                "num_heads": int(width // family["head_dim"]),
                "ffn_hidden_size": _round_up(family.get("ffn_ratio", 4) * width, family.get("ffn_multiple", 8))}
        n_experts = experts[i] if isinstance(experts, list) else experts
        if n_experts:
            size["moe"] = {"num_experts": int(n_experts),
                           "ffn_hidden_size": _round_up(moe.get("expert_ffn_ratio", 1) * width,
                                                        family.get("ffn_multiple", 8))}
            if moe.get("shared_expert_ffn_ratio"):
                size["moe"]["shared_expert_ffn_hidden_size"] = _round_up(moe["shared_expert_ffn_ratio"] * width,
                                                                         family.get("ffn_multiple", 8))
            if "top_k" in moe:
                size["moe"]["top_k"] = int(moe["top_k"])
        out.append(size)
    return out


def _merge(base: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict):
            merged[key] = _merge(merged.get(key) or {}, value)
        else:
            merged[key] = value
    return merged


def _budget_name(budget: float) -> str:
    mantissa, exponent = f"{budget:.3g}".split("e") if "e" in f"{budget:.3g}" else (f"{budget:.3g}", "0")
    return f"{mantissa}e{int(exponent)}"


def _run_name(budget: float, size: dict) -> str:
    name = f"c{_budget_name(budget)}_h{size['hidden_size']}_l{size['num_layers']}"
    experts = (size.get("moe") or {}).get("num_experts")
    return name + (f"_e{experts}" if experts else "")


# --------------------------------------------------------------------------- what the runs train on


@dataclass(frozen=True)
class Packing:
    """The packing the runs train on: ``sequences`` sequences of ``model.seq_length`` positions."""

    counts: PackingCounts  # of all the sequences together
    sequences: int
    by_modality: dict  # positions per sequence (means): text, image, video, padding; they sum to seq_length
    source: str  # how it was found, for plan.json

    def training_flops_per_sequence(self, shape: ModelShape) -> float:
        return flop_breakdown_of_counts(shape, self.counts).training / self.sequences

    def to_json(self) -> dict:
        return {"source": self.source, "sequences": self.sequences,
                "per_sequence": {**self.by_modality, "attention_pairs": self.counts.pairs / self.sequences}}


def trainer_config(config: dict):
    """The validated ``megafusion.config.Config`` of a family or run config (``family:`` dropped)."""
    from megafusion.config import ConfigError, load_config

    tree = {k: v for k, v in config.items() if k != "family"}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(tree, f)
        f.flush()
        try:
            return load_config(f.name)
        except ConfigError as err:
            raise PlanError(f"not a valid trainer config: {str(err).replace(f' (in {f.name})', '')}") from None


@functools.lru_cache(maxsize=16)
def _latent_layout(vision_yaml: str, patch_adapter: str) -> tuple[tuple, ...]:
    from megafusion.config import load_config
    from megafusion.model.unet import latent_layout
    from megafusion.vision import representation_from_config

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(vision_yaml)
        f.flush()
        vision = load_config(f.name).vision
    try:
        rep = representation_from_config(vision)
    except (ValueError, OSError) as err:
        raise PlanError(f"vision.representation = {vision.representation!r}: cannot build it to read the latent "
                        f"layout: {err}") from None
    out = {"latent_dim": int(rep.latent_dim), "tokens_per_image": int(rep.tokens_per_image)}
    if patch_adapter == "unet":
        out["unet_layout"] = (*latent_layout(rep), int(rep.tokens_per_image))
    return tuple(out.items())


def latent_layout_of(config: dict) -> dict:
    """``latent_dim`` (and ``unet_layout`` for U-Net adapters) of a Transfusion config, read off
    its ``vision:`` representation as the trainer does; {} for a text model."""
    model = config.get("model") or {}
    if model.get("kind", "text") != "transfusion":
        return {}
    trainer_config(config)  # a clear error for a broken config before anything is built
    vision = yaml.safe_dump({"vision": config.get("vision") or {}}, sort_keys=True)
    return dict(_latent_layout(vision, model.get("patch_adapter", "linear")))


def shape_of_config(config: dict, model_overrides: dict | None = None) -> ModelShape:
    """The ModelShape of a trainer config (its model section, ``model_overrides`` merged in);
    Transfusion models take their latent layout from the representation. Modality-specific
    FFNs and per-modality shared experts count their copies."""
    model = _merge(config.get("model") or {}, model_overrides or {})
    latent = latent_layout_of({**config, "model": model})
    shape = ModelShape.from_model_config({**model, **{k: v for k, v in latent.items() if k != "tokens_per_image"}})
    moe = model.get("moe") or {}
    if latent:
        copies = {"ffn_copies": 2 if model.get("ffn", "dense") == "modality" else 1,
                  "shared_expert_copies": 2 if moe.get("per_modality_shared_experts") else 1}
        shape = ModelShape(**{**asdict(shape), **copies})
    return shape


@functools.lru_cache(maxsize=16)
def _measure(config_yaml: str, sequences: int) -> Packing:
    from megafusion.data.indexed_stream import IndexedStream
    from megafusion.data.shapes_stream import ShapesStream

    cfg = trainer_config(yaml.safe_load(config_yaml))
    if cfg.data.kind not in ("shapes", "indexed"):
        raise PlanError(f"family.packing.measure reads the Transfusion data (data.kind shapes or indexed), not "
                        f"data.kind = {cfg.data.kind!r}")
    try:
        stream = (ShapesStream if cfg.data.kind == "shapes" else IndexedStream).from_config(cfg)
        samples = [stream.sample(i) for i in range(sequences)]
    except (ValueError, OSError) as err:
        raise PlanError(f"family.packing.measure: cannot read the data (data.kind = {cfg.data.kind}): {err}") from None
    stack = {k: np.stack([getattr(x, k).numpy() for x in samples])
             for k in ("doc_ids", "span_ids", "modality", "tokens")}
    counts = packing_counts(stack["doc_ids"], stack["span_ids"], stack["modality"])
    mod = stack["modality"]
    padding = int(((mod == TEXT) & (stack["tokens"] == stream.tokenizer.pad_id)).sum())
    by_modality = {name: float((mod == value).sum()) for value, name in MODALITY_NAMES.items()}
    by_modality["text"] -= padding
    by_modality["padding"] = float(padding)
    return Packing(counts, sequences, {k: v / sequences for k, v in by_modality.items()},
                   f"measured: mean of packed sequences 0..{sequences - 1} of data.kind = {cfg.data.kind}")


def packing_of(config: dict) -> Packing:
    """The packing of a family (its ``family.packing``) or of a run config (measured for a
    Transfusion model, one document filling the sequence for a text model)."""
    model = config.get("model") or {}
    seq = int(model.get("seq_length", 64))
    packing = dict((config.get("family") or {}).get("packing") or {})
    _check_keys(packing, _PACKING_KEYS, "family.packing")
    latent = latent_layout_of(config)
    nominal = _NOMINAL_KEYS & packing.keys()
    measure = packing.get("measure")
    if measure is not None and nominal:
        raise PlanError(f"family.packing: give either measure (sequences of the data to count) or the nominal keys "
                        f"{', '.join(sorted(nominal))}, not both")
    if latent and measure is None and not nominal:
        measure = _DEFAULT_MEASURE
    if measure is not None:
        if not latent:
            raise PlanError("family.packing.measure counts the packing of Transfusion data; a text family "
                            "(model.kind: text) takes the nominal keys doc_length")
        if int(measure) < 1:
            raise PlanError(f"family.packing.measure = {measure} must be at least 1 (sequences)")
        # what the packed data depends on (not the model size, not train.steps)
        key = {k: config.get(k) for k in ("data", "vision") if k in config}
        key["train"] = {"seed": (config.get("train") or {}).get("seed", 1234)}
        key["model"] = {k: model[k] for k in ("kind", "seq_length", "vocab_size") if k in model}
        return _measure(yaml.safe_dump(key, sort_keys=True), int(measure))
    latent_dim = int(packing.get("latent_dim") or 0)
    if latent and latent_dim and latent_dim != latent["latent_dim"]:
        raise PlanError(f"family.packing.latent_dim = {latent_dim} but the vision representation gives latent "
                        f"patches of {latent['latent_dim']} values; drop family.packing.latent_dim")
    try:
        layout = nominal_packing(seq, packing.get("doc_length"), int(packing.get("span_length") or 0),
                                 int(packing.get("spans_per_doc") or 0))
    except ValueError as err:
        raise PlanError(f"family.packing: {err}") from None
    counts = packing_counts(*layout)
    return Packing(counts, 1, {"text": float(counts.text), "image": float(counts.latent), "video": 0.0, "padding": 0.0},
                   "nominal: " + ", ".join(f"{k} = {packing.get(k)}" for k in sorted(_NOMINAL_KEYS)))


def plan_sweep(config: dict, budgets: Sequence[float], sizes: int | None = None) -> list[PlannedRun]:
    """Runs for every budget: the family's sizes that reach ``min_steps``; with ``sizes``,
    the ``sizes`` consecutive ones (by parameter count) centred where D/N is nearest
    ``tokens_per_param``."""
    if "family" not in config or not isinstance(config["family"], dict):
        raise PlanError("the family file has no 'family:' section; add one (see megafusion/scaling/plan.py)")
    family = config["family"]
    if sizes is not None and sizes < 3:
        raise PlanError(f"--sizes {sizes}: an IsoFLOP curve needs at least 3 sizes per budget")
    model, train = config.get("model") or {}, config.get("train") or {}
    seq, batch = int(model.get("seq_length", 64)), int(train.get("global_batch_size", 8))
    packing = packing_of(config)
    nominal_latent = int((family.get("packing") or {}).get("latent_dim") or 0)

    candidates = []
    for size in candidate_sizes(family):
        try:
            shape = shape_of_config(config, size)
            if nominal_latent and not shape.latent_dim:  # a nominal latent width for a non-Transfusion family
                shape = ModelShape(**{**asdict(shape), "latent_dim": nominal_latent})
            per_step = batch * packing.training_flops_per_sequence(shape)
        except ValueError as err:
            raise PlanError(f"family size {size}: {err}") from None
        count = params(shape)
        candidates.append((count.active_non_embedding, count.total, per_step, size))
    candidates.sort(key=lambda c: c[0])

    tokens_per_param = float(family.get("tokens_per_param", 20))
    min_steps = int(family.get("min_steps", 1))
    runs = []
    for budget in budgets:
        feasible = [c for c in candidates if round(budget / c[2]) >= min_steps]
        if len(feasible) < 3:
            raise PlanError(f"budget {budget:.3g} FLOPs: only {len(feasible)} of {len(candidates)} family sizes train "
                            f"at least family.min_steps = {min_steps} steps; raise the budget or add smaller widths")
        if sizes is not None and sizes < len(feasible):
            ratio = [abs(math.log(budget / c[2] * batch * seq / max(c[0], 1) / tokens_per_param)) for c in feasible]
            best = ratio.index(min(ratio))
            start = min(max(best - sizes // 2, 0), len(feasible) - sizes)
            feasible = feasible[start:start + sizes]
        for n, total, per_step, size in feasible:
            steps = max(1, round(budget / per_step))
            runs.append(PlannedRun(name=_run_name(budget, size), budget=float(budget), model=size, steps=steps,
                                   tokens=steps * batch * seq, params=n, params_total=total,
                                   flops=int(steps * per_step),
                                   tokens_by_modality={k: round(steps * batch * v)
                                                       for k, v in packing.by_modality.items()}))
    names = [r.name for r in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PlanError(f"two family sizes share the run name(s) {', '.join(duplicates)}; make the sizes distinct")
    return runs


def run_config(config: dict, run: PlannedRun) -> dict:
    """The trainer config of one run: the family section gone, the size and steps set."""
    out = copy.deepcopy({k: v for k, v in config.items() if k != "family"})
    model = _merge(out.get("model") or {}, run.model)
    model.setdefault("seq_length", int((config.get("model") or {}).get("seq_length", 64)))
    out["model"] = model
    train = dict(out.get("train") or {})
    train.setdefault("global_batch_size", int((config.get("train") or {}).get("global_batch_size", 8)))
    train["steps"] = run.steps
    out["train"] = train
    return out


def _command(config: str, run_dir: str, gpus: int) -> str:
    args = f"--config {shlex.quote(config)} --run-dir {shlex.quote(run_dir)}"
    if gpus > 1:
        return f"torchrun --standalone --nproc_per_node {gpus} -m megafusion.train {args}"
    return f"megafusion train {args}"


def write_plan(config: dict, runs: list[PlannedRun], out_dir: str | Path, launcher: str = "local",
               gpus_per_run: int = 1, source: str | None = None) -> list[Path]:
    """Writes configs/<run>.yaml, plan.json and launch.sh (local) or launch.sbatch (SLURM
    array, one task per run). Run dirs will be runs/<run>; paths are relative to ``out_dir``."""
    if launcher not in ("local", "slurm"):
        raise PlanError(f"launcher {launcher!r} is not one of local, slurm")
    out = Path(out_dir).resolve()
    (out / "configs").mkdir(parents=True, exist_ok=True)
    written = []
    for run in runs:
        path = out / "configs" / f"{run.name}.yaml"
        path.write_text(yaml.safe_dump(run_config(config, run), sort_keys=False))
        written.append(path)
    manifest = {"source": source, "launcher": launcher, "gpus_per_run": gpus_per_run,
                "budgets": sorted({r.budget for r in runs}),
                "packing": packing_of(config).to_json(),
                "runs": [{**asdict(r), "config": f"configs/{r.name}.yaml", "run_dir": f"runs/{r.name}"}
                         for r in runs]}
    (out / "plan.json").write_text(json.dumps(manifest, indent=2) + "\n")
    written.append(out / "plan.json")
    commands = [_command(f"configs/{r.name}.yaml", f"runs/{r.name}", gpus_per_run) for r in runs]
    if launcher == "local":
        lines = ["#!/usr/bin/env bash", "# IsoFLOP sweep, one run after the other (megafusion isoflop plan).",
                 'cd "$(dirname "$0")"']
        lines += [f'{c} || echo "run {r.name} failed" >&2' for c, r in zip(commands, runs)]
        path = out / "launch.sh"
    else:
        (out / "logs").mkdir(exist_ok=True)
        lines = ["#!/usr/bin/env bash", "# IsoFLOP sweep as a SLURM array: sbatch launch.sbatch",
                 "#SBATCH --job-name=isoflop", f"#SBATCH --array=0-{len(runs) - 1}", "#SBATCH --nodes=1",
                 f"#SBATCH --gpus-per-node={gpus_per_run}", f"#SBATCH --output={out}/logs/%x_%A_%a.out",
                 f"cd {shlex.quote(str(out))}", "COMMANDS=("]
        lines += [f"  {shlex.quote(c)}" for c in commands]
        lines += [")", 'eval "${COMMANDS[$SLURM_ARRAY_TASK_ID]}"']
        path = out / "launch.sbatch"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    written.append(path)
    return written
