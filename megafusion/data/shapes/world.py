"""ShapesWorld: the streaming API over the generators.

Every sample is drawn from its own ``numpy.random.Generator`` seeded by
``(seed, stream, index)``, so sample ``i`` of a stream is the same whatever was drawn
before it, in any process. Example::

    world = ShapesWorld(seed=0, image_size=32)
    s = world.image_text(7)     # s.image [32, 32, 3] uint8, s.caption, s.vqa, s.scene
    d = world.text_document(3)  # d.text
    v = world.video(0)          # v.frames [T, 32, 32, 3], v.caption
    a = world.action_video(0)   # a.frames [T, ...], a.actions (T - 1 strings), a.context_frames
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .scene import (COLORS, GRID, MAX_OBJECTS, SHAPES, SIZES, Scene, ShapeObject, Vocab, check_image_size, render_scene,
                    sample_scene)
from .text import VQA, caption, make_vqa, text_document
from .video import (AgentEpisode, AgentLattice, agent_caption, apply_actions, physics_caption, sample_actions,
                    sample_agent_episode, sample_physics_clip)

# Seed of evaluation sets: training data (seed 0 and small seeds) never draws from it.
HELDOUT_SEED = 1_000_003

# Stream ids keep the sample kinds' random numbers independent of each other.
_STREAMS = {"image_text": 1, "text": 2, "video": 3, "action_video": 4, "planning": 5}


@dataclass(frozen=True)
class WorldConfig:
    """What ShapesWorld draws. Frame counts are per clip; ``context_frames`` of an action
    video are the frames a world model is given before it rolls out.

    ``colors``/``shapes``/``sizes``/``grid`` narrow the world's vocabulary (see
    :class:`~megafusion.data.shapes.scene.Vocab`; ``WorldConfig.simple()`` is the
    quickstart's); ``agent_step`` is the agent's move in pixels (0: image_size // 8).
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

    def __post_init__(self):
        check_image_size(self.image_size)
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

    def scene(self, index: int) -> Scene:
        """The scene of ``image_text(index)``."""
        c = self.config
        return sample_scene(self.rng("image_text", index), c.image_size, c.min_objects, c.max_objects, self.vocab)

    def image_text(self, index: int) -> ImageTextSample:
        c = self.config
        rng = self.rng("image_text", index)
        scene = sample_scene(rng, c.image_size, c.min_objects, c.max_objects, self.vocab)
        return ImageTextSample(index, render_scene(scene), caption(scene, rng),
                               make_vqa(scene, rng, c.vqa_per_image, self.vocab), scene)

    def text_document(self, index: int) -> TextDocument:
        c = self.config
        rng = self.rng("text", index)
        scene = sample_scene(rng, c.image_size, c.min_objects, c.max_objects, self.vocab)
        return TextDocument(index, text_document(scene, rng, self.vocab, self.lattice.k))

    def video(self, index: int) -> VideoSample:
        c = self.config
        rng = self.rng("video", index)
        clip = sample_physics_clip(rng, c.image_size, c.video_frames, c.video_max_objects, self.vocab)
        return VideoSample(index, clip.frames, physics_caption(clip, rng), clip.objects, clip.velocities, clip.centers)

    def action_video(self, index: int) -> ActionVideoSample:
        c = self.config
        rng = self.rng("action_video", index)
        episode, start = sample_agent_episode(rng, c.image_size, self.vocab, self.lattice)
        actions = sample_actions(rng, c.action_frames - 1)
        path = apply_actions(start, actions, self.lattice.k)
        return ActionVideoSample(index, episode.render(path), actions, c.context_frames,
                                 agent_caption(episode, actions), path, episode)

    def planning_task(self, index: int, horizon: int = 4, n_candidates: int = 8) -> PlanningTask:
        """A start/goal pair reached by a hidden random action sequence, with ``n_candidates``
        candidate sequences: the hidden one among random others, in random order."""
        rng = self.rng("planning", index)
        episode, start = sample_agent_episode(rng, self.image_size, self.vocab, self.lattice)
        k = self.lattice.k
        true = sample_actions(rng, horizon, repeat_prob=0.7)
        goal = tuple(int(v) for v in apply_actions(start, true, k)[-1])
        candidates = [true] + [sample_actions(rng, horizon, repeat_prob=0.7) for _ in range(n_candidates - 1)]
        candidates = [candidates[int(j)] for j in rng.permutation(n_candidates)]
        reaches = np.array([tuple(apply_actions(start, cand, k)[-1]) == goal for cand in candidates])
        frames = episode.render(np.array([start, goal]))
        return PlanningTask(index, frames[0], frames[1], candidates, reaches, start, goal, episode)
