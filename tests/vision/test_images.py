"""megafusion.vision.images: sample grids."""

import numpy as np

from megafusion.data.shapes import PALETTE, ShapesWorld, load_png
from megafusion.vision.images import as_uint8, save_grid


def test_save_grid_round_trips_tiles(tmp_path):
    world = ShapesWorld(seed=0)
    images = [world.image_text(i).image for i in range(5)]
    path = save_grid(images, tmp_path / "grid.png", ncols=3, pad=2, scale=2)
    grid = load_png(path)
    assert grid.shape == (2 * (64 + 2) + 2, 3 * (64 + 2) + 2, 3)
    tile = grid[2 + 66:2 + 66 + 64, 2 + 66:2 + 66 + 64]  # row 1, col 1: image 4
    assert np.array_equal(tile[::2, ::2], images[4])
    assert tuple(grid[0, 0]) == (128, 128, 128) and tuple(PALETTE["red"]) != (128, 128, 128)


def test_as_uint8_reads_floats_as_unit_range():
    floats = np.array([[[0.0, 0.5, 1.0], [-1.0, 2.0, 0.25]]], dtype=np.float32)
    assert as_uint8(floats).tolist() == [[[0, 128, 255], [0, 255, 64]]]
    same = np.zeros((2, 2, 3), np.uint8)
    assert as_uint8(same) is same
