"""ShapesWorld videos: shapes moving with wall bounces, and an agent moved by text actions.

Physics videos: 1..3 shapes with constant velocity (pixels/frame) that reflect off the
image borders. The state is continuous; each frame renders the centre snapped to the
pixel grid so that shapes keep their exact pixel pattern (and stay detectable).

Action-conditioned videos: an agent shape lives on a lattice of ``K x K`` positions spaced
``step`` pixels apart; each action moves it one lattice step (``stay`` keeps it; moving into a
wall keeps it too). Static distractor shapes in other colours sit behind it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scene import DEFAULT_VOCAB, GRID, ShapeObject, Vocab, render_objects, sample_scene, size_pixels

# The action vocabulary. The tokenizer reserves one token per action (ACTION_TOKENS).
ACTIONS: tuple[str, ...] = ("up", "down", "left", "right", "stay")
ACTION_ALIASES: dict[str, str] = {"w": "up", "a": "left", "s": "down", "d": "right", "noop": "stay"}
ACTION_TOKENS: tuple[str, ...] = tuple(f"<act_{a}>" for a in ACTIONS)  # as megafusion.data.tokenizer.action_piece
# (d_col, d_row) of each action on the agent lattice; rows grow downwards.
ACTION_DELTAS: dict[str, tuple[int, int]] = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0),
                                             "stay": (0, 0)}


def canonical_action(action: str) -> str:
    """``action`` as one of ACTIONS (aliases W/A/S/D and ``noop`` accepted, any case)."""
    a = action.strip().lower()
    a = ACTION_ALIASES.get(a, a)
    if a not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; expected one of {ACTIONS} or aliases {sorted(ACTION_ALIASES)}")
    return a


# ----------------------------------------------------------------------------- physics


def snap(center: float, side: int) -> float:
    """Centre moved to the nearest position where an odd ``side``-px shape is pixel-aligned."""
    return float(np.floor(center - side / 2 + 0.5)) + side / 2


def physics_states(positions: np.ndarray, velocities: np.ndarray, sides: np.ndarray, image_size: int,
                   frames: int) -> np.ndarray:
    """[frames, n, 2] float centres (x, y) of n shapes under constant velocity with wall bounces.

    positions, velocities: [n, 2] px and px/frame; sides: [n] px. A shape's centre stays in
    [side/2, S - side/2]; crossing a bound reflects both its position and its velocity.
    """
    pos, vel = positions.astype(np.float64).copy(), velocities.astype(np.float64).copy()
    lo = (sides / 2.0)[:, None]
    hi = image_size - lo
    out = np.empty((frames,) + pos.shape)
    for t in range(frames):
        out[t] = pos
        pos = pos + vel
        for _ in range(2):  # a fast shape in a small image could cross both bounds
            below, above = pos < lo, pos > hi
            pos = np.where(below, 2 * lo - pos, np.where(above, 2 * hi - pos, pos))
            vel = np.where(below | above, -vel, vel)
    return out


def direction_word(vx: float, vy: float) -> str:
    """Compass-like word for a velocity (image y grows downwards)."""
    angle = np.degrees(np.arctan2(-vy, vx)) % 360
    names = ("right", "up and to the right", "up", "up and to the left", "left", "down and to the left", "down",
             "down and to the right")
    return names[int(((angle + 22.5) % 360) // 45)]


@dataclass
class PhysicsClip:
    """Objects (with their initial state), velocities and per-frame centres of a physics video."""

    objects: tuple[ShapeObject, ...]
    velocities: np.ndarray  # [n, 2] px/frame
    centers: np.ndarray  # [T, n, 2] px, snapped to the pixel grid as rendered
    frames: np.ndarray  # [T, S, S, 3] uint8


def sample_physics_clip(rng: np.random.Generator, image_size: int, frames: int, max_objects: int = 3,
                        vocab: Vocab = DEFAULT_VOCAB) -> PhysicsClip:
    n = int(rng.integers(1, max_objects + 1))
    v, g = vocab, vocab.grid
    kinds = [(v.shapes[rng.integers(len(v.shapes))], v.colors[rng.integers(len(v.colors))],
              v.sizes[rng.integers(len(v.sizes))]) for _ in range(n)]
    sides = np.array([size_pixels(image_size, k[2], g) for k in kinds], dtype=np.float64)
    pos = rng.uniform(sides[:, None] / 2, image_size - sides[:, None] / 2, size=(n, 2))
    speed = rng.uniform(0.5, 2.0, size=n) * image_size / 32
    angle = rng.uniform(0, 2 * np.pi, size=n)
    vel = np.stack([speed * np.cos(angle), speed * np.sin(angle)], axis=1)
    states = physics_states(pos, vel, sides, image_size, frames)
    centers = np.stack([[[snap(states[t, i, 0], int(sides[i])), snap(states[t, i, 1], int(sides[i]))]
                         for i in range(n)] for t in range(frames)])
    objects = tuple(ShapeObject(s, c, z, float(centers[0, i, 0]), float(centers[0, i, 1]), grid=g)
                    for i, (s, c, z) in enumerate(kinds))
    video = np.stack([render_objects([ShapeObject(s, c, z, *centers[t, i], grid=g)
                                      for i, (s, c, z) in enumerate(kinds)],
                                     image_size) for t in range(frames)])
    return PhysicsClip(objects, vel, centers, video)


def physics_caption(clip: PhysicsClip, rng: np.random.Generator) -> str:
    parts = []
    for o, (vx, vy) in zip(clip.objects, clip.velocities):
        speed = "slowly" if np.hypot(vx, vy) < 1.25 * clip.frames.shape[1] / 32 else "quickly"
        verb = ("moves", "travels", "drifts")[int(rng.integers(3))]
        parts.append(f"a {o.size} {o.color} {o.shape} {verb} {speed} {direction_word(vx, vy)}")
    text = (", ".join(parts[:-1]) + " and " + parts[-1]) if len(parts) > 1 else parts[0]
    return text[0].upper() + text[1:] + ", bouncing off the walls."


# ----------------------------------------------------------------------------- agent


@dataclass(frozen=True)
class AgentLattice:
    """Where the agent can be: lattice index k in [0, K) along each axis maps to the pixel
    centre ``margin + k * step + side / 2``. The agent is a small shape of ``grid``."""

    image_size: int
    side: int
    step: int
    margin: int
    k: int
    grid: int = GRID

    @staticmethod
    def for_image(image_size: int, grid: int = GRID, step: int = 0) -> "AgentLattice":
        """``step``: pixels per move (0: image_size // 8); with step = a patch size every move
        shifts the agent by exactly one latent patch."""
        side = size_pixels(image_size, "small", grid)
        step = step or image_size // 8
        if not 1 <= step <= image_size - side:
            raise ValueError(f"agent step {step} px must lie in [1, {image_size - side}] for {image_size} px images")
        k = (image_size - side) // step + 1
        margin = (image_size - side - step * (k - 1)) // 2
        return AgentLattice(image_size, side, step, margin, k, grid)

    def center(self, col: int, row: int) -> tuple[float, float]:
        return self.margin + col * self.step + self.side / 2, self.margin + row * self.step + self.side / 2

    def index(self, x: float, y: float) -> tuple[int, int]:
        """Nearest lattice (col, row) of a pixel centre, clipped to the lattice."""
        col = int(np.clip(np.round((x - self.side / 2 - self.margin) / self.step), 0, self.k - 1))
        row = int(np.clip(np.round((y - self.side / 2 - self.margin) / self.step), 0, self.k - 1))
        return col, row


def apply_actions(start: tuple[int, int], actions, k: int) -> np.ndarray:
    """[len(actions) + 1, 2] int lattice (col, row) of the agent from ``start`` under the actions."""
    path = [tuple(start)]
    col, row = start
    for a in actions:
        dc, dr = ACTION_DELTAS[canonical_action(a)]
        col, row = min(max(col + dc, 0), k - 1), min(max(row + dr, 0), k - 1)
        path.append((col, row))
    return np.array(path, dtype=np.int64)


def sample_actions(rng: np.random.Generator, n: int, repeat_prob: float = 0.5) -> list[str]:
    """Random actions; each repeats the previous one with ``repeat_prob`` so paths travel."""
    out: list[str] = []
    for _ in range(n):
        if out and rng.random() < repeat_prob:
            out.append(out[-1])
        else:
            out.append(ACTIONS[int(rng.integers(len(ACTIONS)))])
    return out


@dataclass
class AgentEpisode:
    """The agent, its static distractors and its lattice; renders any lattice path."""

    agent: ShapeObject  # at its start position
    distractors: tuple[ShapeObject, ...]
    lattice: AgentLattice

    def render(self, path: np.ndarray) -> np.ndarray:
        """[T, S, S, 3] uint8 frames of the agent following ``path`` [T, 2] lattice (col, row)."""
        frames = []
        for col, row in path:
            x, y = self.lattice.center(int(col), int(row))
            agent = ShapeObject(self.agent.shape, self.agent.color, self.agent.size, x, y, grid=self.lattice.grid)
            frames.append(render_objects(self.distractors + (agent,), self.lattice.image_size))
        return np.stack(frames)


def sample_agent_episode(rng: np.random.Generator, image_size: int, vocab: Vocab = DEFAULT_VOCAB,
                         lattice: AgentLattice | None = None) -> tuple[AgentEpisode, tuple[int, int]]:
    """An agent (small, random shape/colour), 0..2 distractors in other colours, and a start cell."""
    lattice = lattice or AgentLattice.for_image(image_size, vocab.grid)
    color = vocab.colors[rng.integers(len(vocab.colors))]
    shape = vocab.shapes[rng.integers(len(vocab.shapes))]
    scene = sample_scene(rng, image_size, min_objects=1, max_objects=min(3, vocab.cells), vocab=vocab)
    distractors = tuple(o for o in scene.objects if o.color != color)[: int(rng.integers(0, 3))]
    start = (int(rng.integers(lattice.k)), int(rng.integers(lattice.k)))
    x, y = lattice.center(*start)
    return AgentEpisode(ShapeObject(shape, color, "small", x, y, grid=lattice.grid), distractors, lattice), start


def agent_caption(episode: AgentEpisode, actions) -> str:
    others = [f"a {o.size} {o.color} {o.shape}" for o in episode.distractors]
    scene = (" among " + " and ".join(others)) if others else " on an empty board"
    a = episode.agent
    return f"The agent is a {a.color} {a.shape}{scene}. Actions: {' '.join(actions)}."
