"""Exact ShapesWorld evaluators: a deterministic detector and scorers with chance levels.

The detector parses an image (rendered or generated) into shapes: each pixel takes the
palette colour whose blend with the background fits it (or the background), connected
components of one colour are candidate shapes, and each is classified by the best soft
Dice overlap with the pixel templates of every (shape, size), crisp and blurred. Ground-truth
renders are read back exactly; soft-edged or slightly noisy generated images nearly so.

Every scorer returns a JSON-ready dict (Python floats/ints/lists only) holding its metrics
and a ``chance`` entry computed for the same items: analytically where the answer space
is finite (VQA, planning, agent positions) and otherwise by scoring random draws from the
world's own prior with the same scorer (generation, captioning, frame error). Each also
carries a ``headline`` {metric, value, chance, higher_is_better} for reports.

Usage with any model (``gen``, ``cap``, ``answer``, ``rollout`` are the model's callables)::

    world = ShapesWorld(seed=HELDOUT_SEED)
    items = [world.image_text(i) for i in range(64)]
    score_generation([gen(s.caption) for s in items], [s.caption for s in items])
    score_captions([cap(s.image) for s in items], [s.scene for s in items])
    qa = [(s.image, v) for s in items for v in s.vqa]
    score_vqa([answer(im, v.question) for im, v in qa], [v for _, v in qa])
    clips = [world.action_video(i) for i in range(16)]
    c = clips[0].context_frames
    pred = np.stack([rollout(a.frames[:c], a.actions) for a in clips])  # [N, T - c, S, S, 3]
    score_rollout(pred, np.stack([a.frames for a in clips]), c); score_agent_positions(pred, clips)
    score_planning([world.planning_task(i) for i in range(16)],
                   world_model_plan_scorer(lambda start, acts: rollout(start[None], acts)[-1]))
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

from megafusion.data.shapes.scene import (BACKGROUND, COLORS, DEFAULT_VOCAB, GRID, PALETTE, SHAPES, SIZES, Scene,
                                          Vocab, cell_edges, check_grid, position_name, sample_scene, shape_mask,
                                          size_pixels)
from megafusion.data.shapes.text import VQA, ParsedObject, caption, normalize_answer, parse_caption
from megafusion.vision.images import as_uint8

MIN_MATCH = 0.65  # a component matching no template this well (soft Dice) is not a shape
# Template blur levels (Gaussian sigma, px): generated images are often soft-edged.
TEMPLATE_BLURS = (0.0, 0.6, 0.9, 1.2)
MAX_RESIDUAL = 0.1  # at most this share of a shape pixel's energy may lie off its colour's ray
_PAD = 3  # template border and search window margin, px


# ----------------------------------------------------------------------------- detector


@dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    size: str
    x: float  # centre of the matched template, px
    y: float
    row: int
    col: int
    area: int  # pixels of the component
    match: float  # soft Dice with the best template: 1.0 is an exact render
    grid: int = GRID

    @property
    def position(self) -> str:
        return position_name(self.row, self.col, self.grid)


_PALETTE_RGB = np.array([BACKGROUND] + [PALETTE[c] for c in COLORS], dtype=np.float32)  # [1 + C, 3]


def color_labels(image: np.ndarray) -> np.ndarray:
    """[H, W] int: 0 for background, 1 + i for palette colour COLORS[i].

    A pixel is modelled as ``alpha * colour`` (a shape's colour blended with the black
    background, as on soft edges): it takes the colour whose ray fits it best, and is
    background when it holds less than half of that colour. An exact render maps exactly.
    """
    p = as_uint8(image).astype(np.float32)
    colors = _PALETTE_RGB[1:]
    alpha = np.clip(p @ colors.T / (colors * colors).sum(1), 0, 1)  # [H, W, C]
    residual = ((p[:, :, None, :] - alpha[..., None] * colors) ** 2).sum(-1)
    best = residual.argmin(-1)
    strong = np.take_along_axis(alpha, best[..., None], -1)[..., 0] >= 0.5
    # a colour far off every palette ray (noise, or grey) is not part of a shape
    fits = residual.min(-1) <= MAX_RESIDUAL * (p * p).sum(-1)
    return np.where(strong & fits, best + 1, 0)


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a [H, W] bool mask, as a list of [H, W] bool masks.

    Labels start unique per pixel and take their neighbours' minimum until nothing changes.
    """
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(h * w).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        nb = np.minimum.reduce([labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        nb = np.where(mask, nb, big)
        if np.array_equal(nb, labels):
            break
        labels = nb
    return [labels == v for v in np.unique(labels[mask])]


def _gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    if sigma == 0:
        return a
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    a = np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 0, a)
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="same"), 1, a)


@dataclass(frozen=True)
class _Template:
    shape: str
    size: str
    pattern: np.ndarray  # [h, w] float in [0, 1], the shape centred at (_PAD + side / 2) both ways
    centroid: tuple[float, float]  # (y, x) in pattern coordinates
    energy: float  # sum of squares
    center: float


@lru_cache(maxsize=None)
def _templates(image_size: int, grid: int = GRID) -> tuple[_Template, ...]:
    """Every (shape, size) at every blur level, as soft patterns with a margin of _PAD px."""
    out = []
    for size in SIZES:
        side = size_pixels(image_size, size, grid)
        c, n = _PAD + side / 2, side + 2 * _PAD
        for shape in SHAPES:
            crisp = shape_mask(shape, c, c, side, n).astype(np.float64)
            for sigma in TEMPLATE_BLURS:
                t = _gaussian_blur(crisp, sigma)
                yy, xx = np.mgrid[:n, :n] + 0.5
                out.append(_Template(shape, size, t, (float((t * yy).sum() / t.sum()), float((t * xx).sum() / t.sum())),
                                     float((t * t).sum()), c))
    return tuple(out)


def _dice(alpha: np.ndarray, alpha_energy: float, t: _Template, oy: int, ox: int) -> float:
    """Soft Dice of the [S, S] map ``alpha`` and template ``t`` placed with its origin at (oy, ox)."""
    s = alpha.shape[0]
    h, w = t.pattern.shape
    y0, x0, y1, x1 = max(oy, 0), max(ox, 0), min(oy + h, s), min(ox + w, s)
    if y1 <= y0 or x1 <= x0:
        return 0.0
    overlap = (alpha[y0:y1, x0:x1] * t.pattern[y0 - oy:y1 - oy, x0 - ox:x1 - ox]).sum()
    return float(2 * overlap / (alpha_energy + t.energy))


def _match(alpha: np.ndarray, templates) -> tuple[float, _Template, int, int]:
    """Best (dice, template, oy, ox): every template aligned by centroid, then the three best
    refined by +-1 px shifts."""
    energy = float((alpha * alpha).sum())
    yy, xx = np.mgrid[:alpha.shape[0], :alpha.shape[1]] + 0.5
    ay, ax = (alpha * yy).sum() / alpha.sum(), (alpha * xx).sum() / alpha.sum()
    coarse = []
    for t in templates:
        oy, ox = int(np.round(ay - t.centroid[0])), int(np.round(ax - t.centroid[1]))
        coarse.append((_dice(alpha, energy, t, oy, ox), t, oy, ox))
    coarse.sort(key=lambda r: -r[0])  # stable: ties keep template order
    best = coarse[0]
    for _, t, oy, ox in coarse[:3]:
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                d = _dice(alpha, energy, t, oy + dy, ox + dx)
                if d > best[0] + 1e-12:
                    best = (d, t, oy + dy, ox + dx)
    return best


def detect(image: np.ndarray, grid: int = GRID) -> list[Detection]:
    """Shapes in an [S, S, 3] image (uint8, or float in [0, 1]) of a world with a
    ``grid`` x ``grid`` layout (it sets the sizes and the cells), sorted by grid cell.

    Pixels take a palette colour or the background (:func:`color_labels`); each connected
    component of a colour is matched against every shape/size template (crisp and blurred) by soft Dice
    on its colour-intensity map, so soft-edged generated shapes are read as the nearest
    template. Components below half the smallest template's area or matching no template
    with Dice >= MIN_MATCH are not shapes.
    """
    image = as_uint8(image)
    s = image.shape[0]
    if image.shape[:2] != (s, s) or s not in (32, 64):
        raise ValueError(f"detect: expected a square 32 or 64 px RGB image, got shape {image.shape}")
    check_grid(grid)
    templates = _templates(s, grid)
    min_area = 0.5 * min(int((t.pattern > 0.5).sum()) for t in templates)
    edges = cell_edges(s, grid)
    labels = color_labels(image)
    pixels = image.astype(np.float64)
    found = []
    for ci, color in enumerate(COLORS):
        rgb = _PALETTE_RGB[ci + 1].astype(np.float64)
        # how much of this colour each pixel holds (a blend with the black background scales it)
        intensity = np.clip(pixels @ rgb / (rgb @ rgb), 0, 1)
        own = labels == ci + 1
        for comp in connected_components(own):
            area = int(comp.sum())
            if area < min_area:
                continue
            rows, cols = np.flatnonzero(comp.any(1)), np.flatnonzero(comp.any(0))
            window = np.zeros((s, s), bool)
            window[max(rows[0] - _PAD, 0):rows[-1] + _PAD + 1, max(cols[0] - _PAD, 0):cols[-1] + _PAD + 1] = True
            # the component and the background around it; other shapes' pixels do not count
            alpha = np.where(window & (comp | (labels == 0)), intensity, 0.0)
            dice, t, oy, ox = _match(alpha, templates)
            if dice < MIN_MATCH:
                continue
            x, y = ox + t.center, oy + t.center
            row = int(np.clip(np.searchsorted(edges, y, side="right") - 1, 0, grid - 1))
            col = int(np.clip(np.searchsorted(edges, x, side="right") - 1, 0, grid - 1))
            found.append(Detection(t.shape, color, t.size, float(x), float(y), row, col, area, dice, grid))
    return sorted(found, key=lambda d: (d.row, d.col, d.color))


# ----------------------------------------------------------------------------- matching


def _scene_objects(target: Scene | str | Sequence[ParsedObject]) -> list[ParsedObject]:
    if isinstance(target, Scene):
        return [ParsedObject(o.shape, o.color, o.size, o.position) for o in target.objects]
    if isinstance(target, str):
        return parse_caption(target)
    return list(target)


def _matches(p: ParsedObject, d, fields: tuple[str, ...]) -> bool:
    return all(getattr(p, f) is None or getattr(p, f) == getattr(d, f) for f in fields)


def _all_matched(wanted: list[ParsedObject], found: list, fields: tuple[str, ...]) -> bool:
    """Whether every wanted object gets its own found object agreeing on ``fields``
    (maximum bipartite matching by augmenting paths; both lists hold at most a few items)."""
    owner: dict[int, int] = {}

    def augment(i: int, seen: set[int]) -> bool:
        for j, d in enumerate(found):
            if j not in seen and _matches(wanted[i], d, fields):
                seen.add(j)
                if j not in owner or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return all(augment(i, set()) for i in range(len(wanted)))


_GEN_CRITERIA = {"objects": ("shape", "color"), "sizes": ("shape", "color", "size"),
                 "positions": ("shape", "color", "position"), "attributes": ("shape", "color", "size", "position")}


def _generation_checks(wanted: list[ParsedObject], found: list) -> dict[str, bool]:
    checks = {"count": len(found) == len(wanted)}
    checks.update({k: _all_matched(wanted, found, f) for k, f in _GEN_CRITERIA.items()})
    checks["correct"] = checks["count"] and checks["attributes"]
    return checks


def headline(metric: str, value: float, chance: float | None, higher_is_better: bool = True) -> dict:
    """The one figure a report shows for an evaluator, with its chance level beside it."""
    return {"metric": metric, "value": float(value), "chance": None if chance is None else float(chance),
            "higher_is_better": higher_is_better}


def flatten_results(result: dict, prefix: str = "") -> dict[str, float]:
    """Scalars of a (nested) result dict as {"prefix/a/b": value}, e.g. for TensorBoard;
    list entries get their index (``mse_per_step/1``); strings, booleans and None are left out."""
    out: dict[str, float] = {}
    items = result.items() if isinstance(result, dict) else enumerate(result)
    for k, v in items:
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, (dict, list, tuple)):
            out.update(flatten_results(v, key))
        elif isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def _mean_checks(rows: list[dict[str, bool]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


# ----------------------------------------------------------------------------- generation


def score_generation(images: Sequence[np.ndarray], prompts: Sequence[Scene | str], seed: int = 0,
                     chance_samples: int = 8, vocab: Vocab = DEFAULT_VOCAB, max_objects: int = 4) -> dict:
    """GenEval-like correctness of generated images against their prompts.

    ``prompts``: a Scene, or a caption/prompt text (its objects are parsed; an attribute
    it does not name matches anything). Per image: ``count`` (as many shapes as asked),
    ``objects`` (each asked colour+shape present), ``sizes``, ``positions``, ``attributes``
    (all named attributes) and ``correct`` (count and attributes). ``chance``: the same
    criteria for images drawn from the world's prior (``vocab``, 1..``max_objects`` shapes),
    ignoring the prompt. Images are parsed on ``vocab.grid``.
    """
    if len(images) != len(prompts) or not images:
        raise ValueError(f"score_generation: {len(images)} images for {len(prompts)} prompts")
    wanted = [_scene_objects(p) for p in prompts]
    rows = [_generation_checks(w, detect(im, vocab.grid)) for w, im in zip(wanted, images)]
    size = as_uint8(images[0]).shape[0]
    chance_rows = []
    for j, w in enumerate(wanted):
        for r in range(chance_samples):
            rand = sample_scene(np.random.default_rng([seed, 1001, j, r]), size, 1, max_objects, vocab)
            chance_rows.append(_generation_checks(w, list(_scene_objects(rand))))
    out = {"n": len(rows), **_mean_checks(rows), "chance": _mean_checks(chance_rows),
           "chance_method": f"images of random world scenes ignoring the prompt ({chance_samples} per prompt)"}
    out["headline"] = headline("geneval_correct", out["correct"], out["chance"]["correct"])
    return out


# ----------------------------------------------------------------------------- captioning


def _caption_metrics(text: str, scene: Scene) -> dict[str, float]:
    parsed = parse_caption(text)
    true = [(o.position, o.size, o.color, o.shape) for o in scene.objects]
    got = [(p.position, p.size, p.color, p.shape) for p in parsed]
    common = sum((Counter(true) & Counter(got)).values())
    precision = common / len(got) if got else 0.0
    recall = common / len(true)
    by_pos = {}
    for p in parsed:
        by_pos.setdefault(p.position, p)
    out = {"exact": float(Counter(true) == Counter(got)), "count": float(len(got) == len(true)),
           "precision": precision, "recall": recall,
           "f1": 2 * precision * recall / (precision + recall) if common else 0.0}
    for attr in ("color", "shape", "size"):
        out[attr] = float(np.mean([o.position in by_pos and getattr(by_pos[o.position], attr) == getattr(o, attr)
                                   for o in scene.objects]))
    return out


def score_captions(captions: Sequence[str], scenes: Sequence[Scene], seed: int = 0, chance_samples: int = 4,
                   vocab: Vocab = DEFAULT_VOCAB, max_objects: int = 4) -> dict:
    """Captioning accuracy: captions parsed with the world's templates against the true scenes.

    ``exact`` (same objects with all attributes and positions), ``count``, object-level
    ``precision``/``recall``/``f1``, and per-attribute accuracy of the object named at each
    true object's position (``color``, ``shape``, ``size``). ``chance``: captions of random
    scenes of the world (``vocab``, 1..``max_objects`` shapes) scored the same way.
    """
    if len(captions) != len(scenes) or not scenes:
        raise ValueError(f"score_captions: {len(captions)} captions for {len(scenes)} scenes")
    rows = [_caption_metrics(c, s) for c, s in zip(captions, scenes)]
    chance_rows = []
    for j, s in enumerate(scenes):
        for r in range(chance_samples):
            rng = np.random.default_rng([seed, 1002, j, r])
            scene = sample_scene(rng, s.image_size, 1, max_objects, vocab)
            chance_rows.append(_caption_metrics(caption(scene, rng), s))
    mean = lambda rs: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]}  # noqa: E731
    out = {"n": len(rows), **mean(rows), "chance": mean(chance_rows),
           "chance_method": f"captions of random world scenes ({chance_samples} per item)"}
    out["headline"] = headline("caption_f1", out["f1"], out["chance"]["f1"])
    return out


# ----------------------------------------------------------------------------- VQA


def score_vqa(predictions: Sequence[str], items: Sequence[VQA]) -> dict:
    """VQA accuracy after answer normalisation, overall and per question kind.

    ``chance``: expected accuracy of a uniform guess among each question's choices;
    ``majority``: accuracy of always giving the most frequent answer of each kind here.
    """
    if len(predictions) != len(items) or not items:
        raise ValueError(f"score_vqa: {len(predictions)} predictions for {len(items)} questions")
    correct = np.array([normalize_answer(p) == normalize_answer(q.answer) for p, q in zip(predictions, items)])
    kinds = sorted({q.kind for q in items})
    majority = {}
    for k in kinds:
        answers = Counter(q.answer for q in items if q.kind == k)
        majority[k] = answers.most_common(1)[0][1] / sum(answers.values())
    out = {"n": len(items), "accuracy": float(correct.mean()),
           "chance": float(np.mean([1 / len(q.choices) for q in items])),
           "majority": float(np.mean([majority[q.kind] * 1.0 for q in items])), "per_kind": {}}
    for k in kinds:
        sel = [i for i, q in enumerate(items) if q.kind == k]
        out["per_kind"][k] = {"n": len(sel), "accuracy": float(correct[sel].mean()),
                              "chance": float(np.mean([1 / len(items[i].choices) for i in sel])),
                              "majority": float(majority[k])}
    out["headline"] = headline("vqa_accuracy", out["accuracy"], out["chance"])
    return out


# ----------------------------------------------------------------------------- world modeling


def _as_float(frames) -> np.ndarray:
    a = np.asarray(frames)
    return a.astype(np.float64) / 255.0 if a.dtype == np.uint8 else a.astype(np.float64)


def score_rollout(predicted: np.ndarray, clips: np.ndarray, context_frames: int) -> dict:
    """Frame error of a world model's rollout, pixel values in [0, 1].

    predicted: [N, K, S, S, 3] frames predicted for steps ``context_frames .. + K - 1``;
    clips: [N, T, S, S, 3] true clips (T >= context_frames + K). Reports ``next_frame_mse``
    (k = 1), ``mse_per_step`` (k = 1..K) and ``rollout_mse`` (mean over k); baselines per
    step: ``copy_last`` repeats the last context frame, ``chance`` uses another clip's true
    frames at the same step (needs N >= 2).
    """
    pred, true = _as_float(predicted), _as_float(clips)
    n, k = pred.shape[:2]
    if true.shape[0] != n or true.shape[1] < context_frames + k or pred.shape[2:] != true.shape[2:]:
        raise ValueError(f"score_rollout: predicted {pred.shape} does not fit clips {true.shape} "
                         f"with context_frames={context_frames}")
    target = true[:, context_frames:context_frames + k]
    per_step = ((pred - target) ** 2).mean(axis=(0, 2, 3, 4))
    copy_last = ((true[:, context_frames - 1:context_frames] - target) ** 2).mean(axis=(0, 2, 3, 4))
    out = {"n": n, "steps": k, "next_frame_mse": float(per_step[0]), "mse_per_step": per_step.tolist(),
           "rollout_mse": float(per_step.mean()), "copy_last_mse_per_step": copy_last.tolist(),
           "copy_last_mse": float(copy_last.mean())}
    if n >= 2:
        other = np.roll(target, 1, axis=0)
        chance = ((other - target) ** 2).mean(axis=(0, 2, 3, 4))
        out.update(chance_mse_per_step=chance.tolist(), chance_mse=float(chance.mean()),
                   chance_method="another clip's true frames at the same step")
    out["headline"] = headline("rollout_mse", out["rollout_mse"], out.get("chance_mse"), higher_is_better=False)
    return out


def agent_position(frame: np.ndarray, episode) -> tuple[int, int] | None:
    """Lattice (col, row) of the agent of ``episode`` (an AgentEpisode) in a frame, or None.

    The agent is the detected shape of its colour (distractors never share it), preferring
    its own shape and then the best template match.
    """
    cands = [d for d in detect(frame, episode.lattice.grid) if d.color == episode.agent.color]
    if not cands:
        return None
    best = max(cands, key=lambda d: (d.shape == episode.agent.shape, d.match, d.area))
    return episode.lattice.index(best.x, best.y)


def score_agent_positions(predicted: np.ndarray, samples: Sequence) -> dict:
    """Accuracy of the agent's lattice position in predicted frames given the actions.

    predicted: [N, K, S, S, 3] frames predicted for steps ``context_frames .. + K - 1`` of
    the ActionVideoSamples ``samples``. ``chance``: a uniform guess over the K x K lattice;
    ``copy_last``: the agent assumed to stay where the context left it.
    """
    if len(predicted) != len(samples) or not samples:
        raise ValueError(f"score_agent_positions: {len(predicted)} rollouts for {len(samples)} samples")
    hits, stay, k_lattice = [], [], samples[0].episode.lattice.k
    for frames, s in zip(predicted, samples):
        c = s.context_frames
        true = s.path[c:c + len(frames)]
        if len(true) < len(frames):
            raise ValueError(f"sample {s.index}: {len(frames)} predicted frames but only {len(true)} after context")
        hits.append([agent_position(f, s.episode) == tuple(int(v) for v in t) for f, t in zip(frames, true)])
        stay.append([tuple(s.path[c - 1]) == tuple(t) for t in true])
    hits, stay = np.array(hits, dtype=float), np.array(stay, dtype=float)
    return {"n": len(samples), "steps": hits.shape[1], "accuracy": float(hits.mean()),
            "accuracy_per_step": hits.mean(0).tolist(), "chance": 1.0 / k_lattice ** 2,
            "copy_last": float(stay.mean()), "chance_method": f"uniform over the {k_lattice}x{k_lattice} lattice",
            "headline": headline("agent_position_accuracy", hits.mean(), 1.0 / k_lattice ** 2)}


# ----------------------------------------------------------------------------- planning


PlanScorer = Callable[[np.ndarray, np.ndarray, list], Sequence[float]]


def score_planning(tasks: Sequence, scorer: PlanScorer) -> dict:
    """Planning by ranking candidate action sequences (NWM-style).

    ``scorer(start_frame, goal_frame, candidates) -> scores`` (higher is better) for each
    PlanningTask; the top-scoring candidate (first on ties) succeeds if it reaches the goal.
    ``chance``: expected success of picking a candidate uniformly at random.
    """
    if not tasks:
        raise ValueError("score_planning: no tasks")
    success = []
    for t in tasks:
        scores = np.asarray(scorer(t.start_frame, t.goal_frame, t.candidates), dtype=np.float64)
        if scores.shape != (len(t.candidates),):
            raise ValueError(f"planning scorer returned shape {scores.shape} for {len(t.candidates)} candidates")
        success.append(bool(t.reaches_goal[int(np.argmax(scores))]))
    chance = float(np.mean([t.reaches_goal.mean() for t in tasks]))
    return {"n": len(tasks), "success": float(np.mean(success)), "chance": chance,
            "candidates": len(tasks[0].candidates), "horizon": len(tasks[0].candidates[0]),
            "headline": headline("planning_success", np.mean(success), chance)}


def world_model_plan_scorer(predict_final_frame: Callable[[np.ndarray, list], np.ndarray]) -> PlanScorer:
    """A planning scorer from a world model: imagine each candidate's final frame with
    ``predict_final_frame(start_frame, actions)`` and score it by -MSE to the goal frame."""

    def scorer(start, goal, candidates):
        g = _as_float(goal)
        return [-float(((_as_float(predict_final_frame(start, c)) - g) ** 2).mean()) for c in candidates]

    return scorer
