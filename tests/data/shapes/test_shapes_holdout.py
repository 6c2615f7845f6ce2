"""The compositional split: held-out compositions occur in no training source, the unseen split holds them."""

import json
import re
from dataclasses import replace

import numpy as np
import pytest

from megafusion.data.shapes import HELDOUT_SEED, ShapesWorld, WorldConfig, holdout_for, parse_caption, vqa_document
from megafusion.data.shapes.scene import CELL_OF_POSITION, cell_edges
from megafusion.eval.shapes import detect
from megafusion.quickstart import world_config

WORLDS = ("simple", "full")
N = {"image_text": 400, "text": 400, "video": 120, "action_video": 200}


def world(name: str, holdout: str = "compositions", seed: int = 0) -> ShapesWorld:
    return ShapesWorld(config=replace(world_config(name, seed), holdout=holdout))


# ------------------------------------------------------------------ independent checks of content
# They read what a sample shows (a detector on its pixels, a parser on its words, its true
# object states), not the generator's own bookkeeping.

def held(w: ShapesWorld):
    return w.held_compositions()


def violations(h, kinds, placements=(), start=None) -> list:
    kinds, placements = set(kinds), set(placements)
    out = [("color_shape", k) for k in h.color_shapes if k in kinds]
    out += [("placement", p) for p in h.placements if p in placements]
    out += [("object_pair", p) for p in h.object_pairs if set(p) <= kinds]
    if start is not None and tuple(start) in h.start_cells:
        out.append(("start_cell", tuple(start)))
    return out


def image_violations(w, image) -> list:
    found = detect(image, w.vocab.grid)
    return violations(held(w), [(d.color, d.shape) for d in found], [(d.shape, d.row, d.col) for d in found])


def text_violations(w, text: str) -> list:
    """Colour+shape kinds and shape+cell placements a text names (kinds named together count as a pair),
    and agent start cells it tells of."""
    objs = [o for sentence in re.split(r"(?<=[.?!])\s+", text) for o in parse_caption(sentence)]
    kinds = [(o.color, o.shape) for o in objs if o.color]
    places = [(o.shape, *CELL_OF_POSITION[o.position]) for o in objs if o.position]
    out = violations(held(w), kinds, places)
    for row, col in re.findall(r"starts in row (\d+), column (\d+)", text):
        out += violations(held(w), [], [], (int(col) - 1, int(row) - 1))
    return out


def cell(x, y, w):
    edges = cell_edges(w.image_size, w.vocab.grid)
    g = w.vocab.grid
    return (int(min(max(np.searchsorted(edges, y, side="right") - 1, 0), g - 1)),
            int(min(max(np.searchsorted(edges, x, side="right") - 1, 0), g - 1)))


def video_violations(w, v) -> list:
    places = [(o.shape, *cell(x, y, w)) for t in range(len(v.centers)) for o, (x, y) in zip(v.objects, v.centers[t])]
    return violations(held(w), [(o.color, o.shape) for o in v.objects], places) + text_violations(w, v.caption)


def action_violations(w, a) -> list:
    ep, lat = a.episode, w.lattice
    kinds = [(ep.agent.color, ep.agent.shape)] + [(o.color, o.shape) for o in ep.distractors]
    places = [(o.shape, o.row, o.col) for o in ep.distractors]
    places += [(ep.agent.shape, *cell(*lat.center(int(c), int(r)), w)) for c, r in a.path]
    return violations(held(w), kinds, places, a.path[0]) + text_violations(w, a.caption)


def sample_violations(w, source: str, i: int) -> list:
    if source == "image_text":
        s = w.image_text(i)
        return (image_violations(w, s.image) + text_violations(w, s.caption)
                + text_violations(w, vqa_document(s.vqa)))  # the VQA training document's words
    if source == "text":
        return text_violations(w, w.text_document(i).text)
    if source == "video":
        return video_violations(w, w.video(i))
    return action_violations(w, w.action_video(i))


# ------------------------------------------------------------------ the held-out set


@pytest.mark.parametrize("name, counts", [("simple", (2, 2, 2, 2)), ("full", (4, 4, 6, 6))])
def test_the_held_out_set_is_a_small_pure_function_of_the_vocabulary(name, counts):
    w = world(name)
    h = held(w)
    assert (len(h.color_shapes), len(h.placements), len(h.object_pairs), len(h.start_cells)) == counts
    # the same whatever the seed or the mode (the training and the evaluation world agree)
    assert h == held(world(name, seed=HELDOUT_SEED)) == held(world(name, "none")) == w.holdout
    assert world(name, "none").holdout is None
    v = w.vocab
    assert h == holdout_for(tuple(v.colors), tuple(v.shapes), v.grid, w.lattice.k)
    # every single attribute stays: each colour, shape, cell, kind and lattice row/column is held out at most once
    for values in ([c for c, _ in h.color_shapes], [s for s, _ in h.color_shapes], [s for s, _, _ in h.placements],
                   [(r, c) for _, r, c in h.placements], [k for p in h.object_pairs for k in p],
                   [c for c, _ in h.start_cells], [r for _, r in h.start_cells]):
        assert len(values) == len(set(values)), values
    assert not set(k for p in h.object_pairs for k in p) & set(h.color_shapes)
    assert all(a != b for a, b in h.object_pairs)


def test_another_vocabulary_holds_out_other_compositions():
    assert held(world("simple")) != held(ShapesWorld(config=WorldConfig.simple(colors=("red", "green", "cyan"))))


# ------------------------------------------------------------------ training never shows them


@pytest.mark.parametrize("name", WORLDS)
@pytest.mark.parametrize("source", list(N))
def test_no_training_sample_holds_a_held_out_composition(name, source):
    w, everything = world(name), world(name, "none")
    assert [i for i in range(N[source]) if sample_violations(w, source, i)] == []
    # the check can fail: without the holdout the same indices do show held-out compositions
    assert sum(bool(sample_violations(everything, source, i)) for i in range(N[source])) > N[source] // 20


@pytest.mark.parametrize("name", WORLDS)
def test_every_single_attribute_still_occurs_in_training(name):
    w = world(name)
    scenes = [w.image_text(i).scene for i in range(400)]
    objs = [o for s in scenes for o in s.objects]
    assert {o.color for o in objs} == set(w.vocab.colors) and {o.shape for o in objs} == set(w.vocab.shapes)
    assert {(o.row, o.col) for o in objs} == {(r, c) for r in range(w.vocab.grid) for c in range(w.vocab.grid)}
    h = held(w)
    # every kind that is not itself held out, and every placement but the held-out ones
    kinds = {(o.color, o.shape) for o in objs}
    assert kinds == {(c, s) for c in w.vocab.colors for s in w.vocab.shapes} - set(h.color_shapes)
    places = {(o.shape, o.row, o.col) for o in objs}
    g = w.vocab.grid
    assert places == {(s, r, c) for s in w.vocab.shapes for r in range(g) for c in range(g)} - set(h.placements)
    # each kind of a held-out pair still appears with others; the agent still walks through held-out start cells
    for a, b in h.object_pairs:
        assert any(a in {(o.color, o.shape) for o in s.objects} and len(s.objects) > 1 for s in scenes)
        assert any(b in {(o.color, o.shape) for o in s.objects} and len(s.objects) > 1 for s in scenes)
    clips = [w.action_video(i) for i in range(200)]
    visited = {tuple(int(v) for v in p) for a in clips for p in a.path}
    starts = {tuple(int(v) for v in a.path[0]) for a in clips}
    k = w.lattice.k
    assert starts == {(c, r) for c in range(k) for r in range(k)} - set(h.start_cells)
    assert set(h.start_cells) <= visited


@pytest.mark.parametrize("name", WORLDS)
def test_samples_stay_a_pure_function_of_seed_and_index(name):
    a, b = world(name), world(name)
    for i in (0, 5, 17):
        assert a.image_text(i).caption == b.image_text(i).caption
        assert np.array_equal(a.image_text(i).image, b.image_text(i).image)
        assert a.text_document(i).text == b.text_document(i).text
        assert np.array_equal(a.video(i).frames, b.video(i).frames)
        assert a.action_video(i).actions == b.action_video(i).actions
        assert np.array_equal(a.unseen_image_text(i).image, b.unseen_image_text(i).image)
    # drawn in any order: sample 17 is the same alone as after the others
    assert world(name).action_video(17).caption == a.action_video(17).caption
    # a first draw that holds nothing held out is kept: such samples equal the unrestricted world's
    none = world(name, "none")
    same = [i for i in range(60) if not sample_violations(none, "image_text", i)]
    assert same and all(none.image_text(i).caption == a.image_text(i).caption for i in same)
    assert world(name, seed=1).image_text(0).caption != a.image_text(0).caption or \
        world(name, seed=1).image_text(1).caption != a.image_text(1).caption


def test_the_stream_follows_data_shapes_holdout():
    from conftest import CONFIGS

    from megafusion.config import load_config
    from megafusion.data.shapes_stream import ShapesStream

    base = ["data.shapes_world=simple", "data.shapes_weights={text: 1.0, image_text: 1.0, vqa: 1.0}"]
    cfg = load_config(CONFIGS / "tiny_transfusion.yaml", base)
    assert cfg.data.shapes_holdout == "compositions"  # tiny_transfusion.yaml sets it
    # the default keeps every composition, so a run directory from before the setting resumes
    # with the data it started with
    assert load_config(None).data.shapes_holdout == "none"
    stream = ShapesStream.from_config(cfg)
    assert stream.world.config.holdout == "compositions" and stream.world.holdout is not None
    none = ShapesStream.from_config(load_config(CONFIGS / "tiny_transfusion.yaml", base + ["data.shapes_holdout=none"]))
    assert none.world.holdout is None
    assert np.array_equal(stream.sample(3).tokens, ShapesStream.from_config(cfg).sample(3).tokens)
    # the stream draws its documents from the world: those of held-out indices are redrawn
    text = bytes(int(t) for t in stream.sample(0).tokens if t < 256).decode(errors="ignore")
    assert text_violations(stream.world, text) == []


def test_written_datasets_hold_none_and_say_which(tmp_path):
    from megafusion.data.shapes import write_dataset

    paths = write_dataset(tmp_path, n_text=80, n_image=80, n_video=6, n_action=30, video_codec=None,
                          config=world_config("simple", 0))
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["config"]["holdout"] == "compositions"
    w = ShapesWorld(config=WorldConfig.from_dict(manifest["config"]))
    assert manifest["holdout_compositions"] == json.loads(json.dumps([list(c) for c in held(w).compositions()]))
    for key in ("text", "image_text", "vqa_docs", "video", "action_video"):
        for line in paths[key].read_text().splitlines():
            assert text_violations(w, json.loads(line)["text"]) == [], (key, line)
    for line in paths["action_video"].read_text().splitlines():
        assert tuple(json.loads(line)["agent_path"][0]) not in held(w).start_cells


# ------------------------------------------------------------------ the evaluation's splits


@pytest.mark.parametrize("name", WORLDS)
def test_unseen_items_each_hold_their_composition_and_seen_items_none(name):
    w = world(name, seed=HELDOUT_SEED)
    targets = held(w).image_compositions()
    assert sorted(targets) == sorted(c for c in held(w).compositions() if c[0] != "start_cell")
    assert [kind for kind, _ in targets[:3]] == ["color_shape", "placement", "object_pair"]  # a few items cover all
    for i in range(2 * len(targets)):
        s = w.unseen_image_text(i)
        assert targets[i % len(targets)] in s.holdout and s.holdout
        assert image_violations(w, s.image) and text_violations(w, s.caption), i
        seen = w.image_text(i)
        assert not image_violations(w, seen.image) and not text_violations(w, seen.caption)
    starts = held(w).start_cells
    for i in range(2 * len(starts)):
        a = w.unseen_action_video(i)
        start = starts[i % len(starts)]
        assert tuple(int(v) for v in a.path[0]) == start and ("start_cell", start) in a.holdout
        assert not action_violations(w, w.action_video(i))
        t = w.unseen_planning_task(i, horizon=4, n_candidates=4)
        assert t.start == starts[i % len(starts)] and t.reaches_goal.any()
        seen = w.planning_task(i, horizon=4, n_candidates=4)
        assert seen.start not in starts and not seen.holdout
    # the unseen split differs from the training world's draws of the same indices
    assert w.unseen_image_text(0).caption != world(name).image_text(0).caption
