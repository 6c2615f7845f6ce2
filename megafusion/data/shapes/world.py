"""ShapesWorld: the streaming API over the generators.

Every sample is drawn from its own ``numpy.random.Generator`` seeded by
``(seed, stream, index)``, so sample ``i`` of a stream is the same whatever was drawn
before it, in any process. Example::

    world = ShapesWorld(seed=0, image_size=32)
    s = world.image_text(7)     # s.image [32, 32, 3] uint8, s.caption, s.vqa, s.scene
    d = world.text_document(3)  # d.text
    v = world.video(0)          # v.frames [T, 32, 32, 3], v.caption
    a = world.action_video(0)   # a.frames [T, ...], a.actions (T - 1 strings), a.context_frames

With ``holdout="compositions"`` (``WorldConfig``) a fixed few compositions of the world's
vocabulary (:mod:`megafusion.data.shapes.holdout`) never occur in any sample kind: each kind
redraws, with the same generator, until its content holds none. ``unseen_image_text(i)``,
``unseen_action_video(i)`` and ``unseen_planning_task(i)`` draw items that hold one (the
evaluation's unseen split, from their own streams).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .scene import (COLORS, GRID, MAX_OBJECTS, SHAPES, SIZES, Scene, ShapeObject, Vocab, check_image_size, render_scene,
                    sample_scene)
from .holdout import HOLDOUT_MODES, Composition, Holdout, cell_of, holdout_for
from .text import VQA, caption, make_vqa, text_document
from .video import (AgentEpisode, AgentLattice, PhysicsClip, agent_caption, apply_actions, physics_caption,
                    sample_actions, sample_agent_episode, sample_physics_clip)

# Seed of evaluation sets: training data (seed 0 and small seeds) never draws from it.
HELDOUT_SEED = 1_000_003

# Stream ids keep the sample kinds' random numbers independent of each other.
_STREAMS = {"image_text": 1, "text": 2, "video": 3, "action_video": 4, "planning": 5,
            "image_text_unseen": 6, "action_video_unseen": 7, "planning_unseen": 8}
# Draws per sample before giving up on finding content with (or without) a held-out composition:
# far above what any vocabulary needs (acceptance is >= 1 in 200 for every unseen target).
_MAX_TRIES = 20_000


@dataclass(frozen=True)
class WorldConfig:
    """What ShapesWorld draws. Frame counts are per clip; ``context_frames`` of an action
    video are the frames a world model is given before it rolls out.

    ``colors``/``shapes``/``sizes``/``grid`` narrow the world's vocabulary (see
    :class:`~megafusion.data.shapes.scene.Vocab`; ``WorldConfig.simple()`` is the
    quickstart's); ``agent_step`` is the agent's move in pixels (0: image_size // 8).
    ``holdout``: ``"compositions"`` keeps the world's held-out compositions
    (:mod:`megafusion.data.shapes.holdout`) out of every sample; ``"none"`` draws everything.
    """

    seed: int = 0
    image_size: int = 32
    min_objects: int = 1
    max_objects: int = MAX_OBJECTS
    vqa_per_image: int = 4
    video_frames: int = 8
    video_max_objects: int = 3
    action_frames: int = 12
    context_frames: int = 4
    colors: tuple[str, ...] = COLORS
    shapes: tuple[str, ...] = SHAPES
    sizes: tuple[str, ...] = SIZES
    grid: int = GRID
    agent_step: int = 0
    holdout: str = "none"

    def __post_init__(self):
        check_image_size(self.image_size)
        if self.holdout not in HOLDOUT_MODES:
            raise ValueError(f"ShapesWorld holdout={self.holdout!r}: choose one of {HOLDOUT_MODES}")
        vocab = Vocab(self.colors, self.shapes, self.sizes, self.grid)  # checks the values
        for name in ("colors", "shapes", "sizes"):
            object.__setattr__(self, name, getattr(vocab, name))  # tuples, also when read from JSON
        if not 1 <= self.min_objects <= self.max_objects <= vocab.cells:
            raise ValueError(f"need 1 <= min_objects ({self.min_objects}) <= max_objects ({self.max_objects}) <= "
                             f"{vocab.cells} (cells of the {self.grid}x{self.grid} grid)")
        if not 1 <= self.context_frames < self.action_frames:
            raise ValueError(f"need 1 <= context_frames ({self.context_frames}) < action_frames ({self.action_frames})")
        if self.video_frames < 2:
            raise ValueError(f"video_frames={self.video_frames}: a video needs at least 2 frames")

    @property
    def vocab(self) -> Vocab:
        return Vocab(self.colors, self.shapes, self.sizes, self.grid)

    @staticmethod
    def simple(**overrides) -> "WorldConfig":
        """The quickstart's world: red/green/blue circles, squares and triangles, large, 1-2
        per image on a 2x2 grid (each cell 2x2 patches of 8 px at 32 px); the agent moves one
        patch (8 px) per action on a 4x4 lattice; physics videos hold one shape."""
        v = Vocab.simple()
        base = dict(colors=v.colors, shapes=v.shapes, sizes=v.sizes, grid=v.grid, max_objects=2, agent_step=8,
                    video_max_objects=1)
        return WorldConfig(**{**base, **overrides})

    @staticmethod
    def from_dict(d: dict) -> "WorldConfig":
        """From ``asdict(config)`` (e.g. the ``config`` of a dataset's manifest.json); unknown keys are refused."""
        import dataclasses

        known = {f.name for f in dataclasses.fields(WorldConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ShapesWorld config keys {unknown}; known: {sorted(known)}")
        return WorldConfig(**d)


@dataclass
class ImageTextSample:
    index: int
    image: np.ndarray  # [S, S, 3] uint8
    caption: str
    vqa: list[VQA]
    scene: Scene
    holdout: list = field(default_factory=list)  # the held-out compositions it holds (unseen items)


@dataclass
class TextDocument:
    index: int
    text: str


@dataclass
class VideoSample:
    index: int
    frames: np.ndarray  # [T, S, S, 3] uint8
    caption: str
    objects: tuple[ShapeObject, ...]  # initial state
    velocities: np.ndarray  # [n, 2] px/frame
    centers: np.ndarray  # [T, n, 2] px as rendered


@dataclass
class ActionVideoSample:
    index: int
    frames: np.ndarray  # [T, S, S, 3] uint8
    actions: list[str]  # T - 1 actions; actions[t] moves frame t to frame t + 1
    context_frames: int
    caption: str
    path: np.ndarray  # [T, 2] int lattice (col, row) of the agent
    episode: AgentEpisode
    holdout: list = field(default_factory=list)  # the held-out compositions it holds (unseen items)


@dataclass
class PlanningTask:
    """Reach the goal frame from the start frame in ``horizon`` actions: rank candidates.

    ``candidates`` are action sequences; ``reaches_goal[j]`` says whether candidate j ends
    at the goal position (simulated exactly).
    """

    index: int
    start_frame: np.ndarray  # [S, S, 3] uint8
    goal_frame: np.ndarray  # [S, S, 3] uint8
    candidates: list[list[str]]
    reaches_goal: np.ndarray  # [n_candidates] bool
    start: tuple[int, int]
    goal: tuple[int, int]
    episode: AgentEpisode = field(repr=False)
    holdout: list = field(default_factory=list)  # the held-out compositions it holds (unseen items)


class ShapesWorld:
    """Deterministic, index-addressable generator of every ShapesWorld sample kind."""

    def __init__(self, seed: int = 0, image_size: int = 32, config: WorldConfig | None = None, **overrides):
        """Either a full ``config`` or ``seed``, ``image_size`` and any other WorldConfig fields."""
        self.config = config or WorldConfig(seed=seed, image_size=image_size, **overrides)
        c = self.config
        self.vocab = c.vocab
        self.lattice = AgentLattice.for_image(c.image_size, c.grid, c.agent_step)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def rng(self, stream: str, index: int) -> np.random.Generator:
        if index < 0:
            raise ValueError(f"sample index must be >= 0, got {index}")
        return np.random.default_rng([self.config.seed, _STREAMS[stream], index])

    @property
    def holdout(self) -> Holdout | None:
        """The held-out compositions of this world's vocabulary and lattice; None with holdout="none"."""
        return self.held_compositions() if self.config.holdout == "compositions" else None

    def held_compositions(self) -> Holdout:
        """The compositions ``holdout="compositions"`` holds out (whatever this world's mode)."""
        v = self.vocab
        return holdout_for(v.colors, v.shapes, v.grid, self.lattice.k)

    # ----------------------------------------------------------------- what content holds
    def scene_compositions(self, scene: Scene) -> list[Composition]:
        """Held-out compositions (of ``held_compositions``) in a grid scene."""
        objs = scene.objects
        return self.held_compositions().found([(o.color, o.shape) for o in objs],
                                              [(o.shape, o.row, o.col) for o in objs])

    def clip_compositions(self, clip: PhysicsClip) -> list[Composition]:
        """... in a physics clip: its kinds together, and each shape in the cell of its centre in every frame."""
        g, size = self.vocab.grid, self.image_size
        placed = {(o.shape, *cell_of(x, y, size, g)) for t in range(len(clip.centers))
                  for o, (x, y) in zip(clip.objects, clip.centers[t])}
        return self.held_compositions().found([(o.color, o.shape) for o in clip.objects], placed)

    def episode_compositions(self, episode: AgentEpisode, path) -> list[Composition]:
        """... in an agent episode along ``path`` ([T, 2] lattice (col, row)): the agent's and the
        distractors' kinds together, the distractors' cells, the agent's cell in every frame and
        its start cell."""
        a, lat = episode.agent, self.lattice
        placed = {(o.shape, o.row, o.col) for o in episode.distractors}
        placed |= {(a.shape, *cell_of(*lat.center(int(c), int(r)), self.image_size, self.vocab.grid))
                   for c, r in path}
        kinds = [(a.color, a.shape)] + [(o.color, o.shape) for o in episode.distractors]
        return self.held_compositions().found(kinds, placed, tuple(int(v) for v in path[0]))

    def _scene(self, rng: np.random.Generator) -> Scene:
        """A scene with no held-out composition (the first draw when nothing is held out)."""
        c = self.config
        for _ in range(_MAX_TRIES):
            scene = sample_scene(rng, c.image_size, c.min_objects, c.max_objects, self.vocab)
            if self.holdout is None or not self.scene_compositions(scene):
                return scene
        raise RuntimeError(f"ShapesWorld: no scene without a held-out composition in {_MAX_TRIES} draws")

    def scene(self, index: int) -> Scene:
        """The scene of ``image_text(index)``."""
        return self._scene(self.rng("image_text", index))

    def image_text(self, index: int) -> ImageTextSample:
        c = self.config
        rng = self.rng("image_text", index)
        scene = self._scene(rng)
        return ImageTextSample(index, render_scene(scene), caption(scene, rng),
                               make_vqa(scene, rng, c.vqa_per_image, self.vocab), scene)

    def text_document(self, index: int) -> TextDocument:
        rng = self.rng("text", index)
        scene = self._scene(rng)
        return TextDocument(index, text_document(scene, rng, self.vocab, self.lattice.k, self.holdout))

    def video(self, index: int) -> VideoSample:
        c = self.config
        rng = self.rng("video", index)
        for _ in range(_MAX_TRIES):
            clip = sample_physics_clip(rng, c.image_size, c.video_frames, c.video_max_objects, self.vocab)
            if self.holdout is None or not self.clip_compositions(clip):
                break
        else:
            raise RuntimeError(f"ShapesWorld: no clip without a held-out composition in {_MAX_TRIES} draws")
        return VideoSample(index, clip.frames, physics_caption(clip, rng), clip.objects, clip.velocities, clip.centers)

    def _episode(self, rng: np.random.Generator, n_actions: int, repeat_prob: float, want=None):
        """(episode, start, actions, path, found): drawn until the episode holds no held-out
        composition (``want`` None) or holds composition ``want``."""
        for _ in range(_MAX_TRIES):
            episode, start = sample_agent_episode(rng, self.image_size, self.vocab, self.lattice)
            actions = sample_actions(rng, n_actions, repeat_prob)
            path = apply_actions(start, actions, self.lattice.k)
            if want is None and self.holdout is None:
                return episode, start, actions, path, []
            found = self.episode_compositions(episode, path)
            if (want is None and not found) or (want is not None and want in found):
                return episode, start, actions, path, found
        raise RuntimeError(f"ShapesWorld: no agent episode {'without a held-out composition' if want is None else want}"
                           f" in {_MAX_TRIES} draws")

    def action_video(self, index: int) -> ActionVideoSample:
        return self._action_video(index, self.rng("action_video", index))

    def _action_video(self, index: int, rng: np.random.Generator, want=None) -> ActionVideoSample:
        c = self.config
        episode, start, actions, path, found = self._episode(rng, c.action_frames - 1, 0.5, want)
        return ActionVideoSample(index, episode.render(path), actions, c.context_frames,
                                 agent_caption(episode, actions), path, episode, found)

    def planning_task(self, index: int, horizon: int = 4, n_candidates: int = 8) -> PlanningTask:
        """A start/goal pair reached by a hidden random action sequence, with ``n_candidates``
        candidate sequences: the hidden one among random others, in random order."""
        return self._planning_task(index, self.rng("planning", index), horizon, n_candidates)

    def _planning_task(self, index: int, rng: np.random.Generator, horizon: int, n_candidates: int,
                       want=None) -> PlanningTask:
        k = self.lattice.k
        episode, start, true, path, found = self._episode(rng, horizon, 0.7, want)
        goal = tuple(int(v) for v in path[-1])
        candidates = [true] + [sample_actions(rng, horizon, repeat_prob=0.7) for _ in range(n_candidates - 1)]
        candidates = [candidates[int(j)] for j in rng.permutation(n_candidates)]
        reaches = np.array([tuple(apply_actions(start, cand, k)[-1]) == goal for cand in candidates])
        frames = episode.render(np.array([start, goal]))
        return PlanningTask(index, frames[0], frames[1], candidates, reaches, start, goal, episode, found)

    # ----------------------------------------------------------------- the unseen split
    def _unseen_targets(self, kind: str) -> list[Composition]:
        h = self.held_compositions()
        targets = h.image_compositions() if kind == "image" else [c for c in h.compositions() if c[0] == "start_cell"]
        if not targets:
            raise ValueError(f"this world ({self.vocab}) holds no {kind} composition out")
        return targets

    def unseen_image_text(self, index: int) -> ImageTextSample:
        """An image-caption item whose scene holds held-out composition ``index % n`` (of
        ``held_compositions().image_compositions()``): the unseen split, whatever ``holdout`` is."""
        c = self.config
        want = self._unseen_targets("image")[index % len(self._unseen_targets("image"))]
        rng = self.rng("image_text_unseen", index)
        for _ in range(_MAX_TRIES):
            scene = sample_scene(rng, c.image_size, c.min_objects, c.max_objects, self.vocab)
            found = self.scene_compositions(scene)
            if want in found:
                return ImageTextSample(index, render_scene(scene), caption(scene, rng),
                                       make_vqa(scene, rng, c.vqa_per_image, self.vocab), scene, found)
        raise RuntimeError(f"ShapesWorld: no scene with {want} in {_MAX_TRIES} draws")

    def unseen_action_video(self, index: int) -> ActionVideoSample:
        """An action video whose agent starts in held-out start cell ``index % n``."""
        targets = self._unseen_targets("start")
        return self._action_video(index, self.rng("action_video_unseen", index), targets[index % len(targets)])

    def unseen_planning_task(self, index: int, horizon: int = 4, n_candidates: int = 8) -> PlanningTask:
        """A planning task whose agent starts in held-out start cell ``index % n``."""
        targets = self._unseen_targets("start")
        return self._planning_task(index, self.rng("planning_unseen", index), horizon, n_candidates,
                                   targets[index % len(targets)])
