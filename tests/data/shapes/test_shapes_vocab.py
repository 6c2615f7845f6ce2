"""A narrowed ShapesWorld (Vocab / WorldConfig.simple, the quickstart's world): it draws only
its vocabulary, on its grid, and every exact tool (renderer, parser, detector, VQA, agent
lattice, chance levels) follows it."""

import json
from dataclasses import asdict

import numpy as np
import pytest

from megafusion.data.shapes import ShapesWorld, Vocab, WorldConfig, parse_caption, vqa_document, vqa_prompt
from megafusion.data.shapes.export import write_dataset
from megafusion.data.shapes.scene import position_names, size_pixels
from megafusion.eval.shapes import detect, score_captions, score_generation


def _simple(seed=0, **kw):
    return ShapesWorld(config=WorldConfig.simple(seed=seed, **kw))


def test_simple_world_draws_only_its_vocabulary_and_reads_back_exactly():
    world = _simple(seed=3)
    v = world.vocab
    assert v.grid == 2 and set(v.positions) == {"top left", "top right", "bottom left", "bottom right"}
    counts = set()
    for i in range(80):
        s = world.image_text(i)
        counts.add(len(s.scene.objects))
        for o in s.scene.objects:
            assert o.color in v.colors and o.shape in v.shapes and o.size in v.sizes and o.position in v.positions
        # the detector on the world's grid and the caption parser both recover the scene
        dets = detect(s.image, grid=2)
        assert sorted((d.position, d.size, d.color, d.shape) for d in dets) == sorted(s.scene.key())
        parsed = sorted((p.position, p.size, p.color, p.shape) for p in parse_caption(s.caption))
        assert parsed == sorted(s.scene.key())
        for q in s.vqa:
            assert q.answer in q.choices
            if q.kind == "position":
                assert q.choices == v.positions
            if q.kind == "count":
                assert q.choices == ("zero", "one", "two", "three", "four")
    assert counts == {1, 2}
    # a large shape fills most of a 16 px cell: 13 px
    assert size_pixels(32, "large", grid=2) == 13 and size_pixels(32, "large") == 9


def test_simple_world_agent_moves_one_patch_per_action():
    world = _simple(seed=1)
    lat = world.lattice
    assert (lat.k, lat.step, lat.side) == (4, 8, 7)
    for i in range(10):
        a = world.action_video(i)
        for frame, (col, row) in zip(a.frames, a.path):
            found = [d for d in detect(frame, grid=2) if d.color == a.episode.agent.color]
            assert len(found) == 1 and lat.index(found[0].x, found[0].y) == (col, row)
    # every lattice cell's agent pixels [centre - side/2, centre + side/2) lie inside one 8 px patch
    for k in range(lat.k):
        x, _ = lat.center(k, 0)
        assert int(x - lat.side / 2) // 8 == k == int(x + lat.side / 2 - 1) // 8


def test_default_world_is_unchanged_by_the_vocabulary_option():
    full, explicit = ShapesWorld(seed=4), ShapesWorld(config=WorldConfig(seed=4, **asdict(Vocab())))
    for i in range(5):
        assert full.image_text(i).caption == explicit.image_text(i).caption
        assert full.text_document(i).text == explicit.text_document(i).text
        assert np.array_equal(full.action_video(i).frames, explicit.action_video(i).frames)


def test_world_config_round_trips_through_a_manifest(tmp_path):
    cfg = WorldConfig.simple(seed=5, action_frames=6, context_frames=2)
    paths = write_dataset(tmp_path, n_text=2, n_image=3, n_video=1, n_action=1, video_codec=None, config=cfg)
    manifest = json.loads(paths["manifest"].read_text())
    assert WorldConfig.from_dict(manifest["config"]) == cfg
    world = ShapesWorld(config=cfg)
    docs = [json.loads(line) for line in paths["vqa_docs"].read_text().splitlines()]
    assert [d["text"] for d in docs] == [vqa_document(world.image_text(i).vqa) for i in range(3)]
    first = world.image_text(0).vqa[0]
    assert docs[0]["text"].startswith(f"{vqa_prompt(first.question)} {first.answer}.")
    with pytest.raises(ValueError, match="unknown ShapesWorld config keys"):
        WorldConfig.from_dict({"colours": ["red"]})


def test_bad_vocabularies_are_refused_with_the_value():
    with pytest.raises(ValueError, match="magenta"):
        Vocab(colors=("red", "magenta"))
    with pytest.raises(ValueError, match="grid=4"):
        Vocab(grid=4)
    with pytest.raises(ValueError, match="2x2 grid"):
        WorldConfig(grid=2, max_objects=5)
    assert position_names(2) == ("top left", "top right", "bottom left", "bottom right")


def test_chance_levels_follow_the_world_prior():
    world = _simple(seed=8)
    items = [world.image_text(i) for i in range(40)]
    prior = dict(vocab=world.vocab, max_objects=2)
    gen = score_generation([s.image for s in items], [s.caption for s in items], **prior)
    cap = score_captions([s.caption for s in items], [s.scene for s in items], **prior)
    assert gen["correct"] == 1.0 and cap["f1"] == 1.0
    # one object of 3 colours x 3 shapes x 4 cells (x 2 counts): about 1/72 correct by chance
    assert 0.002 < gen["chance"]["correct"] < 0.06 and 0.0 < cap["chance"]["f1"] < 0.15
    # the full world's prior on the same prompts is (nearly) never right
    full = score_generation([s.image for s in items], [s.caption for s in items])
    assert full["chance"]["correct"] < gen["chance"]["correct"]


def test_stream_writes_vqa_documents_after_their_image():
    from megafusion.config import load_config
    from megafusion.data.sample import IMAGE, TEXT
    from megafusion.data.shapes_stream import ShapesStream
    from conftest import CONFIGS

    cfg = load_config(CONFIGS / "tiny_transfusion.yaml", ["data.shapes_weights={vqa: 1.0}", "data.shapes_world=simple"])
    stream = ShapesStream.from_config(cfg)
    assert stream.world.vocab == Vocab.simple()
    s = stream.sample(0)
    modality = np.asarray(s.modality)
    first_image = int(np.argmax(modality == IMAGE))
    assert modality[first_image - 1] == TEXT and s.tokens[first_image - 1] == stream.tokenizer.boi_id
    after = [int(t) for t, m in zip(s.tokens[first_image:], modality[first_image:]) if m == TEXT][:12]
    assert bytes(t for t in after[1:] if t < 256).decode().startswith("Question: ")
