"""``megafusion eval``: the exact ShapesWorld evaluations and held-out perplexity of a trained run.

    megafusion eval --run-dir runs/tiny_transfusion --out runs/tiny_transfusion/eval --n 32

Everything is scored on the held-out world (``HELDOUT_SEED``, never drawn in training),
with the vocabulary and clip lengths the training data used: the in-process stream's
world, or for preprocessed data ``--world DATA/manifest.json`` (what
``python -m megafusion.data.shapes`` / the quickstart wrote; default: the full world).

Two splits. *Seen*: items of the training distribution from another seed; their content
(which shapes, colours and cells go together) may well occur in training, and in the
simple world it all does. *Unseen* (when the training world held compositions out:
``data.shapes_holdout: compositions``, or a manifest with ``"holdout": "compositions"``):
items that each hold one of the world's held-out compositions (a colour x shape pair, a
shape x cell placement, two kinds together, an agent start cell;
``megafusion.data.shapes.holdout``), which no training sample held. Each result holds the
seen figures as before and the unseen ones under ``"unseen"`` (for generation, captioning
and VQA also ``"by_composition"``: the headline per kind of held-out composition); each
headline has ``value_unseen`` and ``chance_unseen`` beside ``value`` and ``chance``.
What runs depends on what the run was trained on (``data.shapes_weights``, or the names
of preprocessed datasets, see ``trained_sources``); an evaluation whose data the model never saw is
written as ``{"skipped": "not trained on this modality: ..."}``, never silently left out:

- ``generation`` (image_text): an image per held-out caption (``caption <boi>`` + ODE with
  guidance), parsed by the deterministic detector (GenEval-like correctness).
- ``captioning`` (image_text, image-first documents): text after ``<boi> image <eoi>
  This image shows`` (a caption opener: image-first documents are also VQA lists), parsed
  against the true scene.
- ``vqa`` (vqa: image-first question-answer documents): the answer is the question's
  candidate answer the model finds most likely after ``<boi> image <eoi> Question: .. Answer:``
  (multiple-choice by likelihood; chance = 1 / number of candidates).
- ``world_model`` (action_video): rollouts from the context frames given the actions:
  next-frame / rollout MSE and the agent's lattice-position accuracy.
- ``planning`` (action_video): each candidate action sequence is imagined with the model
  as world model; the one whose final frame is nearest the goal is chosen (NWM-style).
- ``perplexity``: per-token log-probabilities of held-out text documents.

Writes ``OUT/metrics.json`` (every result, and ``headlines``: one figure per evaluation with
its chance level), sample grids ``OUT/*.png``, and TensorBoard scalars ``eval/...`` at the
checkpoint's step under ``RUN_DIR/tensorboard``.

From Python: ``evaluate_run(EvalOptions(run_dir=RUN, out=OUT, n=32))`` (one field per flag).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from megafusion.eval.world import eval_world
from megafusion.inference.cli import (DEVICES, Parser, add_ode_arguments, checked, device_problem, out_dir_problem,
                                      run_dir_problem)
from megafusion.inference.generate import Generator, SamplingOptions
from megafusion.logging_setup import configure_logging, megatron_warnings


EVALUATIONS = ("generation", "captioning", "vqa", "world_model", "planning", "perplexity")


def _skip(reason: str) -> dict:
    return {"skipped": f"not trained on this modality: {reason}"}


_SOURCES = ("text", "image_text", "vqa", "video", "action_video")


def _source_of_path(path: str) -> str | None:
    """The ShapesWorld source an indexed dataset is named after (the quickstart's names), or None."""
    name = Path(path).name
    if name.startswith("text"):  # the text tool's <prefix>_text_document
        return "text"
    return name if name in _SOURCES else None


def trained_sources(cfg) -> dict[str, float]:
    """ShapesWorld source -> weight in the run's training data. Preprocessed (indexed) data
    is read by its dataset names (``text*``, ``image_text``, ``vqa``, ``video``,
    ``action_video``, as the quickstart writes them, with their ``data.weights``); if any
    name is not one of them, every source but VQA counts as trained."""
    if cfg.data.kind == "indexed":
        weights = list(cfg.data.weights) or [1.0] * len(cfg.data.paths)
        sources = [_source_of_path(p) for p in cfg.data.paths]
        if None in sources:
            return {source: float(source != "vqa") for source in _SOURCES}
        out = {source: 0.0 for source in _SOURCES}
        for source, w in zip(sources, weights):
            out[source] += float(w)
        return out
    return {k: float(v) for k, v in cfg.data.shapes_weights.items()}


def answer_question(gen: Generator, image: np.ndarray, question: str, choices: tuple[str, ...]) -> str:
    """The choice the model finds most likely after ``<boi> image <eoi>`` and the question
    (the layout of VQA training documents): the highest total log-probability of
    ``" answer."``, so a tiny model is scored on what it knows, not on its formatting."""
    from megafusion.data.shapes import vqa_prompt
    from megafusion.inference.generate import Chunk

    tok = gen.tokenizer
    state = gen.new_state()
    latents = gen.encode_images(np.asarray(image)[None])[0]
    state.run(Chunk.cat([gen.text_chunk([tok.boi_id]), gen.latent_chunk(latents, 0.0, state.new_span_id()),
                         gen.text_chunk([tok.eoi_id] + tok.encode(vqa_prompt(question)))]))
    scores = []
    for choice in choices:
        ids = tok.encode(f"{choice}.")
        logits = torch.cat([state.last_logits[None], state.run(gen.text_chunk(ids), commit=False)[0][:-1]])
        scores.append(float(torch.log_softmax(logits.double(), -1).gather(1, torch.as_tensor(ids)[:, None]).sum()))
    return choices[int(np.argmax(scores))]


CAPTION_PROMPT = "This image shows"  # one of ShapesWorld's caption openers


def caption_image(gen: Generator, image: np.ndarray, opts: SamplingOptions, max_new_tokens: int = 96,
                  prompt: str = CAPTION_PROMPT) -> str:
    """A caption of ``image``: ``prompt`` and the text generated after ``<boi> image <eoi> prompt``.

    Without a prompt the task is ambiguous for the model: image-first training documents are
    captions *or* VQA question-answer lists, and caption-first image documents end with
    ``<eod>`` right after the image; a caption opener of the training captions says which.
    """
    from megafusion.inference.generate import Chunk

    tok = gen.tokenizer
    state = gen.new_state()
    latents = gen.encode_images(np.asarray(image)[None])[0]
    state.run(Chunk.cat([gen.text_chunk([tok.boi_id]), gen.latent_chunk(latents, 0.0, state.new_span_id()),
                         gen.text_chunk([tok.eoi_id] + tok.encode(prompt))]))
    rng = torch.Generator().manual_seed(opts.seed)
    new = gen.continue_text(state, max_new_tokens, opts, rng, images=None, text_only=True)
    return tok.decode(tok.encode(prompt) + [i for i in new if i != tok.eod_id])


def evaluate(gen: Generator, cfg, out: Path, n: int = 32, opts: SamplingOptions | None = None,
             planning_candidates: int = 8, caption_first_prob: float = 0.8, planning_n: int | None = None,
             log: Callable[[str], None] = print, only: tuple[str, ...] | None = None,
             generation_n: int | None = None) -> dict:
    """Runs every evaluation the run's training data supports; returns the metrics dict
    (also written to ``out/metrics.json``) and saves sample grids under ``out``.

    ``caption_first_prob``: the training stream's share of caption-first image documents
    (``ShapesStream.caption_first_prob``); 1.0 means it never saw image-first (captioning) ones.
    ``only``: run just these evaluations (names of ``EVALUATIONS``; None: all); the others are
    written as ``{"skipped": "not requested ..."}``. ``generation_n``: prompts of the
    generation evaluation (default ``n``): its strict score has a chance level near 0.006, so
    it needs more items than the others to tell a few correct images from none.
    """
    from megafusion.data.shapes.video import agent_caption
    from megafusion.eval.shapes import (score_agent_positions, score_captions, score_generation,
                                        score_planning, score_rollout, score_vqa, world_model_plan_scorer)
    from megafusion.eval.text import perplexity
    from megafusion.vision.images import save_grid

    opts = opts or SamplingOptions()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = trained_sources(cfg)
    trained = lambda source: weights.get(source, 0.0) > 0  # noqa: E731
    world = eval_world(gen)
    prior = dict(vocab=world.vocab, max_objects=world.config.max_objects)  # chance levels of this world
    # The unseen split: only where training held the world's compositions out.
    split_unseen = world.holdout is not None
    results: dict[str, dict] = {}
    samples: dict[str, list] = {}
    planning_n = planning_n or n
    generation_n = generation_n or n

    requested = [name for name in EVALUATIONS if only is None or name in only]

    def timed(name: str, fn: Callable[[], dict]) -> None:
        if only is not None and name not in only:
            results[name] = {"skipped": "not requested (--only)"}
            return
        log(f"[eval {requested.index(name) + 1}/{len(requested)}] {name} ...")
        started = time.perf_counter()
        results[name] = fn()
        results[name]["seconds"] = round(time.perf_counter() - started, 3)
        head = results[name].get("headline")
        if head:
            unseen = (f"; unseen {head['value_unseen']:.4g} (chance {head['chance_unseen']})"
                      if "value_unseen" in head else "")
            log(f"[eval] {name}: {head['metric']} = {head['value']:.4g} (chance {head['chance']}){unseen} "
                f"in {results[name]['seconds']:.0f}s")
        else:
            log(f"[eval] {name}: {results[name].get('skipped')}")

    def counted(name: str, things, unit: str, total: int | None = None):
        """``things``, saying ``name: i/n unit`` after each quarter of them (and at least every 30 s)."""
        total = len(things) if total is None else total
        every = max(1, -(-total // 4))
        last = time.perf_counter()
        for i, thing in enumerate(things):
            yield thing
            done = i + 1
            if done < total and (done % every == 0 or time.perf_counter() - last > 30):
                log(f"[eval] {name}: {done}/{total} {unit}")
                last = time.perf_counter()

    def seeded(i: int) -> SamplingOptions:
        return replace(opts, seed=opts.seed + i)

    # The seen split's items, and the unseen split's (each holds a held-out composition).
    draw_image = {"": world.image_text, "_unseen": world.unseen_image_text}
    splits = ("", "_unseen") if split_unseen else ("",)
    items_of = {split: [draw_image[split](i) for i in range(n)] for split in splits}

    def both_splits(name: str, fn: Callable[[str], dict]) -> Callable[[], dict]:
        """``fn(split)`` for the seen split ("": its figures at the top level as before) and, if
        any, the unseen one (``"_unseen"``: its result under "unseen", its headline figures as
        the seen headline's ``value_unseen`` / ``chance_unseen``)."""
        def run() -> dict:
            result = fn("")
            if split_unseen:
                unseen = fn("_unseen")
                result["unseen"] = unseen
                if "headline" in result and "headline" in unseen:
                    result["headline"] = {**result["headline"], "value_unseen": unseen["headline"]["value"],
                                          "chance_unseen": unseen["headline"]["chance"]}
            return result
        return run

    def label(name: str, split: str) -> str:
        return name + split.replace("_", " ")  # "generation unseen"

    def by_composition(split: str, items: list, score: Callable[[list[int]], dict]) -> dict:
        """The unseen split's headline per kind of held-out composition an item was drawn for
        (``score(positions)`` scores the items at those positions): {kind: {n, value, chance}}."""
        if not split:
            return {}
        targets = world.holdout.image_compositions()
        kinds: dict[str, list[int]] = {}
        for j, s in enumerate(items):
            kinds.setdefault(targets[s.index % len(targets)][0], []).append(j)
        out = {}
        for kind, sel in kinds.items():
            head = score(sel)["headline"]
            out[kind] = {"n": len(sel), "value": head["value"], "chance": head["chance"]}
        return {"by_composition": out}

    # ---------------------------------------------------------------- image generation
    def generation(split: str) -> dict:
        items = items_of[split]
        prompts = items[:generation_n] + [draw_image[split](i) for i in range(n, generation_n)]
        images = [gen.generate_image(s.caption, seeded(i))
                  for i, s in counted(label("generation", split), list(enumerate(prompts)), "images")]
        k = min(len(prompts), 8)
        grid = f"generation_grid{split}.png"
        save_grid([s.image for s in prompts[:k]] + images[:k], out / grid, ncols=k)
        samples["generation" + split] = [{"prompt": s.caption} for s in prompts[:k]]
        per_kind = by_composition(split, prompts, lambda sel: score_generation(
            [images[j] for j in sel], [prompts[j].caption for j in sel], chance_samples=64, **prior))
        return {**score_generation(images, [s.caption for s in prompts], chance_samples=64, **prior),
                "grid": grid, "grid_rows": ["ground truth render", "generated"], **per_kind}

    timed("generation", both_splits("generation", generation) if trained("image_text") else
          lambda: _skip("data.shapes_weights.image_text = 0 (no caption-image documents)"))

    # ---------------------------------------------------------------- captioning
    def captioning(split: str) -> dict:
        items = items_of[split]
        captions = [caption_image(gen, s.image, seeded(i))
                    for i, s in counted(label("captioning", split), list(enumerate(items)), "captions")]
        samples["captioning" + split] = [{"truth": s.caption, "generated": c} for s, c in zip(items[:8], captions[:8])]
        per_kind = by_composition(split, items, lambda sel: score_captions(
            [captions[j] for j in sel], [items[j].scene for j in sel], chance_samples=16, **prior))
        return {**score_captions(captions, [s.scene for s in items], chance_samples=16, **prior), **per_kind}

    timed("captioning", both_splits("captioning", captioning) if trained("image_text") and caption_first_prob < 1.0
          else lambda: _skip("no image-first (captioning) documents in training"))

    # ---------------------------------------------------------------- VQA
    def vqa(split: str) -> dict:
        items = items_of[split]
        qa = [(j, s.image, v) for j, s in enumerate(items) for v in s.vqa]
        answers = [answer_question(gen, image, v.question, v.choices)
                   for _, image, v in counted(label("vqa", split), qa, "questions")]
        samples["vqa" + split] = [{"question": v.question, "truth": v.answer, "generated": a}
                                  for (_, _, v), a in zip(qa[:8], answers[:8])]

        def score(sel: list[int]) -> dict:  # the questions about the items at positions sel
            chosen = set(sel)
            pairs = [(a, v) for (j, _, v), a in zip(qa, answers) if j in chosen]
            return score_vqa([a for a, _ in pairs], [v for _, v in pairs])

        return {**score_vqa(answers, [v for _, _, v in qa]), "protocol": "most likely candidate answer",
                **by_composition(split, items, score)}

    timed("vqa", both_splits("vqa", vqa) if trained("vqa") else lambda: _skip(
        "no question-answer documents in training (data.shapes_weights.vqa = 0, or no indexed data path "
        f"named *vqa*; sources: {sorted(k for k, v in weights.items() if v > 0)})"))

    # ---------------------------------------------------------------- world model
    def world_model(split: str) -> dict:
        draw = world.unseen_action_video if split else world.action_video
        clips = [draw(i) for i in range(n)]
        c = clips[0].context_frames
        pred = np.stack([gen.rollout(a.frames[:c], a.actions, a.caption, seeded(i))
                         for i, a in counted(label("world_model", split), list(enumerate(clips)), "rollouts")])
        k = min(len(clips), 4)
        rows = []
        for a, p in zip(clips[:k], pred[:k]):
            rows += list(a.frames) + list(a.frames[:c]) + list(p)
        grid = f"rollout_grid{split}.png"
        save_grid(rows, out / grid, ncols=len(clips[0].frames))
        positions = score_agent_positions(pred, clips)
        return {"rollout": score_rollout(pred, np.stack([a.frames for a in clips]), c),
                "agent_positions": positions, "headline": positions["headline"], "grid": grid,
                "grid_rows": "per clip: ground truth, then context + predicted"}

    # ---------------------------------------------------------------- planning
    def planning(split: str) -> dict:
        wc = world.config
        horizon = wc.action_frames - wc.context_frames  # the rollout length seen in training
        draw = world.unseen_planning_task if split else world.planning_task
        tasks = [draw(i, horizon=horizon, n_candidates=planning_candidates) for i in range(planning_n)]
        by_start = {id(t.start_frame): t for t in tasks}
        ticks = counted(label("planning", split), range(len(tasks)), "tasks")

        def scorer(start, goal, candidates):
            task = by_start[id(start)]
            next(ticks, None)  # says how far planning is (it scores one task per call)
            predict = lambda s, acts: gen.rollout(s[None], acts, agent_caption(task.episode, acts),  # noqa: E731
                                                  seeded(task.index))[-1]
            return world_model_plan_scorer(predict)(start, goal, candidates)

        return score_planning(tasks, scorer)

    no_actions = lambda: _skip("data.shapes_weights.action_video = 0 (no action-conditioned video)")  # noqa: E731
    timed("world_model", both_splits("world_model", world_model) if trained("action_video") else no_actions)
    timed("planning", both_splits("planning", planning) if trained("action_video") else no_actions)

    # ---------------------------------------------------------------- text
    def text() -> dict:
        docs = [world.text_document(i).text for i in range(n)]
        return perplexity(docs, gen.text_logprobs, vocab_size=gen.tokenizer.vocab_size)

    timed("perplexity", text)

    def shift(frame: bool) -> float:  # the ODE grid's shift as sampled (the run's unless overridden)
        from megafusion.diffusion.flow import resolve_shift

        return float(resolve_shift(opts.flow_config(cfg.diffusion), gen.tokens_per_image * gen.latent_dim, frame))

    metrics = {
        "settings": {"n": n, "generation_n": generation_n, "steps": opts.steps, "sampler": opts.method,
                     "cfg_scale": opts.cfg_scale, "image_shift": shift(frame=False), "frame_shift": shift(frame=True),
                     "seed": opts.seed, "planning_candidates": planning_candidates,
                     "planning_n": planning_n, "heldout_seed": world.config.seed, "training_sources": weights,
                     "splits": ["seen", "unseen"] if split_unseen else ["seen"],
                     "heldout_compositions": ({**{k: [list(c) for c in getattr(world.holdout, k + "s")]
                                                  for k in ("color_shape", "placement", "object_pair", "start_cell")},
                                               "grid": world.vocab.grid, "lattice": world.lattice.k}
                                              if split_unseen else None)},
        "headlines": {name: r["headline"] for name, r in results.items() if "headline" in r},
        "results": results,
        "samples": samples,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    for line in results_table(results):
        log(line)
    return metrics


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def results_table(results: dict[str, dict]) -> list[str]:
    """The evaluations as an aligned table: evaluation, metric, value (the seen split), chance,
    and where the world held compositions out the unseen split's value and chance, seconds; an
    evaluation that did not run says why in place of its figures."""
    unseen = any("value_unseen" in r.get("headline", {}) for r in results.values())
    rows = [("evaluation", "metric", "seen" if unseen else "value", "chance")
            + (("unseen", "chance_unseen") if unseen else ()) + ("seconds",)]
    notes = []
    for name, r in results.items():
        head = r.get("headline")
        if head:
            split = (_cell(head.get("value_unseen", "-")), _cell(head.get("chance_unseen", "-"))) if unseen else ()
            rows.append((name, str(head["metric"]), _cell(head["value"]), _cell(head["chance"]), *split,
                         f"{r.get('seconds', 0):.0f}"))
        else:
            notes.append(f"{name}: {r.get('skipped', 'no headline figure')}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["[eval] results:"]
    lines += ["  " + "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))).rstrip() for row in rows]
    lines += [f"  {note}" for note in notes]
    return lines


def load_world_config(path: str | Path):
    """A WorldConfig from a dataset manifest.json (its ``config``) or a JSON of its fields."""
    from megafusion.data.shapes import WorldConfig

    if not Path(path).is_file():
        what = "is a directory" if Path(path).is_dir() else "does not exist"
        raise EvalError(f"--world {path}: {what}; give a dataset's manifest.json (written by python -m "
                        "megafusion.data.shapes or the quickstart) or a JSON of WorldConfig fields")
    try:
        data = json.loads(Path(path).read_text())
        return WorldConfig.from_dict(data.get("config", data))
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise EvalError(f"--world {path}: not a ShapesWorld manifest or WorldConfig JSON ({err})") from None


def write_tensorboard(metrics: dict, run_dir: Path, step: int) -> None:
    """Every scalar of the results as ``eval/<evaluation>/<metric>`` at ``step``."""
    from torch.utils.tensorboard import SummaryWriter

    from megafusion.eval.shapes import flatten_results

    writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
    for key, value in flatten_results(metrics["results"], "eval").items():
        writer.add_scalar(key, value, step)
    writer.close()


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="megafusion eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="a `megafusion train` run dir (config.yaml + checkpoints/) or a "
                                                    "`megafusion export` directory (config.json + model.safetensors)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/eval/step_NNNNNNNN)")
    p.add_argument("--n", type=int, default=32, help="items per evaluation")
    add_ode_arguments(p)
    # One candidate would be the true plan every time: success 1.0 measuring nothing.
    p.add_argument("--planning-candidates", type=checked(int, lambda v: v >= 2, "an integer >= 2 (one candidate "
                                                                                "is always the true plan)"),
                   default=8, help="candidate action sequences per planning task")
    p.add_argument("--planning-n", type=checked(int, lambda v: v >= 1, "an integer >= 1"), default=None,
                   help="planning tasks (default: --n); each costs a rollout per candidate")
    p.add_argument("--generation-n", type=int, default=None,
                   help="prompts of the generation evaluation (default: --n); cheap, and its strict score needs many")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world", default=None, metavar="MANIFEST.json",
                   help="the ShapesWorld the run's preprocessed data came from: a dataset's manifest.json (or a "
                        "JSON of WorldConfig fields); default: the run's in-process world, else the full world")
    p.add_argument("--only", default=None, metavar="NAME[,NAME]",
                   help=f"run just these evaluations ({', '.join(EVALUATIONS)}); default: all")
    p.add_argument("--device", default=None, choices=DEVICES, help="default: the run's train.device")
    p.add_argument("--no-tensorboard", action="store_true")
    return p


class EvalError(ValueError):
    """Options ``megafusion eval`` refuses, or a run it cannot load (the CLI: one line, exit 2)."""


@dataclass(frozen=True)
class EvalOptions:
    """What ``megafusion eval`` does, as typed fields: one per command-line flag (``--planning-n``
    is ``planning_n``; ``--sampler`` is ``sampler``, ``--no-tensorboard`` is ``tensorboard=False``).
    Checked on construction: invalid values raise :class:`EvalError`."""

    run_dir: str | Path
    out: str | Path | None = None      # default: RUN_DIR/eval/step_NNNNNNNN
    step: int | None = None            # checkpoint step; default: the latest
    n: int = 32                        # items per evaluation
    steps: int = 25                    # ODE steps per image or frame
    sampler: str = "euler"             # euler | heun
    cfg: float = 3.0                   # classifier-free guidance scale (1 = off)
    shift: float | None = None         # time shift of the image ODE grid; None: the run's
    frame_shift: float | None = None   # the same for video frames
    planning_candidates: int = 8
    planning_n: int | None = None      # planning tasks; default: n
    generation_n: int | None = None    # prompts of the generation evaluation; default: n
    seed: int = 0
    world: str | Path | None = None    # the data's manifest.json (or WorldConfig JSON); default: the run's world
    only: tuple[str, ...] | None = None  # run just these of EVALUATIONS; None: all
    device: str | None = None          # cpu | cuda | auto; default: the run's train.device
    tensorboard: bool = True           # also write eval/... scalars under RUN_DIR/tensorboard

    def __post_init__(self) -> None:
        if self.only is not None:
            object.__setattr__(self, "only", tuple(self.only))
            if not self.only or set(self.only) - set(EVALUATIONS):
                raise EvalError(f"--only {','.join(self.only)}: choose from {', '.join(EVALUATIONS)}")
        if self.n < 2 or (self.generation_n is not None and self.generation_n < 2):
            raise EvalError("--n and --generation-n must be >= 2 (chance levels compare items with each other)")
        if self.steps < 1:
            raise EvalError(f"--steps {self.steps}: must be an integer >= 1 (ODE steps per image or frame)")
        if self.sampler not in ("euler", "heun"):
            raise EvalError(f"--sampler {self.sampler}: choose from euler, heun")
        if self.planning_candidates < 2:
            raise EvalError(f"--planning-candidates {self.planning_candidates}: must be >= 2 "
                            "(one candidate is always the true plan)")
        if self.planning_n is not None and self.planning_n < 1:
            raise EvalError(f"--planning-n {self.planning_n}: must be >= 1")
        for name in ("shift", "frame_shift"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise EvalError(f"--{name.replace('_', '-')} {value}: must be a time shift > 0 (1 = no shift)")
        if not math.isfinite(self.cfg):
            raise EvalError(f"--cfg {self.cfg}: must be a finite guidance scale (1 = off)")
        problem = device_problem(self.device)
        if problem:
            raise EvalError(problem)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EvalOptions:
        """The options of parsed ``megafusion eval`` flags (:func:`build_parser`)."""
        only = None if args.only is None else tuple(x.strip() for x in args.only.split(",") if x.strip())
        if only == ():
            raise EvalError(f"--only {args.only}: choose from {', '.join(EVALUATIONS)}")
        return cls(run_dir=args.run_dir, out=args.out, step=args.step, n=args.n, steps=args.steps,
                   sampler=args.sampler, cfg=args.cfg, shift=args.shift, frame_shift=args.frame_shift,
                   planning_candidates=args.planning_candidates, planning_n=args.planning_n,
                   generation_n=args.generation_n, seed=args.seed, world=args.world, only=only,
                   device=args.device, tensorboard=not args.no_tensorboard)


def evaluate_run(options: EvalOptions) -> dict:
    """``megafusion eval`` as a function: loads the run, runs the evaluations, writes
    ``metrics.json`` (and TensorBoard scalars); returns the metrics. A run that cannot be loaded
    raises :class:`EvalError`; failures during the evaluations propagate. On CPU it applies
    the CPU compatibility layer for the call (or uses the caller's: the quickstart's)."""
    from megafusion.inference.loading import load_run, run_device
    from megafusion.parallel import cpu_compat

    # What can be told before loading anything.
    problem = run_dir_problem(options.run_dir) or out_dir_problem(options.out)
    if problem:
        raise EvalError(problem)
    world_config = None if options.world is None else load_world_config(options.world)
    log = logging.getLogger(__name__).info
    with contextlib.ExitStack() as stack:
        noise = stack.enter_context(megatron_warnings())  # megatron-core's start-up warnings: one line
        try:
            stack.enter_context(cpu_compat.applied(run_device(str(options.run_dir), options.device)))
            loaded = stack.enter_context(load_run(str(options.run_dir), options.step, options.device))
        except (FileNotFoundError, ValueError) as err:
            raise EvalError(str(err)) from err
        noise.summarize()
        gen = Generator.from_run(loaded)
        if world_config is not None:
            gen.world_config = world_config
        out = Path(options.out) if options.out else Path(options.run_dir) / "eval" / f"step_{loaded.step:08d}"
        problem = out_dir_problem(out)
        if problem:
            raise EvalError(problem)
        log(f"[eval] {options.run_dir} at step {loaded.step} -> {out}")
        opts = SamplingOptions(steps=options.steps, method=options.sampler, cfg_scale=options.cfg, seed=options.seed,
                               shift=options.shift, frame_shift=options.frame_shift)
        metrics = evaluate(gen, loaded.cfg, out, options.n, opts, options.planning_candidates,
                           planning_n=options.planning_n,
                           caption_first_prob=getattr(loaded.provider.stream, "caption_first_prob", 0.8),
                           log=log, only=options.only, generation_n=options.generation_n)
        metrics.update(run_dir=str(options.run_dir), step=loaded.step)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if options.tensorboard:
            write_tensorboard(metrics, Path(options.run_dir), loaded.step)
        log(f"[eval] wrote {out / 'metrics.json'}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()  # progress lines and the results table (megafusion.logging_setup)
    try:
        evaluate_run(EvalOptions.from_args(args))
    except EvalError as err:
        print(f"megafusion eval: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
