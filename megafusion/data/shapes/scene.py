"""ShapesWorld scenes: the vocabulary of the world, scene sampling and exact rendering.

An image is ``S x S`` RGB uint8 (S = 32 by default, 64 as an option) on a black
background, divided into a 3x3 grid of named cells (``top left`` .. ``bottom right``), or
a 2x2 grid (the four corners). A scene holds 1..4 shapes, at most one per cell, each with a
shape, a palette colour and a size. A :class:`Vocab` narrows the world (fewer colours,
shapes or sizes, the 2x2 grid) for small models: the quickstart's world is one.

Shapes are rasterised with hard edges in exact palette colours, and every shape keeps the
first pixel row/column of its cell empty, so two shapes never touch: connected components of one colour are exactly the shapes, and the detector in
``megafusion.eval.shapes`` reads a ground-truth render back without error.

Sizes are odd pixel widths and centres lie on pixel centres, so a shape of a given kind
and size always rasterises to the same pixel pattern wherever it is placed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")

# Exact RGB values of the palette; chosen far apart from each other and from the background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 60, 200),
    "cyan": (40, 210, 220),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
BACKGROUND: tuple[int, int, int] = (0, 0, 0)

SIZES: tuple[str, ...] = ("small", "large")
# Side of a size, as a fraction of a grid cell (rounded down to an odd pixel count).
SIZE_FRACTION: dict[str, float] = {"small": 0.5, "large": 0.85}

GRID = 3  # the default grid; GRID_POSITIONS lists the supported ones
# GRID_POSITIONS[grid][row][col]: names of the grid cells. The 2x2 names are a subset of
# the 3x3 ones, so captions, parser and VQA answers share one set of phrases.
GRID_POSITIONS: dict[int, tuple[tuple[str, ...], ...]] = {
    3: (("top left", "top", "top right"),
        ("left", "center", "right"),
        ("bottom left", "bottom", "bottom right")),
    2: (("top left", "top right"),
        ("bottom left", "bottom right")),
}
POSITIONS: tuple[tuple[str, ...], ...] = GRID_POSITIONS[GRID]
POSITION_NAMES: tuple[str, ...] = tuple(name for row in POSITIONS for name in row)
CELL_OF_POSITION: dict[str, tuple[int, int]] = {
    POSITIONS[r][c]: (r, c) for r in range(GRID) for c in range(GRID)
}

MAX_OBJECTS = 4


def check_grid(grid: int) -> None:
    if grid not in GRID_POSITIONS:
        raise ValueError(f"ShapesWorld grid={grid} is not supported; use one of {sorted(GRID_POSITIONS)}")


def position_name(row: int, col: int, grid: int = GRID) -> str:
    return GRID_POSITIONS[grid][row][col]


def position_names(grid: int = GRID) -> tuple[str, ...]:
    """Cell names of a grid in reading order."""
    return tuple(name for row in GRID_POSITIONS[grid] for name in row)


@dataclass(frozen=True)
class Vocab:
    """What a world may draw: colours (names of PALETTE), shapes, sizes and the grid.

    The default is the full world; ``Vocab.simple()`` is the quickstart's (three colours,
    three shapes, large only, 2x2 grid: each cell is 2x2 patches of 8 px at 32 px).
    """

    colors: tuple[str, ...] = COLORS
    shapes: tuple[str, ...] = SHAPES
    sizes: tuple[str, ...] = SIZES
    grid: int = GRID

    def __post_init__(self):
        for name, values, allowed in (("colors", self.colors, COLORS), ("shapes", self.shapes, SHAPES),
                                      ("sizes", self.sizes, SIZES)):
            object.__setattr__(self, name, tuple(values))  # lists from JSON/YAML
            bad = [v for v in values if v not in allowed]
            if not values or bad or len(set(values)) != len(values):
                raise ValueError(f"ShapesWorld vocab {name}={list(values)}: need distinct values from {allowed}")
        check_grid(self.grid)

    @staticmethod
    def simple() -> "Vocab":
        return Vocab(colors=("red", "green", "blue"), shapes=("circle", "square", "triangle"), sizes=("large",),
                     grid=2)

    @property
    def positions(self) -> tuple[str, ...]:
        return position_names(self.grid)

    @property
    def cells(self) -> int:
        return self.grid * self.grid


DEFAULT_VOCAB = Vocab()


def check_image_size(image_size: int) -> None:
    if image_size not in (32, 64):
        raise ValueError(f"ShapesWorld image_size={image_size} is not supported; use 32 or 64")


def cell_edges(image_size: int, grid: int = GRID) -> np.ndarray:
    """[grid + 1] int pixel boundaries of the grid cells along one axis."""
    return np.round(np.linspace(0, image_size, grid + 1)).astype(int)


def size_pixels(image_size: int, size: str, grid: int = GRID) -> int:
    """Odd side length in pixels of a shape of the named size."""
    cell = image_size / grid
    side = int(np.floor(SIZE_FRACTION[size] * cell))
    return side if side % 2 == 1 else side - 1


@dataclass(frozen=True)
class ShapeObject:
    """One shape. ``x``/``y`` are its centre in pixels (x to the right, y down)."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    row: int = -1  # grid cell; -1 for free-moving shapes (videos)
    col: int = -1
    grid: int = GRID  # the grid that row/col index

    @property
    def position(self) -> str | None:
        return position_name(self.row, self.col, self.grid) if self.row >= 0 else None

    def describe(self) -> str:
        return f"{self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A ground-truth scene: its objects in drawing order and the image size."""

    image_size: int
    objects: tuple[ShapeObject, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "objects": [asdict(o) for o in self.objects]}

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        return Scene(int(d["image_size"]), tuple(ShapeObject(**o) for o in d["objects"]))

    def key(self) -> tuple:
        """Order-free identity of the nameable content: sorted (position, size, color, shape)."""
        return tuple(sorted((o.position or "", o.size, o.color, o.shape) for o in self.objects))


def shape_mask(shape: str, x: float, y: float, side: int, image_size: int) -> np.ndarray:
    """[S, S] bool mask of a shape of width/height ``side`` px centred at (x, y) px.

    A pixel is inside when its centre is. The triangle points up with its base at the bottom.
    """
    coords = np.arange(image_size) + 0.5
    dx = coords[None, :] - x
    dy = coords[:, None] - y
    h = side / 2
    if shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= h
    if shape == "triangle":
        return (np.abs(dy) <= h) & (np.abs(dx) <= (dy + h) / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_objects(objects, image_size: int) -> np.ndarray:
    """[S, S, 3] uint8 image of objects drawn in order (later ones on top) on the background."""
    image = np.empty((image_size, image_size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for o in objects:
        image[shape_mask(o.shape, o.x, o.y, size_pixels(image_size, o.size, o.grid), image_size)] = PALETTE[o.color]
    return image


def render_scene(scene: Scene) -> np.ndarray:
    """[S, S, 3] uint8 image of a scene."""
    return render_objects(scene.objects, scene.image_size)


def place_in_cell(rng: np.random.Generator, row: int, col: int, side: int, image_size: int,
                  grid: int = GRID) -> tuple[float, float]:
    """A random centre for a ``side``-px shape inside cell (row, col), keeping the cell's
    first pixel row and column empty so that shapes in neighbouring cells never touch."""
    edges = cell_edges(image_size, grid)
    centre = []
    for k in (col, row):
        lo, hi = edges[k] + 1, edges[k + 1] - side  # first pixel of the shape
        if hi < lo:
            raise ValueError(f"a {side}px shape does not fit a grid cell of {image_size}px images")
        centre.append(int(rng.integers(lo, hi + 1)) + side / 2)
    return centre[0], centre[1]


def sample_scene(rng: np.random.Generator, image_size: int = 32, min_objects: int = 1,
                 max_objects: int = MAX_OBJECTS, vocab: Vocab = DEFAULT_VOCAB) -> Scene:
    """A uniformly random scene: count, distinct cells, and shape/colour/size per object."""
    check_image_size(image_size)
    g = vocab.grid
    if not 1 <= min_objects <= max_objects <= g * g:
        raise ValueError(f"need 1 <= min_objects ({min_objects}) <= max_objects ({max_objects}) <= {g * g} "
                         f"(cells of the {g}x{g} grid)")
    n = int(rng.integers(min_objects, max_objects + 1))
    cells = rng.choice(g * g, size=n, replace=False)
    objects = []
    for cell in cells:
        row, col = divmod(int(cell), g)
        shape = vocab.shapes[rng.integers(len(vocab.shapes))]
        color = vocab.colors[rng.integers(len(vocab.colors))]
        size = vocab.sizes[rng.integers(len(vocab.sizes))]
        x, y = place_in_cell(rng, row, col, size_pixels(image_size, size, g), image_size, g)
        objects.append(ShapeObject(shape, color, size, x, y, row, col, g))
    return Scene(image_size, tuple(objects))
