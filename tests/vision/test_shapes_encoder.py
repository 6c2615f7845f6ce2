"""The ShapesWorld-pretrained encoder: its labels match the rendered pixels, it learns them,
and it saves as a DINOv2 directory the RAE loads."""

import json

import numpy as np
import pytest
import torch

from megafusion.data.shapes import ShapesWorld, WorldConfig
from megafusion.data.shapes.scene import PALETTE, render_scene
from megafusion.vision.shapes_encoder import patch_labels, pretrain_shapes_encoder

transformers = pytest.importorskip("transformers", reason="the ShapesWorld encoder is an HF DINOv2 (extra: rae)")


@pytest.mark.parametrize("config", [WorldConfig(seed=3, grid=2, max_objects=4), WorldConfig.simple(seed=3)],
                         ids=["all-shapes", "simple"])
def test_patch_labels_name_the_colour_drawn_in_the_patch(config):
    """Independent reference: a patch that shows pixels of a palette colour is labelled with that colour
    (on a 2x2 grid, where 8-pixel patches never straddle two cells)."""
    world, vocab, patch = ShapesWorld(config=config), config.vocab, 8
    checked = 0
    for i in range(40):
        scene = world.scene(i)
        image, labels = render_scene(scene), patch_labels(scene, patch, vocab)
        n = scene.image_size // patch
        for k, (color, _, _) in enumerate(labels):
            tile = image[(k // n) * patch:(k // n + 1) * patch, (k % n) * patch:(k % n + 1) * patch].reshape(-1, 3)
            drawn = {name for name, rgb in PALETTE.items() if (tile == rgb).all(-1).any()}
            if drawn:
                assert drawn == {vocab.colors[color - 1]}, (i, k)
                checked += 1
            if color == 0:
                assert not drawn
        assert len({tuple(row) for row in labels if row[0]}) <= len(scene.objects)
    assert checked > 40


def test_pretrained_encoder_learns_the_labels_and_loads_as_an_rae(tmp_path):
    from megafusion.vision import load_representation

    config = WorldConfig.simple(seed=0)
    result = pretrain_shapes_encoder(config, tmp_path / "enc", steps=200, heldout=128, log_every=1000)
    chance = result["chance"]
    assert result["before"]["patch_accuracy"] < chance["patch_accuracy"]
    assert result["after"]["patch_accuracy"] > 0.95 > chance["patch_accuracy"]
    assert result["after"]["count_accuracy"] > 0.9 > chance["count_accuracy"]
    assert json.loads((tmp_path / "enc" / "pretraining.json").read_text())["after"] == result["after"]

    rep = load_representation("rae", tmp_path / "enc", decoder=dict(hidden_size=32, depth=1, num_heads=2))
    images = torch.from_numpy(np.stack([render_scene(ShapesWorld(config=config).scene(i)) for i in range(4)]))
    latents = rep.encode(images.permute(0, 3, 1, 2).float() / 255.0)
    assert latents.shape == (4, 16, 64)
    assert rep.decode(latents).shape == (4, 3, 32, 32)
