"""Held-out compositions of a ShapesWorld: content that training never shows, for an unseen split.

With ``WorldConfig.holdout = "compositions"`` every training source of the world (image-caption
pairs, VQA, text documents, physics videos, action videos) rejection-samples away anything that
contains one of these compositions, and the evaluation draws items that contain them
(``ShapesWorld.unseen_image_text`` / ``unseen_action_video`` / ``unseen_planning_task``):

- ``color_shapes``: (colour, shape) pairs, e.g. no blue triangle anywhere;
- ``placements``: (shape, row, col): a shape in a grid cell, whatever its colour (for moving
  shapes, the cell holding the shape's centre in any frame);
- ``object_pairs``: two (colour, shape) kinds that never appear together in one scene, clip
  or document;
- ``start_cells``: lattice (col, row) cells where the agent of an action video never starts
  (it still walks through them).

The set is a pure function of the vocabulary and the agent lattice (never of the seed, so the
training world and the evaluation world agree): a fixed small share of each kind, chosen by a
generator seeded with a checksum of the vocabulary, with no colour, shape, cell, kind or lattice
row/column held out twice. Every single attribute therefore stays in training; only the
combinations are new. Counts: ``round(C*S/6)`` colour-shape pairs (at most min(C, S)),
``min(S, cells, round(S*cells/6))`` placements, ``max(2, round(P/30))`` object pairs among the
P pairs of distinct remaining kinds, ``max(1, round(K*K/8))`` start cells of the K x K lattice
(all at least 1). The simple world holds out 2 + 2 + 2 + 2, the full one 4 + 4 + 6 + 6.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

import numpy as np

from .scene import cell_edges

HOLDOUT_MODES = ("none", "compositions")

Kind = tuple[str, str]  # (colour, shape)
# A composition: (what, value); what is one of the keys of Holdout.kinds().
Composition = tuple[str, tuple]


@dataclass(frozen=True)
class Holdout:
    """The held-out compositions of one world (see the module docstring)."""

    color_shapes: tuple[Kind, ...]
    placements: tuple[tuple[str, int, int], ...]  # (shape, row, col)
    object_pairs: tuple[tuple[Kind, Kind], ...]  # each pair sorted
    start_cells: tuple[tuple[int, int], ...]  # agent lattice (col, row)

    @staticmethod
    def kinds() -> tuple[str, ...]:
        return ("color_shape", "placement", "object_pair", "start_cell")

    def compositions(self) -> list[Composition]:
        """Every held-out composition as (kind, value), in a fixed order."""
        return ([("color_shape", c) for c in self.color_shapes] + [("placement", p) for p in self.placements]
                + [("object_pair", p) for p in self.object_pairs] + [("start_cell", s) for s in self.start_cells])

    def image_compositions(self) -> list[Composition]:
        """The compositions a still scene can hold (all but start cells), the kinds interleaved
        (a colour-shape pair, a placement, an object pair, the next pair, ...): the unseen image
        split cycles them, so a few items already cover every kind."""
        lists = [[("color_shape", c) for c in self.color_shapes], [("placement", p) for p in self.placements],
                 [("object_pair", p) for p in self.object_pairs]]
        return [group[i] for i in range(max(map(len, lists))) for group in lists if i < len(group)]

    def found(self, kinds: Iterable[Kind], placements: Iterable[tuple[str, int, int]] = (),
              start: tuple[int, int] | None = None) -> list[Composition]:
        """The held-out compositions among content: the (colour, shape) kinds shown together, the
        (shape, row, col) placements shown, and the agent's start cell (if any)."""
        kinds = set(kinds)
        out: list[Composition] = [("color_shape", k) for k in self.color_shapes if k in kinds]
        placed = set(placements)
        out += [("placement", p) for p in self.placements if p in placed]
        out += [("object_pair", p) for p in self.object_pairs if p[0] in kinds and p[1] in kinds]
        if start is not None and tuple(start) in self.start_cells:
            out.append(("start_cell", tuple(start)))
        return out

    def kind_allowed(self, kind: Kind, shown: Iterable[Kind] = ()) -> bool:
        """Whether ``kind`` may be shown next to the kinds ``shown`` (text naming a colour and shape)."""
        return not self.found(set(shown) | {kind})


def cell_of(x: float, y: float, image_size: int, grid: int) -> tuple[int, int]:
    """(row, col) of the grid cell holding pixel point (x, y)."""
    edges = cell_edges(image_size, grid)
    row = int(np.clip(np.searchsorted(edges, y, side="right") - 1, 0, grid - 1))
    col = int(np.clip(np.searchsorted(edges, x, side="right") - 1, 0, grid - 1))
    return row, col


def _pick(rng: np.random.Generator, candidates: list, n: int, keys) -> list:
    """Up to ``n`` candidates in a random order, greedily, no two sharing any key of ``keys(c)``."""
    used: set = set()
    out = []
    for i in rng.permutation(len(candidates)):
        c = candidates[int(i)]
        ks = set(keys(c))
        if ks & used:
            continue
        used |= ks
        out.append(c)
        if len(out) == n:
            break
    return sorted(out)


@lru_cache(maxsize=None)
def holdout_for(colors: tuple[str, ...], shapes: tuple[str, ...], grid: int, lattice_k: int) -> Holdout:
    """The held-out compositions of a vocabulary and agent lattice (pure, cached)."""
    rng = np.random.default_rng([zlib.crc32(repr((colors, shapes, grid, lattice_k)).encode()), 29])
    c, s, cells = len(colors), len(shapes), grid * grid
    pairs = [(col, sh) for col in colors for sh in shapes]
    color_shapes = _pick(rng, pairs, max(1, min(c, s, round(c * s / 6))) if min(c, s) > 1 else 0,
                         lambda k: [("c", k[0]), ("s", k[1])])
    placements = _pick(rng, [(sh, r, k) for sh in shapes for r in range(grid) for k in range(grid)],
                       max(1, min(s, cells, round(s * cells / 6))) if s > 1 or cells > 1 else 0,
                       lambda p: [("s", p[0]), ("cell", p[1], p[2])])
    kinds = [k for k in pairs if k not in color_shapes]
    kind_pairs = [(a, b) for i, a in enumerate(kinds) for b in kinds[i + 1:]]
    object_pairs = _pick(rng, kind_pairs, min(len(kinds) // 2, max(2, round(len(kind_pairs) / 30))),
                         lambda p: [p[0], p[1]])
    starts = _pick(rng, [(col, row) for col in range(lattice_k) for row in range(lattice_k)],
                   min(lattice_k, max(1, round(lattice_k * lattice_k / 8))) if lattice_k > 1 else 0,
                   lambda p: [("col", p[0]), ("row", p[1])])
    return Holdout(tuple(color_shapes), tuple(placements), tuple(tuple(sorted(p)) for p in object_pairs),
                   tuple(starts))
