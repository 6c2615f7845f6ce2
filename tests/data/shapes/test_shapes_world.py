"""ShapesWorld generator: determinism, scene invariants, language round trips, physics,
agent dynamics and the files written for the preprocessing tool."""

import json
import re

import numpy as np
import pytest

from megafusion.data.shapes import (ACTION_TOKENS, ACTIONS, COLORS, PALETTE, POSITIONS, SHAPES, ShapesWorld,
                                    WorldConfig, canonical_action, caption, load_png, parse_caption, write_dataset)
from megafusion.data.shapes.scene import cell_edges, shape_mask, size_pixels
from megafusion.data.shapes.text import NUMBER_WORDS, POSITION_PHRASES
from megafusion.data.shapes.video import apply_actions, physics_states


def _same(a, b):
    """Deep equality of two samples' arrays and strings."""
    for name, va in vars(a).items():
        vb = getattr(b, name)
        if isinstance(va, np.ndarray):
            assert np.array_equal(va, vb), name
        else:
            assert va == vb, name


@pytest.mark.parametrize("kind", ["image_text", "text_document", "video", "action_video"])
def test_samples_are_deterministic_per_seed_and_index(kind):
    a, b = ShapesWorld(seed=3), ShapesWorld(seed=3)
    for i in range(6):  # b draws other indices first: sample 4 must not depend on them
        getattr(b, kind)(i + 10)
    _same(getattr(a, kind)(4), getattr(b, kind)(4))
    first = [getattr(a, kind)(i) for i in range(8)]
    other_seed = [getattr(ShapesWorld(seed=4), kind)(i) for i in range(8)]
    key = (lambda s: s.text) if kind == "text_document" else (
        lambda s: s.image.tobytes() if kind == "image_text" else s.frames.tobytes())
    assert len({key(s) for s in first}) == 8, "different indices gave identical samples"
    assert all(key(x) != key(y) for x, y in zip(first, other_seed)), "the seed did not change the samples"


@pytest.mark.parametrize("image_size", [32, 64])
def test_scenes_are_renderable_and_shapes_never_touch(image_size):
    world = ShapesWorld(seed=0, image_size=image_size)
    edges = cell_edges(image_size)
    counts = set()
    for i in range(150):
        s = world.image_text(i)
        assert s.image.shape == (image_size, image_size, 3) and s.image.dtype == np.uint8
        objs = s.scene.objects
        counts.add(len(objs))
        assert len({(o.row, o.col) for o in objs}) == len(objs), "two shapes share a grid cell"
        masks, grown_masks = [], []
        for o in objs:
            m = shape_mask(o.shape, o.x, o.y, size_pixels(image_size, o.size), image_size)
            rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            # inside its cell, the cell's first row and column left empty
            assert edges[o.row] + 1 <= rows[0] and rows[-1] < edges[o.row + 1]
            assert edges[o.col] + 1 <= cols[0] and cols[-1] < edges[o.col + 1]
            assert np.all(s.image[m] == PALETTE[o.color])
            # dilate by one pixel (4-neighbourhood): no other shape may be there
            grown = m.copy()
            grown[1:] |= m[:-1]
            grown[:-1] |= m[1:]
            grown[:, 1:] |= m[:, :-1]
            grown[:, :-1] |= m[:, 1:]
            masks.append(m)
            grown_masks.append(grown)
        for a, grown in enumerate(grown_masks):
            assert not any((grown & m).any() for b, m in enumerate(masks) if b != a), "two shapes touch"
        n_pixels = sum(shape_mask(o.shape, o.x, o.y, size_pixels(image_size, o.size), image_size).sum() for o in objs)
        assert (s.image.any(-1)).sum() == n_pixels, "pixels outside the shapes are not background"
    assert counts == {1, 2, 3, 4}


def test_shape_pixel_patterns_match_their_geometry():
    side = 9
    sq = shape_mask("square", 4.5, 4.5, side, 9)
    assert sq.all()
    tri = shape_mask("triangle", 4.5, 4.5, side, 9)
    widths = tri.sum(1)
    assert widths[0] == 1 and widths[-1] == side and np.all(np.diff(widths) >= 0), "triangle must point up"
    circ = shape_mask("circle", 4.5, 4.5, side, 9)
    dia = shape_mask("diamond", 4.5, 4.5, side, 9)
    # areas against the continuous shapes (pi r^2 and 2 r^2 with r = side / 2)
    assert abs(circ.sum() - np.pi * 4.5 ** 2) < 6 and abs(dia.sum() - 2 * 4.5 ** 2) < 6
    assert not circ[0, 0] and not dia[0, 0] and dia[4, 0] and dia[0, 4]


@pytest.mark.parametrize("image_size", [32, 64])
def test_captions_parse_back_to_the_scene(image_size):
    world = ShapesWorld(seed=1, image_size=image_size)
    captions = set()
    for i in range(300):
        s = world.image_text(i)
        parsed = sorted((p.position, p.size, p.color, p.shape) for p in parse_caption(s.caption))
        assert tuple(parsed) == s.scene.key(), s.caption
        captions.add(s.caption)
    assert len(captions) == 300
    # variety: the same scene gets different wordings from different random streams
    scene = world.image_text(0).scene
    wordings = {caption(scene, np.random.default_rng(k)) for k in range(40)}
    assert len(wordings) > 30


def test_parse_caption_reads_counts_positions_and_missing_attributes():
    objs = parse_caption("Two red circles and a big blue square in the upper right.")
    assert [(o.shape, o.color, o.size, o.position) for o in objs] == [
        ("circle", "red", None, None), ("circle", "red", None, None), ("square", "blue", "large", "top right")]
    assert parse_caption("nothing to see here") == []
    # every position phrase maps to its own cell, longer phrases are not shadowed by shorter ones
    for pos, phrases in POSITION_PHRASES.items():
        for ph in phrases:
            assert [o.position for o in parse_caption(f"a small green diamond {ph}")] == [pos], ph


def _reference_answer(question, scene):
    """Answers a VQA question from the scene with independent regexes."""
    objs = scene.objects
    q = question.rstrip("?")
    where = {ph: pos for pos, phs in POSITION_PHRASES.items() for ph in phs}
    if q == "How many shapes are there":
        return NUMBER_WORDS[len(objs)]
    if m := re.fullmatch(r"How many (\w+) shapes are there", q):
        return NUMBER_WORDS[sum(o.color == m[1] for o in objs)]
    if m := re.fullmatch(r"How many (\w+)s are there", q):
        return NUMBER_WORDS[sum(o.shape == m[1] for o in objs)]
    if m := re.fullmatch(r"What color is the (\w+) (.+)", q):
        (o,) = [o for o in objs if o.shape == m[1] and o.position == where[m[2]]]
        return o.color
    if m := re.fullmatch(r"What shape is (.+)", q):
        (o,) = [o for o in objs if o.position == where[m[1]]]
        return o.shape
    if m := re.fullmatch(r"Where is the (\w+) (\w+)", q):
        (o,) = [o for o in objs if (o.color, o.shape) == (m[1], m[2])]
        return o.position
    m = re.fullmatch(r"Is the (\w+) (\w+) (left of|above) the (\w+) (\w+)", q)
    (a,) = [o for o in objs if (o.color, o.shape) == (m[1], m[2])]
    (b,) = [o for o in objs if (o.color, o.shape) == (m[4], m[5])]
    return "yes" if (a.col < b.col if m[3] == "left of" else a.row < b.row) else "no"


def test_vqa_answers_are_correct_and_cover_every_kind():
    world = ShapesWorld(seed=2)
    kinds = set()
    for i in range(200):
        s = world.image_text(i)
        for v in s.vqa:
            assert v.answer in v.choices
            assert _reference_answer(v.question, s.scene) == v.answer, v.question
            kinds.add(v.kind)
    assert kinds == {"count", "color", "shape", "position", "relation"}


def test_text_documents_vary_and_their_arithmetic_is_right():
    world = ShapesWorld(seed=0)
    docs = [world.text_document(i).text for i in range(200)]
    assert len(set(docs)) > 190 and all(len(d) > 20 for d in docs)
    sums = [m for d in docs for m in re.findall(r"(\d+) plus (\d+) equals (\d+)", d)]
    products = [m for d in docs for m in re.findall(r"(\d+) times (\d+) is (\d+)", d)]
    assert sums and products
    assert all(int(a) + int(b) == int(c) for a, b, c in sums)
    assert all(int(a) * int(b) == int(c) for a, b, c in products)
    assert any("Question:" in d for d in docs) and any("corners" in d for d in docs)


def test_agent_stories_in_documents_follow_the_dynamics():
    world = ShapesWorld(seed=1)
    stories = [d for d in (world.text_document(i).text for i in range(200)) if d.startswith("The agent starts")]
    assert len(stories) > 20
    step = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}
    walls = 0
    for story in stories:
        row, col = map(int, re.match(r"The agent starts in row (\d), column (\d)\.", story).groups())
        for sent in re.findall(r"It [^.]*\.", story):
            if m := re.fullmatch(r"It moves (\w+) to row (\d), column (\d)\.", sent):
                dc, dr = step[m[1]]
                row, col = row + dr, col + dc
                assert (row, col) == (int(m[2]), int(m[3])) and 1 <= row <= 7 and 1 <= col <= 7, story
            elif m := re.fullmatch(r"It tries to move (\w+) but the wall stops it\.", sent):
                dc, dr = step[m[1]]
                assert not (1 <= row + dr <= 7 and 1 <= col + dc <= 7), story
                walls += 1
            else:
                assert sent == "It stays where it is.", sent
    assert walls > 0


def _reflect(x0, v, lo, hi, t):
    """Closed-form position of a point bouncing between lo and hi (the unfolded path folded back)."""
    length = hi - lo
    u = np.mod(x0 - lo + v * t, 2 * length)
    return lo + np.where(u <= length, u, 2 * length - u)


def test_physics_matches_closed_form_bounces():
    rng = np.random.default_rng(0)
    pos = rng.uniform(5, 27, size=(3, 2))
    vel = rng.uniform(-3, 3, size=(3, 2))
    sides = np.array([5.0, 9.0, 5.0])
    states = physics_states(pos, vel, sides, 32, 60)
    t = np.arange(60)[:, None]
    for i in range(3):
        for axis in range(2):
            ref = _reflect(pos[i, axis], vel[i, axis], sides[i] / 2, 32 - sides[i] / 2, t[:, 0])
            np.testing.assert_allclose(states[:, i, axis], ref, atol=1e-9)


@pytest.mark.parametrize("image_size", [32, 64])
def test_physics_videos_keep_shapes_in_bounds_and_moving(image_size):
    world = ShapesWorld(seed=0, image_size=image_size, video_frames=16)
    for i in range(20):
        v = world.video(i)
        assert v.frames.shape == (16, image_size, image_size, 3)
        for t in range(16):
            expected = 0
            for j, o in enumerate(v.objects):
                side = size_pixels(image_size, o.size)
                x, y = v.centers[t, j]
                assert side / 2 <= x <= image_size - side / 2 and side / 2 <= y <= image_size - side / 2
                expected += shape_mask(o.shape, x, y, side, image_size)
            # every lit pixel belongs to a shape, and an unclipped shape keeps its full area
            assert np.array_equal(v.frames[t].any(-1), expected > 0)
        step = np.abs(np.diff(v.centers, axis=0)).max(axis=(0, 2))
        speed = np.abs(v.velocities).max(axis=1)
        assert np.all(step <= speed + 1.0 + 1e-9) and np.all(step > 0), "shapes must move at their speed"
        assert v.caption.endswith("bouncing off the walls.")


@pytest.mark.parametrize("image_size", [32, 64])
def test_action_videos_move_the_agent_exactly_per_action(image_size):
    world = ShapesWorld(seed=5, image_size=image_size)
    lat = world.lattice
    delta = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0), "stay": (0, 0)}
    moved = blocked = 0
    for i in range(25):
        a = world.action_video(i)
        assert len(a.actions) == len(a.frames) - 1 and a.context_frames == 4
        assert all(act in ACTIONS for act in a.actions)
        rgb = np.array(PALETTE[a.episode.agent.color])
        for t, act in enumerate(a.actions):
            # the agent's colour is its alone: its pixel bounding box gives its position
            prev, nxt = [np.argwhere((a.frames[k] == rgb).all(-1)) for k in (t, t + 1)]
            (y0, x0), (y1, x1) = prev.min(0), nxt.min(0)
            dx, dy = (x1 - x0) / lat.step, (y1 - y0) / lat.step
            want = np.array(delta[act])
            col, row = a.path[t]
            at_wall = not (0 <= col + want[0] < lat.k and 0 <= row + want[1] < lat.k)
            assert (dx, dy) == ((0, 0) if at_wall else tuple(want)), (i, t, act)
            moved += act != "stay" and not at_wall
            blocked += at_wall
    assert moved > 50 and blocked > 0


def test_actions_aliases_and_tokens():
    assert [canonical_action(a) for a in ("W", "a", "S", "d", "noop", " Up ")] == [
        "up", "left", "down", "right", "stay", "up"]
    with pytest.raises(ValueError, match="unknown action 'jump'"):
        canonical_action("jump")
    assert len(set(ACTION_TOKENS)) == len(ACTIONS) and all(a in t for a, t in zip(ACTIONS, ACTION_TOKENS))
    path_wasd = apply_actions((3, 3), list("wwaasdd"), 7)
    path_words = apply_actions((3, 3), ["up", "up", "left", "left", "down", "right", "right"], 7)
    assert np.array_equal(path_wasd, path_words) and tuple(path_words[-1]) == (3, 2)
    assert tuple(apply_actions((0, 0), ["up", "left"], 7)[-1]) == (0, 0)


def test_planning_task_candidates_are_simulated():
    world = ShapesWorld(seed=0)
    for i in range(10):
        p = world.planning_task(i, horizon=4, n_candidates=6)
        assert len(p.candidates) == 6 and p.reaches_goal.any()
        for cand, ok in zip(p.candidates, p.reaches_goal):
            assert (tuple(apply_actions(p.start, cand, world.lattice.k)[-1]) == p.goal) == ok


def test_config_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="image_size=48"):
        WorldConfig(image_size=48)
    with pytest.raises(ValueError, match="context_frames"):
        WorldConfig(context_frames=12, action_frames=12)
    with pytest.raises(ValueError, match="index"):
        ShapesWorld().image_text(-1)


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("codec", [None, "vp9", "mjpeg"])
def test_write_dataset_writes_parseable_files(tmp_path, codec):
    if codec is not None:
        av = pytest.importorskip("av", reason="PyAV is needed to encode video files")
    paths = write_dataset(tmp_path, seed=7, n_text=4, n_image=5, n_video=2, n_action=2, video_codec=codec)
    world = ShapesWorld(seed=7)
    text = _read_jsonl(paths["text"])
    assert [r["text"] for r in text] == [world.text_document(i).text for i in range(4)]
    images = _read_jsonl(paths["image_text"])
    assert len(images) == 5
    for i, r in enumerate(images):
        s = world.image_text(i)
        assert r["text"] == s.caption and np.array_equal(load_png(tmp_path / r["image"]), s.image)
    vqa = _read_jsonl(paths["vqa"])
    assert len(vqa) == 5 * world.config.vqa_per_image and all(r["answer"] in r["choices"] for r in vqa)
    for name, sample in (("video", world.video), ("action_video", world.action_video)):
        for i, r in enumerate(_read_jsonl(paths[name])):
            truth = sample(i)
            frames = np.stack([load_png(tmp_path / f) for f in r["frames"]])
            assert np.array_equal(frames, truth.frames) and r["text"] == truth.caption
            if codec is None:
                assert "video" not in r
            else:
                with av.open(str(tmp_path / r["video"])) as c:
                    decoded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
                assert decoded.shape == truth.frames.shape
                assert np.abs(decoded.astype(int) - truth.frames).mean() < 8  # lossy chroma, same content
            if name == "action_video":
                assert r["actions"] == truth.actions and len(r["actions"]) == len(r["frames"]) - 1
                assert r["context_frames"] == 4
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["counts"]["image_text"] == 5 and manifest["config"]["seed"] == 7
    assert not list(tmp_path.glob("*.tmp"))


def test_command_line_writes_a_dataset(tmp_path, capsys):
    from megafusion.data.shapes.export import main

    assert main(["--out", str(tmp_path), "--n-text", "2", "--n-image", "2", "--n-video", "1", "--n-action", "1",
                 "--video-codec", "none", "--image-size", "64"]) == 0
    assert "image_text" in capsys.readouterr().out
    (line,) = _read_jsonl(tmp_path / "action_video.jsonl")
    assert load_png(tmp_path / line["frames"][0]).shape == (64, 64, 3)


def test_vocabulary_is_consistent():
    assert len(set(PALETTE.values())) == len(COLORS) and len(SHAPES) == 4
    assert len({p for row in POSITIONS for p in row}) == 9
