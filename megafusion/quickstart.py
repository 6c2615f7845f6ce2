"""``megafusion quickstart``: the whole pipeline on ShapesWorld, on a CPU, in minutes.

    megafusion quickstart --out runs/quickstart          # < 10 min on 2 CPU cores
    megafusion quickstart --out runs/qs --quick          # a smoke version (CI)
    megafusion quickstart --out runs/qs --full           # the paper's comparisons: ~1 h 50 min on 2 CPU cores
    megafusion quickstart --out runs/qs --compare moe    # the default run plus one comparison

Stages (each prints its progress; artifacts land under ``--out``):

1. ``data/raw/``: a ShapesWorld dataset as files (text, image-caption pairs, VQA
   documents, videos, action-conditioned videos), in the formats the preprocessing tool
   reads. The quickstart's world is the simple one (``WorldConfig.simple()``: 3 colours,
   3 shapes, 1-2 large shapes on a 2x2 grid, an agent moving one patch per action), so
   that a model trained for minutes on a CPU does measurably well; ``--world full`` uses
   the whole world.
2. ``data/tokenizer.model``: a sentencepiece tokenizer with megafusion's special tokens.
3. ``data/indexed/``: indexed datasets made by the preprocessing tool (pixel latents).
4. ``run/``: a tiny Transfusion model trained on them with ``megafusion train``'s trainer,
   configured by the recipe ``megafusion/configs/quickstart.yaml`` (also
   ``examples/configs/quickstart.yaml``) plus the run's data, steps and device.
5. ``eval/``: the exact ShapesWorld evaluations of that model, then ``report.md`` with
   loss curves per modality, a sample grid and the evaluation table (each figure next to
   its chance level).

Trends (``--full`` runs all, ``--compare a,b`` some): each variant is trained on the same
data and evaluated the same way under ``trends/TREND/VARIANT/``, and the report gets one
table per trend: ``synergy`` (multimodal against image-caption + VQA data only, at equal
image documents), ``moe`` (dense against MoE with per-modality shared experts, plus the
experts' routing shares per modality and their specialization), ``latents`` (pixel
patches against an RAE: ``--rae DIR``, or one built under ``rae/`` from an encoder
pretrained on ShapesWorld, see :mod:`megafusion.vision.shapes_encoder`; needs
``transformers``, the ``rae`` extra), and ``world`` (not in ``--full``: world modeling with
action-conditioned video at 0.5%, 1%, 5% and 20% of the training positions).

``--seeds 0,1,2`` runs the whole quickstart at each seed under ``OUT/seedS`` and summarises
them in ``OUT/seeds.md`` (:mod:`megafusion.quickstart_seeds`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megafusion.config import Config
    from megafusion.eval.cli import EvalOptions

# The training recipe: a config file shipped in the package (examples/configs/quickstart.yaml
# links to it), so that an installed megafusion finds it without the repository.
RECIPE = "configs/quickstart.yaml"


@dataclass(frozen=True)
class Scale:
    """How big each stage is."""

    n_text: int
    n_image: int
    n_video: int
    n_action: int
    steps: int
    eval_n: int  # items per evaluation (planning: planning_n, generation: generation_n)
    eval_ode_steps: int  # ODE steps per generated image / frame
    planning_candidates: int
    planning_n: int  # planning tasks (each rolls out every candidate: the slowest evaluation)
    # Prompts of the generation evaluation: its strict correctness has a chance level near
    # 0.006, so it needs more items than the others to tell a correct image from luck.
    generation_n: int
    # The RAE of the latents comparison (built when no --rae is given): encoder pretraining
    # and decoder training steps.
    rae_encoder_steps: int = 500
    rae_decoder_steps: int = 3000


SCALES = {
    "quick": Scale(n_text=60, n_image=60, n_video=6, n_action=6, steps=6, eval_n=4, eval_ode_steps=4,
                   planning_candidates=2, planning_n=4, generation_n=4, rae_encoder_steps=10, rae_decoder_steps=10),
    "default": Scale(n_text=4000, n_image=8000, n_video=1000, n_action=2000, steps=2600, eval_n=48,
                     eval_ode_steps=10, planning_candidates=4, planning_n=24, generation_n=192),
    # 10 ODE steps at full scale too: 20 drew no more correct images and take twice the time.
    "full": Scale(n_text=8000, n_image=16000, n_video=2000, n_action=4000, steps=8000, eval_n=64,
                  eval_ode_steps=10, planning_candidates=8, planning_n=64, generation_n=256),
}
IMAGE_SIZE, PATCH_SIZE = 32, 8
# Sampling at evaluation. The run's training shifts (10 for images, 30 for frames) put too
# few of the 10 ODE steps near pure noise, where this tiny model decides which cell a shape
# fills and where the agent goes; guidance made shapes of two colours. Guidance off and both
# shifts at 100 scored better on every evaluation and take half the time (no unconditional
# pass). Measurements: docs/results.md.
EVAL_CFG = 1.0  # classifier-free guidance scale of generated images and frames
EVAL_SHIFT = 100.0  # time shift of the ODE grid of images and of frames
# indexed dataset name -> (raw file key of write_dataset, preprocessing kind, extra arguments)
DATASETS = {
    "text": ("text", "text", []),
    "image_text": ("image_text", "image-text", ["--image-first", "0.2"]),  # some image-first: captioning data
    "vqa": ("vqa_docs", "image-text", ["--image-first", "1.0"]),  # image, then its questions and answers
    "video": ("video", "video", []),
    "action_video": ("action_video", "action-video", []),
}
# Mixture weights of the datasets above (documents drawn per source; the recipe's data.weights).
# Image-caption data weighed most: captioning, VQA and planning all read images. Action video
# at 1.0: at 0.5 the agent hardly moved in predicted frames, at 2.0 generated images got
# worse. Measurements: docs/results.md.
DATA_WEIGHTS = {"text": 0.5, "image_text": 4.0, "vqa": 1.0, "video": 0.3, "action_video": 1.0}


def world_config(world: str, seed: int, holdout: str = "compositions"):
    """The ShapesWorld the quickstart draws: short clips so that documents fit 256 positions, and
    (``holdout="compositions"``) none of the world's held-out compositions, which the evaluation
    scores as its unseen split."""
    from megafusion.data.shapes import WorldConfig

    clips = dict(seed=seed, image_size=IMAGE_SIZE, video_frames=4, action_frames=6, context_frames=2,
                 holdout=holdout)
    return WorldConfig.simple(**clips) if world == "simple" else WorldConfig(**clips)


def _stage(number: int, title: str) -> float:
    print(f"\n[quickstart {number}/5] {title}", flush=True)
    return time.time()


def _done(started: float) -> None:
    print(f"[quickstart] ... done in {time.time() - started:.1f}s", flush=True)


def prepare_data(out: Path, scale: Scale, seed: int, world: str = "simple",
                 holdout: str = "compositions") -> tuple[Path, dict[str, Path]]:
    """Stages 1-3: ShapesWorld files -> tokenizer -> indexed datasets.
    Returns (tokenizer, {dataset name: indexed prefix}); the world's manifest is data/raw/manifest.json."""
    from megafusion.data.shapes import ACTIONS
    from megafusion.data.shapes.export import write_dataset
    from megafusion.data.tokenizer import train_tokenizer

    started = _stage(1, f"ShapesWorld data ({world} world) -> {out / 'data/raw'}")
    config = world_config(world, seed, holdout)
    raw = write_dataset(out / "data" / "raw", n_text=scale.n_text, n_image=scale.n_image, n_video=scale.n_video,
                        n_action=scale.n_action, config=config)
    _done(started)

    started = _stage(2, "sentencepiece tokenizer")
    corpus = out / "data" / "tokenizer_corpus.txt"
    lines = []
    for kind in ("text", "image_text", "vqa_docs", "video", "action_video"):
        lines += [json.loads(line)["text"] for line in raw[kind].read_text().splitlines() if line.strip()]
    corpus.write_text("\n".join(lines) + "\n")
    tokenizer = train_tokenizer([corpus], out / "data" / "tokenizer", vocab_size=512, actions=list(ACTIONS),
                                extra_options={"hard_vocab_limit": False})
    _done(started)

    started = _stage(3, "preprocess to indexed datasets (tools/preprocess_data.py)")
    prefixes = preprocess_datasets(out, tokenizer, config.context_frames, DATASETS)
    _done(started)
    return tokenizer, prefixes


def preprocess_datasets(out: Path, tokenizer: Path, context_frames: int, datasets: dict, folder: str = "indexed",
                        encoder_args: tuple[str, ...] = ()) -> dict[str, Path]:
    """Runs the preprocessing tool on ``out/data/raw`` files into ``out/data/FOLDER``; returns the prefixes."""
    from megafusion.data import preprocess

    raw = out / "data" / "raw"
    prefixes = {}
    for name, (key, kind, extra) in datasets.items():
        prefix = out / "data" / folder / name
        source = raw / f"{key}.jsonl"
        args = ["--input", str(source), "--output-prefix", str(prefix), "--kind", kind,
                "--tokenizer-model", str(tokenizer), "--image-size", str(IMAGE_SIZE), "--patch-size", str(PATCH_SIZE),
                "--append-eod", "--context-frames", str(context_frames), "--no-progress", *extra, *encoder_args]
        if preprocess.main(args) != 0:
            raise RuntimeError(f"preprocessing {source} failed; see the message above")
        prefixes[name] = Path(f"{prefix}_text_document") if kind == "text" else prefix
    return prefixes


def preprocess_visual(out: Path, tokenizer: Path, encoder_args: list[str], folder: str,
                      prefixes: dict[str, Path]) -> dict[str, Path]:
    """The datasets again with another visual encoder (e.g. an RAE); text data is shared."""
    started = _stage(3, f"preprocess images and videos with {' '.join(encoder_args)} -> {out / 'data' / folder}")
    manifest = json.loads((out / "data" / "raw" / "manifest.json").read_text())
    visual = {k: v for k, v in DATASETS.items() if v[1] != "text"}
    redone = preprocess_datasets(out, tokenizer, manifest["config"]["context_frames"], visual, folder,
                                 tuple(encoder_args))
    _done(started)
    return {name: redone.get(name, prefix) for name, prefix in prefixes.items()}


def build_rae(out: Path, scale: Scale, world: str, seed: int, device: str) -> Path:
    """The RAE of the latents comparison when no ``--rae`` is given (nothing can be downloaded):
    a ViT encoder pretrained on ShapesWorld labels (:mod:`megafusion.vision.shapes_encoder`,
    on scenes of another seed than the data's), frozen, and a ViT decoder trained on the
    quickstart's images with ``megafusion train-decoder``. Returns the representation dir."""
    from megafusion.parallel.setup import resolve_device
    from megafusion.vision.shapes_encoder import pretrain_shapes_encoder
    from megafusion.vision.train_decoder import DecoderTrainConfig, train_decoder

    started = _stage(3, f"RAE: pretrain a ShapesWorld encoder, train its decoder -> {out / 'rae'}")
    encoder = out / "rae" / "encoder"
    pretrain_shapes_encoder(world_config(world, seed + 1000), encoder, steps=scale.rae_encoder_steps,
                            device=resolve_device(device), log_every=max(scale.rae_encoder_steps // 5, 1))
    run = out / "rae" / "decoder"
    steps = scale.rae_decoder_steps
    # A 4-layer decoder, 128 wide, and noise augmentation tau 0.2 (the RAE paper's 0.8 is for
    # 768-wide DINOv2 features); 3000 steps make reconstructions the detector parses exactly
    # (docs/results.md).
    cfg = DecoderTrainConfig(
        encoder_path=str(encoder), data=str(out / "data" / "raw" / "images"), run_dir=str(run), image_size=IMAGE_SIZE,
        decoder_hidden_size=128, decoder_depth=4, decoder_heads=4, steps=steps, batch_size=32, lr=1e-3,
        noise_tau=0.2, heldout_images=min(64, scale.n_image // 4), eval_every=max(steps // 4, 1),
        log_every=max(steps // 10, 1), image_every=steps, checkpoint_every=steps, device=device)
    cfg.validate()
    train_decoder(cfg)
    _done(started)
    return run / "representation"


def rae_summary(out: Path) -> list[str]:
    """Report lines on the RAE the quickstart built (encoder accuracy, decoder PSNR), if it did."""
    pretraining, decoder = out / "rae" / "encoder" / "pretraining.json", out / "rae" / "decoder" / "result.json"
    if not (pretraining.is_file() and decoder.is_file()):
        return []
    p, d = json.loads(pretraining.read_text()), json.loads(decoder.read_text())
    return ["", f"The RAE was built here: a ViT encoder pretrained for {p['steps']} steps to name the colour, shape "
                f"and size in each patch's cell (held-out patches all right: {p['after']['patch_accuracy']:.3f}, "
                f"always the most frequent label {p['chance']['patch_accuracy']:.3f}), frozen, and a ViT decoder "
                f"trained for {d['steps']} steps (held-out PSNR {d['heldout_psnr_final']:.1f} dB)."]


def recipe_tree() -> dict:
    """The quickstart's training recipe (``megafusion/configs/quickstart.yaml``) as a mapping."""
    from importlib.resources import as_file, files

    from megafusion.settings import read_yaml

    with as_file(files("megafusion") / RECIPE) as path:
        return read_yaml(path)


def run_overrides(tokenizer: Path, prefixes: dict[str, Path], steps: int, device: str,
                  data_weights: dict[str, float] | None = None) -> list[str]:
    """The recipe's per-run keys as ``--set`` overrides: the prepared data, its tokenizer and
    sizes, the number of steps and the device."""
    from megafusion.data.tokenizer import Tokenizer
    from megafusion.settings import yaml_value

    data_weights = data_weights or DATA_WEIGHTS
    vocab = -(-Tokenizer(tokenizer).vocab_size // 64) * 64  # padded: divisible by any small TP
    return [
        f"model.vocab_size={vocab}",
        f"data.paths={yaml_value([str(p) for p in prefixes.values()])}",
        f"data.weights={yaml_value([float(data_weights[name]) for name in prefixes])}",
        f"data.tokenizer={yaml_value(str(tokenizer))}",
        f"vision.image_size={IMAGE_SIZE}",
        f"vision.patch_size={PATCH_SIZE}",
        f"train.steps={steps}",
        f"train.device={device}",
        f"checkpoint.every={max(steps // 2, 1)}",
    ]


def train_overrides(tokenizer: Path, prefixes: dict[str, Path], steps: int, device: str,
                    data_weights: dict[str, float] | None = None) -> list[str]:
    """The quickstart's whole training config as ``--set`` overrides (recipe, then per-run keys):
    ``load_config(None, train_overrides(...))`` is :func:`training_config`'s config."""
    from megafusion.config import Config
    from megafusion.settings import as_overrides

    return as_overrides(recipe_tree(), Config) + run_overrides(tokenizer, prefixes, steps, device, data_weights)


def training_config(tokenizer: Path, prefixes: dict[str, Path], steps: int, device: str,
                    data_weights: dict[str, float] | None = None,
                    overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config a quickstart run trains with: the recipe file, its per-run keys, then ``overrides``."""
    from importlib.resources import as_file, files

    from megafusion.config import load_config

    with as_file(files("megafusion") / RECIPE) as path:
        return load_config(path, run_overrides(tokenizer, prefixes, steps, device, data_weights) + list(overrides))


def secondary_metrics(name: str, result: dict) -> list[tuple[str, float, str, str]]:
    """Finer figures of an evaluation for the report: (label, value, baseline text, better)."""
    chance = result.get("chance")
    if name == "generation":
        return [(f"{k}: {what}", result[k], f"{chance[k]:.4g}", "higher") for k, what in
                (("objects", "each asked colour+shape drawn"), ("positions", "... in its cell"),
                 ("count", "as many shapes as asked"))]
    if name == "captioning":
        return [(f"{k} of the object named at each true position", result[k], f"{chance[k]:.4g}", "higher")
                for k in ("color", "shape")] + [("count", result["count"], f"{chance['count']:.4g}", "higher")]
    if name == "vqa":
        rows = [("accuracy vs always the most frequent answer", result["accuracy"],
                 f"{result['majority']:.4g} (majority)", "higher")]
        return rows + [(f"{kind} questions ({r['n']})", r["accuracy"], f"{r['chance']:.4g}", "higher")
                       for kind, r in result["per_kind"].items()]
    if name == "world_model":
        r, p = result["rollout"], result["agent_positions"]
        return [("agent position vs assuming it stays", p["accuracy"], f"{p['copy_last']:.4g} (copy last)", "higher"),
                ("rollout MSE", r["rollout_mse"], f"{r.get('chance_mse', float('nan')):.4g}; copy last "
                 f"{r['copy_last_mse']:.4g}", "lower")]
    return []


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def _cell_name(row: int, col: int, held: dict) -> str:
    """The name of a cell ("top left") of the world's grid (``held["grid"]``)."""
    from megafusion.data.shapes.scene import position_name

    return position_name(row, col, held["grid"])


def evaluation_table(metrics: dict) -> list[str]:
    """The report's evaluation section: a sentence on sampling and the splits, and one row per
    figure with the seen split's value, the unseen split's (where the data held compositions
    out) and their chance levels."""
    st = metrics["settings"]
    unseen = "unseen" in st.get("splits", ())
    lines = [f"Images and frames sampled with {st['steps']} {st['sampler']} ODE steps, guidance "
             f"{st['cfg_scale']:g}, time shift {st['image_shift']:g} (images) / {st['frame_shift']:g} (frames)."]
    if unseen:
        held = st["heldout_compositions"]
        lines += ["", "Two splits, from another seed than the training data. *Seen*: scenes and episodes of the "
                      "training distribution (their content occurs in training). *Unseen*: each holds a composition "
                      "that no training sample held (colour x shape pairs "
                      + ", ".join(" ".join(c) for c in held["color_shape"]) + "; shapes in cells "
                      + ", ".join(f"a {s} in the {_cell_name(r, c, held)} cell" for s, r, c in held["placement"])
                      + "; kinds together "
                      + ", ".join(" + ".join(" ".join(k) for k in p) for p in held["object_pair"])
                      + "; agent start cells (col, row) "
                      + ", ".join(f"({c}, {r})" for c, r in held["start_cell"]) + ")."]
        lines += ["", "| evaluation | metric | seen | unseen | chance (seen / unseen) | better |",
                  "|---|---|---|---|---|---|"]
    else:
        lines += ["", "| evaluation | metric | value | chance | better |", "|---|---|---|---|---|"]
    for name, result in metrics["results"].items():
        head = metrics["headlines"].get(name)
        if head:
            better = "higher" if head.get("higher_is_better", True) else "lower"
            if not unseen:
                lines.append(f"| {name} | {head['metric']} | {head['value']:.4g} | {head['chance']:.4g} | {better} |")
                lines += [f"| | {label} | {value:.4g} | {base} | {better} |"
                          for label, value, base, better in secondary_metrics(name, result)]
                continue
            lines.append(f"| {name} | {head['metric']} | {head['value']:.4g} | {_fmt(head.get('value_unseen'))} | "
                         f"{_fmt(head['chance'])} / {_fmt(head.get('chance_unseen'))} | {better} |")
            other = result.get("unseen")
            key = lambda label: label.split(" (")[0]  # noqa: E731  (VQA rows name their question counts)
            rows_unseen = ({key(r[0]): r for r in secondary_metrics(name, other)}
                           if isinstance(other, dict) and "skipped" not in other else {})
            for label, value, base, better in secondary_metrics(name, result):
                u = rows_unseen.get(key(label))
                lines.append(f"| | {label} | {value:.4g} | {_fmt(u[1] if u else None)} | {base} / "
                             f"{u[2] if u else '-'} | {better} |")
        elif "skipped" in result:
            lines.append(f"| {name} | skipped: {result['skipped']} | | | |" + (" |" if unseen else ""))
    per_kind = [f"{name} " + ", ".join(f"{kind.replace('_', ' ')} {r['value']:.3g} (n {r['n']}, chance "
                                       f"{_fmt(r['chance'])})" for kind, r in result["unseen"]["by_composition"].items())
                for name, result in metrics["results"].items()
                if isinstance(result.get("unseen"), dict) and result["unseen"].get("by_composition")]
    if per_kind:
        lines += ["", "Unseen, by the kind of held-out composition the items were drawn for: " + "; ".join(per_kind)
                  + "."]
    return lines


def write_report(out: Path, run_dir: Path, eval_dir: Path | None, trends: dict | None = None) -> Path:
    """``report.md`` with loss curves per modality, sample grids and the evaluation table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "loss_text", "loss_image", "loss_video"):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("training losses per modality")
    fig.tight_layout()
    curves = out / "loss_curves.png"
    fig.savefig(curves, dpi=120)
    plt.close(fig)

    first, last = records[0], records[-1]
    lines = ["# megafusion quickstart report", "",
             f"Run directory: `{run_dir}` ({last['step']} steps).", "",
             "## Training", "", "![loss curves](loss_curves.png)", "",
             "| loss | first step | last step |", "|---|---|---|"]
    for key in ("loss_text", "loss_image", "loss_video"):
        if key in first and key in last:
            lines.append(f"| {key} | {first[key]:.4f} | {last[key]:.4f} |")
    if eval_dir is not None and (eval_dir / "metrics.json").is_file():
        metrics = json.loads((eval_dir / "metrics.json").read_text())
        lines += ["", "## Evaluation (ShapesWorld, exact)", ""] + evaluation_table(metrics)
        for grid in sorted(eval_dir.glob("*.png")):
            lines += ["", f"![{grid.stem}]({grid.relative_to(out)})"]
    if trends:
        lines += trends_section(out, trends)
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


# --------------------------------------------------------------------------- trends
@dataclass(frozen=True)
class Variant:
    """One run of a comparison: training overrides on the shared data, its own data weights
    (None: DATA_WEIGHTS) and a share of the main run's steps."""

    name: str
    overrides: tuple[str, ...] = ()
    weights: dict | None = None
    step_fraction: float = 1.0
    # The action-video share of training positions (0.01: 1%); its data weight is computed from
    # the prepared datasets' document lengths (:func:`weights_for_action_share`).
    action_share: float | None = None

    def steps(self, main_steps: int) -> int:
        """Training steps of this variant when the main run trains ``main_steps``."""
        return max(1, round(main_steps * self.step_fraction))

    @property
    def is_main(self) -> bool:
        """Whether this variant is the main run (trained once, reused by every comparison)."""
        return not self.overrides and self.weights is None and self.step_fraction == 1.0 and self.action_share is None


def _image_only_weights() -> tuple[dict, float]:
    """Image-caption and VQA data only, and the share of steps that sees as many of them as
    the multimodal run (documents are drawn by weight)."""
    image = {k: (w if k in ("image_text", "vqa") else 0.0) for k, w in DATA_WEIGHTS.items()}
    return image, sum(image.values()) / sum(DATA_WEIGHTS.values())


def mean_positions(prefix: Path, limit: int = 512) -> float:
    """Mean positions per document (text tokens, and 2 + latents per image or frame) over up to
    ``limit`` evenly spaced documents of an indexed dataset."""
    import numpy as np

    from megafusion.data.indexed import IndexedDocuments
    from megafusion.data.packing import document_length

    docs = IndexedDocuments(prefix)
    picks = np.unique(np.linspace(0, len(docs) - 1, min(limit, len(docs))).astype(int))
    return float(np.mean([document_length(docs[int(i)]) for i in picks]))


def action_share(weights: dict[str, float], lengths: dict[str, float]) -> float:
    """The action-video share of training positions when documents are drawn by ``weights``
    (documents per source) and a source's document holds ``lengths[source]`` positions."""
    total = sum(weights[k] * lengths[k] for k in lengths)
    return weights["action_video"] * lengths["action_video"] / total


def weights_for_action_share(share: float, lengths: dict[str, float]) -> dict[str, float]:
    """DATA_WEIGHTS with the action-video weight set so that action videos fill ``share`` of the
    training positions (0 < share < 1); the other sources keep their relative weights."""
    if not 0 < share < 1:
        raise ValueError(f"action-video share {share} must lie strictly between 0 and 1")
    others = sum(w * lengths[k] for k, w in DATA_WEIGHTS.items() if k != "action_video")
    return {**DATA_WEIGHTS, "action_video": share * others / ((1 - share) * lengths["action_video"])}


# The world-modeling comparison's action-video shares of training positions: the study finds
# world modeling saturates near 1% of in-domain data.
ACTION_SHARES = (0.005, 0.01, 0.05, 0.20)
MOE = ("model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_hidden_size=64",
       "model.moe.shared_expert_ffn_hidden_size=64", "model.moe.per_modality_shared_experts=true")
TRENDS = {
    "synergy": ("Multimodal synergy: the same image-caption and VQA documents, with and without text-only, "
                "video and action-video data around them (the image-only run takes fewer steps so that it "
                "sees as many image documents).",
                lambda rae: [Variant("multimodal"), Variant("image_only", (), *_image_only_weights())]),
    # The dense variant is the main run. Both need additive time conditioning (the quickstart's):
    # MoE layers do not run with AdaLN yet (megatron's router views the AdaLN norm's
    # non-contiguous output and fails).
    "moe": ("MoE: a dense FFN (the main run) against 4 experts (top-2) with per-modality shared experts; "
            "routing statistics per modality show whether experts specialise.",
            lambda rae: [Variant("dense"), Variant("moe", MOE)]),
    "latents": ("Visual latents: raw pixel patches against an RAE (frozen encoder + trained decoder: "
                "`--rae DIR` from `megafusion train-decoder`, or one the quickstart builds).",
                lambda rae: [Variant("pixel"), Variant("rae", ("vision.representation=rae", f"vision.path={rae}"))]),
    "world": ("World modeling against the amount of action-conditioned video: the action-video share of training "
              "positions at 0.5%, 1%, 5% and 20% (the main run's share in the first row), the other sources in "
              "their usual proportions, the same steps.",
              lambda rae: [Variant("main"), *(Variant(f"action_{100 * s:g}pct", action_share=s) for s in ACTION_SHARES)]),
}
# What --full runs: the research's comparisons (world adds four runs; ask for it with --compare world).
FULL_TRENDS = ("synergy", "moe", "latents")


def train_and_evaluate(out: Path, tokenizer: Path, prefixes: dict[str, Path], steps: int, scale: Scale, args,
                       overrides: tuple[str, ...] = (), weights: dict | None = None, stage: str = "") -> Path | None:
    """Trains a run under ``out/run`` and evaluates it under ``out/eval``; returns the eval dir (None on failure)."""
    from megafusion.config import validate
    from megafusion.eval.cli import EvalError, evaluate_run
    from megafusion.logging_setup import megatron_warnings
    from megafusion.parallel import cpu_compat
    from megafusion.parallel.setup import resolve_device
    from megafusion.training.loop import train

    started = _stage(4, f"{stage}train a tiny Transfusion model for {steps} steps -> {out / 'run'}")
    cfg = training_config(tokenizer, prefixes, steps, args.device, weights, [*args.overrides, *overrides])
    validate(cfg, world_size=1)
    run_dir = out / "run"
    with cpu_compat.applied(resolve_device(cfg.train.device)), megatron_warnings() as noise:  # the layer: main's,
        train(cfg, run_dir, started=noise.summarize)                                # unless --set changed the device
    _done(started)
    started = _stage(5, f"{stage}evaluate -> {out / 'eval'}")
    eval_dir = out / "eval"
    try:
        evaluate_run(eval_options(run_dir, eval_dir, scale, args))
    except EvalError as err:
        print(f"megafusion eval: {err}", file=sys.stderr)
        print("[quickstart] evaluation failed; the report has the training part only", file=sys.stderr)
        eval_dir = None
    _done(started)
    return eval_dir


def eval_options(run_dir: Path, eval_dir: Path, scale: Scale, args) -> EvalOptions:
    """How the quickstart evaluates a run: the scale's sizes, its sampling (``--cfg``, ``--shift``,
    ``--frame-shift``) and the world its data was drawn from."""
    from megafusion.eval.cli import EvalOptions

    return EvalOptions(run_dir=str(run_dir), out=str(eval_dir), n=scale.eval_n, steps=scale.eval_ode_steps,
                       planning_candidates=scale.planning_candidates, planning_n=scale.planning_n,
                       generation_n=scale.generation_n, cfg=args.cfg, shift=args.shift,
                       frame_shift=args.frame_shift, world=str(args.manifest))


def run_trends(out: Path, names: list[str], tokenizer: Path, prefixes: dict[str, Path], steps: int, scale: Scale,
               args, main_eval: Path | None, rae_prefixes: dict[str, Path] | None = None) -> dict:
    """Trains and evaluates every variant of the named comparisons under ``out/trends/NAME/VARIANT``.
    A variant equal to the main run (no overrides, default weights, all steps) reuses it.
    Returns {trend: {variant: {"run": dir, "eval": dir or None, "steps": n}}}."""
    results = {}
    lengths = None
    for name in names:
        _, variants = TRENDS[name]
        results[name] = {}
        for v in variants(args.rae):
            n = v.steps(steps)
            weights = v.weights
            extra = {}
            if name == "world":
                lengths = lengths or {k: mean_positions(p) for k, p in prefixes.items()}
                if v.action_share is not None:
                    weights = weights_for_action_share(v.action_share, lengths)
                extra["action_share"] = action_share(weights or DATA_WEIGHTS, lengths)
            where = variant_dir(out, name, v)
            if v.is_main:
                results[name][v.name] = {"run": out / "run", "eval": main_eval, "steps": n, **extra}
                continue
            data = rae_prefixes if v.name == "rae" else prefixes
            eval_dir = train_and_evaluate(where, tokenizer, data, n, scale, args, v.overrides, weights,
                                          stage=f"trend {name}/{v.name}: ")
            results[name][v.name] = {"run": where / "run", "eval": eval_dir, "steps": n, **extra}
    return results


def variant_dir(out: Path, trend: str, variant: Variant) -> Path:
    """Where a comparison's variant is trained (``run/``) and evaluated (``eval/``): the main
    run's folder ``out`` for the main run, ``out/trends/TREND/VARIANT`` otherwise."""
    return out if variant.is_main else out / "trends" / trend / variant.name


def _headlines(eval_dir: Path | None) -> dict:
    if eval_dir is None or not (eval_dir / "metrics.json").is_file():
        return {}
    return json.loads((eval_dir / "metrics.json").read_text())["headlines"]


def _last_records(run_dir: Path, fraction: float = 0.2) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return records[-max(1, int(len(records) * fraction)):]


def routing_table(run_dir: Path) -> tuple[list[str], dict[int, dict[str, list[float]]]]:
    """Markdown rows of the MoE routing statistics (means over the last 20% of logged steps)
    and, per layer, each modality's share of tokens per expert."""
    tail = _last_records(run_dir)
    mean = lambda key: sum(r[key] for r in tail if key in r) / max(1, sum(key in r for r in tail))  # noqa: E731
    layers = sorted({int(k.split("/")[1][5:]) for r in tail for k in r if k.startswith("moe/layer")})
    rows = ["| layer | specialization | modality NMI | text tokens per expert | vision tokens per expert |",
            "|---|---|---|---|---|"]
    shares: dict[int, dict[str, list[float]]] = {}
    for layer in layers:
        key = f"moe/layer{layer}"
        experts = sorted({int(k.rsplit("expert", 1)[1]) for r in tail for k in r
                          if k.startswith(f"{key}/frac_text_tokens_expert")})
        shares[layer] = {m: [mean(f"{key}/frac_{m}_tokens_expert{e}") for e in experts] for m in ("text", "vision")}
        rows.append(f"| {layer} | {mean(f'{key}/specialization'):.3f} | {mean(f'{key}/modality_nmi'):.3f} | "
                    + " ".join(f"{x:.2f}" for x in shares[layer]["text"]) + " | "
                    + " ".join(f"{x:.2f}" for x in shares[layer]["vision"]) + " |")
    return rows, shares


def trends_section(out: Path, trends: dict) -> list[str]:
    """The report's comparison tables (one per trend) and the MoE routing plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["", "## Trends (same data, same evaluation)"]
    for name, variants in trends.items():
        heads = {v: _headlines(r["eval"]) for v, r in variants.items()}
        evals = [e for e in ("generation", "captioning", "vqa", "world_model", "planning", "perplexity")
                 if any(e in h for h in heads.values())]
        share = any("action_share" in r for r in variants.values())
        lines += ["", f"### {name}", "", TRENDS[name][0], "",
                  "| variant | steps | " + ("action-video share of positions | " if share else "")
                  + " | ".join(f"{e} ({next(h[e]['metric'] for h in heads.values() if e in h)})" for e in evals) + " |",
                  "|---|---|" + "---|" * (len(evals) + share)]
        for v, r in variants.items():
            # the seen split's figure, and the unseen split's in brackets where there is one
            cells = [(f"{heads[v][e]['value']:.4g}" + (f" (unseen {heads[v][e]['value_unseen']:.4g})"
                                                       if "value_unseen" in heads[v][e] else ""))
                     if e in heads[v] else "-" for e in evals]
            if share:
                cells.insert(0, f"{100 * r['action_share']:.3g}%")
            lines.append(f"| {v} | {r['steps']} | " + " | ".join(cells) + " |")
        chance = [f"{next(h[e]['chance'] for h in heads.values() if e in h):.4g}" for e in evals]
        lines.append("| chance | | " + ("| " if share else "") + " | ".join(chance) + " |")
        if name == "latents":
            lines += rae_summary(out)
        if name == "moe" and "moe" in variants:
            rows, shares = routing_table(variants["moe"]["run"])
            lines += ["", "MoE routing per modality (means over the last 20% of logged steps; "
                          "specialization 0 = experts used alike by text and vision, 1 = disjoint):", "", *rows]
            if shares:
                fig, axes = plt.subplots(1, len(shares), figsize=(3.2 * len(shares), 2.8), squeeze=False)
                for ax, (layer, share) in zip(axes[0], shares.items()):
                    for k, (m, vals) in enumerate(share.items()):
                        ax.bar([e + 0.4 * k for e in range(len(vals))], vals, width=0.4, label=m)
                    ax.set_title(f"layer {layer}")
                    ax.set_xlabel("expert")
                axes[0][0].set_ylabel("share of the modality's tokens")
                axes[0][0].legend()
                fig.tight_layout()
                fig.savefig(out / "moe_routing.png", dpi=110)
                plt.close(fig)
                lines += ["", "![MoE routing per modality](moe_routing.png)"]
    return lines


def main(argv: list[str] | None = None) -> int:
    from megafusion.inference.cli import positive_float

    parser = argparse.ArgumentParser(prog="megafusion quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a smoke-test size (a minute)")
    size.add_argument("--full", action="store_true",
                      help=f"a longer run that shows the research's trends (--compare {','.join(FULL_TRENDS)})")
    parser.add_argument("--compare", default=None, metavar="TREND[,TREND]",
                        help=f"also train and evaluate the variants of these comparisons ({', '.join(TRENDS)}); "
                             f"--full runs {', '.join(FULL_TRENDS)}")
    parser.add_argument("--rae", default=None, metavar="DIR",
                        help="the RAE of the latents comparison: a saved representation (megafusion train-decoder); "
                             "default: one built here (an encoder pretrained on ShapesWorld + its decoder)")
    parser.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", default=None, metavar="S[,S]",
                        help="the whole quickstart at each of these seeds under OUT/seedS, then OUT/seeds.md: "
                             "mean and spread per variant, and which comparisons exceed the seed spread")
    parser.add_argument("--world", default="simple", choices=("simple", "full"),
                        help="ShapesWorld vocabulary (default simple: 3 colours, 3 shapes, 2x2 grid)")
    parser.add_argument("--holdout", default="compositions", choices=("compositions", "none"),
                        help="compositions (default): a few colour x shape pairs, shape x cell placements, object "
                             "pairs and agent start cells are kept out of the data and evaluated as the unseen "
                             "split; none: the data may hold everything")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra training config override (repeatable), e.g. --set model.hidden_size=128")
    parser.add_argument("--cfg", type=float, default=EVAL_CFG,
                        help=f"guidance scale at evaluation (default {EVAL_CFG}: none)")
    parser.add_argument("--shift", type=positive_float, default=EVAL_SHIFT,
                        help=f"time shift of the image ODE grid at evaluation (default {EVAL_SHIFT})")
    parser.add_argument("--frame-shift", type=positive_float, default=EVAL_SHIFT,
                        help=f"the same for video frames (default {EVAL_SHIFT})")
    args = parser.parse_args(argv)

    scale = SCALES["quick" if args.quick else "full" if args.full else "default"]
    steps = args.steps or scale.steps
    trends = list(FULL_TRENDS) if args.full else [t.strip() for t in (args.compare or "").split(",") if t.strip()]
    if args.seeds is not None and args.seed != 0:
        parser.error(f"--seed {args.seed} has no effect with --seeds {args.seeds}: give the seeds in --seeds only")
    unknown = sorted(set(trends) - set(TRENDS))
    if unknown:
        parser.error(f"--compare {args.compare}: unknown {unknown}; choose from {', '.join(TRENDS)}")
    if "latents" in trends and not args.rae:
        try:
            import transformers  # noqa: F401  (the RAE the quickstart builds is an HF DINOv2)
        except ImportError:
            parser.error("the latents comparison builds an RAE, which needs `transformers`: "
                         "pip install -e '.[rae]'; or pass --rae DIR, or leave it out (--compare synergy,moe)")
    from megafusion.logging_setup import configure_logging

    configure_logging()  # training's progress lines: every logging.console_every steps, with an ETA
    if args.seeds is not None:
        return run_seeds(args, scale, steps, trends)
    return run_quickstart(args, scale, steps, trends)


def run_seeds(args, scale: Scale, steps: int, trends: list[str]) -> int:
    """``--seeds``: one quickstart per seed under OUT/seedS (finished ones with the same options
    reused), the RAE built by the first seed shared by the others, then OUT/seeds.md."""
    from megafusion import quickstart_seeds as qs

    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        print(f"megafusion quickstart: --seeds {args.seeds}: give distinct integers, e.g. --seeds 0,1,2",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    options = qs.options_record(args)
    for seed in seeds:
        folder = qs.seed_dir(out, seed)
        try:
            done = qs.finished(folder, options)
        except qs.SeedsError as err:
            print(f"megafusion quickstart: {err}", file=sys.stderr)
            return 2
        if done:
            print(f"[quickstart] seed {seed}: {folder} is finished with these options; reused", flush=True)
        else:
            args.out, args.seed = str(folder), seed
            code = run_quickstart(args, scale, steps, trends)
            if code:
                return code
            (folder / "options.json").write_text(json.dumps(options, indent=1) + "\n")
        if "latents" in trends and not args.rae:  # the first seed built it: the others share it
            args.rae = str(folder / "rae" / "decoder" / "representation")
    names = trends or ["main"]
    variants = {t: [(v.name, str(variant_dir(Path("."), t, v))) for v in TRENDS[t][1](args.rae)] if t in TRENDS
                else [("main", ".")] for t in names}
    try:
        report = qs.summarize(out, seeds, names, variants, {t: TRENDS[t][0] for t in trends})
    except qs.SeedsError as err:
        print(f"megafusion quickstart: {err}", file=sys.stderr)
        return 2
    print(f"\n[quickstart] {len(seeds)} seeds summarised: {report}")
    return 0


def run_quickstart(args, scale: Scale, steps: int, trends: list[str]) -> int:
    """One quickstart (data, RAE if asked, main run, comparisons, report) under ``args.out``."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    from megafusion.config import ConfigError
    from megafusion.parallel import cpu_compat
    from megafusion.parallel.setup import resolve_device
    from megafusion.training.checkpoint import CheckpointError
    from megafusion.training.guards import NON_FINITE_EXIT_CODE, NonFiniteError
    from megafusion.training.preemption import PREEMPTED_EXIT_CODE, Preempted

    try:
        tokenizer, prefixes = prepare_data(out, scale, args.seed, args.world, args.holdout)
        args.manifest = out / "data" / "raw" / "manifest.json"
        rae_prefixes = None
        if "latents" in trends:
            args.rae = args.rae or build_rae(out, scale, args.world, args.seed, args.device)
            rae_prefixes = preprocess_visual(out, tokenizer, ["--encoder", "rae", "--encoder-path", str(args.rae)],
                                             "indexed_rae", prefixes)
        # Training and evaluation run in this process: the CPU compatibility layer (on CPU)
        # is applied once for all of them; `train`/`evaluate_run` find it active and keep it.
        with cpu_compat.applied(resolve_device(args.device)):
            eval_dir = train_and_evaluate(out, tokenizer, prefixes, steps, scale, args)
            results = run_trends(out, trends, tokenizer, prefixes, steps, scale, args, eval_dir, rae_prefixes)
        report = write_report(out, out / "run", eval_dir, results)
    # The same exits as `megafusion train`: a stop signal saved the run being trained, and
    # the same command resumes it (finished stages are not redone).
    except Preempted as err:
        print(f"megafusion quickstart: {err}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except NonFiniteError as err:
        print(f"megafusion quickstart: {err}", file=sys.stderr)
        return NON_FINITE_EXIT_CODE
    except (ConfigError, CheckpointError) as err:
        print(f"megafusion quickstart: {err}", file=sys.stderr)
        return 2
    print(f"\n[quickstart] finished in {time.time() - started:.0f}s. Report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
