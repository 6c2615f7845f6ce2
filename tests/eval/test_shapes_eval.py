"""Exact ShapesWorld evaluators: the detector reads renders exactly, every scorer gives 1
for the truth and about its own chance level for random guesses, and chance levels match
independent analytic values."""

import json
import math

import numpy as np
import pytest

from megafusion.data.shapes import VQA, Scene, ShapeObject, ShapesWorld
from megafusion.data.shapes.scene import render_objects
from megafusion.data.shapes.video import apply_actions
from megafusion.eval.shapes import (agent_position, detect, flatten_results, score_agent_positions,
                                    score_captions, score_generation, score_planning, score_rollout, score_vqa,
                                    world_model_plan_scorer)
from megafusion.eval.text import heldout_documents, perplexity


def _key(detections):
    return tuple(sorted((d.position, d.size, d.color, d.shape) for d in detections))


@pytest.mark.parametrize("image_size,seeds,n", [(32, (0, 1, 2), 120), (64, (3,), 60)])
def test_detector_reads_ground_truth_renders_exactly(image_size, seeds, n):
    for seed in seeds:
        world = ShapesWorld(seed=seed, image_size=image_size)
        for i in range(n):
            s = world.image_text(i)
            dets = detect(s.image)
            assert _key(dets) == s.scene.key(), (seed, i)
            for d in dets:  # centres are exact too
                (o,) = [o for o in s.scene.objects if (o.row, o.col) == (d.row, d.col)]
                assert (d.x, d.y) == (o.x, o.y) and d.match == pytest.approx(1.0)


def test_detector_tolerates_colour_noise_and_accepts_float_images():
    world = ShapesWorld(seed=9)
    rng = np.random.default_rng(0)
    for i in range(40):
        s = world.image_text(i)
        noisy = np.clip(s.image + rng.normal(0, 12, s.image.shape), 0, 255).astype(np.uint8)
        assert _key(detect(noisy)) == s.scene.key()
        assert _key(detect(s.image / 255.0)) == s.scene.key()


def _binomial_blur(image):
    """[1, 2, 1] / 4 along each axis (about a Gaussian of sigma 0.7 px), edges replicated."""
    a = np.pad(image.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="edge")
    a = (a[:-2] + 2 * a[1:-1] + a[2:]) / 4
    return (a[:, :-2] + 2 * a[:, 1:-1] + a[:, 2:]) / 4


@pytest.mark.parametrize("image_size", [32, 64])
def test_detector_reads_soft_edged_images_like_a_generator_makes(image_size):
    world = ShapesWorld(seed=11, image_size=image_size)
    rng = np.random.default_rng(0)
    samples = [world.image_text(i) for i in range(60)]
    soft = [np.clip(_binomial_blur(s.image) + rng.normal(0, 8, s.image.shape), 0, 255).astype(np.uint8)
            for s in samples]
    r = score_generation(soft, [s.scene for s in samples], chance_samples=1)
    assert r["count"] >= 0.98 and r["correct"] >= 0.95, r


def test_generation_scores_renders_perfectly_and_noise_at_most_chance():
    world = ShapesWorld(seed=0)
    samples = [world.image_text(i) for i in range(60)]
    images = [s.image for s in samples]
    for prompts in ([s.caption for s in samples], [s.scene for s in samples]):
        r = score_generation(images, prompts)
        assert all(r[k] == 1.0 for k in ("count", "objects", "sizes", "positions", "attributes", "correct"))
    # count chance, analytically: counts are uniform on 1..4, so P(random count == prompt count) = 1/4
    assert abs(r["chance"]["count"] - 0.25) < 0.06
    assert 0 <= r["chance"]["correct"] <= r["chance"]["positions"] <= r["chance"]["objects"] < r["chance"]["count"]
    assert r["chance"]["objects"] > 0
    rng = np.random.default_rng(1)
    noise = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in samples]
    rn = score_generation(noise, [s.caption for s in samples])
    assert rn["correct"] == 0.0
    for k in ("count", "objects", "positions"):
        assert rn[k] <= r["chance"][k] + 0.05, k
    json.dumps(rn)  # JSON-ready


def test_generation_partial_prompts_and_wrong_images():
    S = 32
    two_red = render_objects([ShapeObject("circle", "red", "small", 5.5, 5.5, 0, 0),
                              ShapeObject("circle", "red", "large", 26.5, 26.5, 2, 2)], S)
    r = score_generation([two_red] * 4, ["two red circles", "three red circles", "a red circle and a blue square",
                                         "a red circle in the top left and a large red circle at the bottom right"])
    rows = [score_generation([two_red], [p]) for p in ("two red circles", "three red circles",
                                                        "a red circle and a blue square")]
    assert rows[0]["correct"] == 1.0 and rows[1]["count"] == 0.0 and rows[2]["objects"] == 0.0
    assert r["correct"] == 0.5
    # a wrong colour fails objects but not the count
    wrong = render_objects([ShapeObject("circle", "blue", "small", 5.5, 5.5, 0, 0)], S)
    rw = score_generation([wrong], ["a small red circle at the top left"])
    assert rw["count"] == 1.0 and rw["objects"] == 0.0 and rw["correct"] == 0.0


def test_caption_scores_truth_wrong_attributes_and_chance():
    world = ShapesWorld(seed=4)
    samples = [world.image_text(i) for i in range(80)]
    scenes = [s.scene for s in samples]
    r = score_captions([s.caption for s in samples], scenes)
    assert all(r[k] == 1.0 for k in ("exact", "count", "f1", "color", "shape", "size"))
    # captions of other scenes score about chance (both are "a random caption from the prior")
    shuffled = score_captions([samples[(i + 1) % 80].caption for i in range(80)], scenes)
    for k in ("count", "color", "shape", "size", "f1"):
        assert abs(shuffled[k] - r["chance"][k]) < 0.12, k
    # one object, wrong colour: shape/size/position right, colour and exact wrong
    o = ShapeObject("square", "red", "large", 16.5, 16.5, 1, 1)
    one = score_captions(["A big blue square in the middle."], [Scene(32, (o,))])
    assert (one["color"], one["shape"], one["size"], one["exact"], one["count"]) == (0.0, 1.0, 1.0, 0.0, 1.0)
    assert one["f1"] == 0.0


def test_vqa_accuracy_normalisation_and_analytic_chance():
    world = ShapesWorld(seed=5)
    items = [v for i in range(300) for v in world.image_text(i).vqa]
    assert score_vqa([v.answer for v in items], items)["accuracy"] == 1.0
    rng = np.random.default_rng(0)
    guesses = [v.choices[rng.integers(len(v.choices))] for v in items]
    r = score_vqa(guesses, items)
    expected_chance = np.mean([1 / len(v.choices) for v in items])
    assert r["chance"] == pytest.approx(expected_chance)
    assert abs(r["accuracy"] - r["chance"]) < 0.04  # 1200 guesses: ~4 standard errors
    for kind, row in r["per_kind"].items():
        assert row["chance"] == pytest.approx({"count": 1 / 10, "color": 1 / 6, "shape": 1 / 4,
                                               "position": 1 / 9, "relation": 1 / 2}[kind])
    # answers written differently still count
    forms = [VQA("q", "two", ("x",), "count"), VQA("q", "top left", ("x",), "position"),
             VQA("q", "center", ("x",), "position")]
    assert score_vqa(["2", "The upper-left corner.", "middle"], forms)["accuracy"] == 1.0
    assert score_vqa(["3", "top right", "left"], forms)["accuracy"] == 0.0


def test_rollout_error_known_answers_and_baselines():
    world = ShapesWorld(seed=0)
    samples = [world.action_video(i) for i in range(6)]
    c = samples[0].context_frames
    clips = np.stack([s.frames for s in samples])
    truth = clips[:, c:]
    r = score_rollout(truth, clips, c)
    assert r["next_frame_mse"] == 0.0 and r["rollout_mse"] == 0.0 and r["steps"] == len(clips[0]) - c
    shifted = np.clip(truth / 255.0 + 0.1, 0, None)  # float predictions, exactly 0.1 off everywhere
    assert score_rollout(shifted, clips, c)["rollout_mse"] == pytest.approx(0.01)
    copy = np.repeat(clips[:, c - 1:c], truth.shape[1], axis=1)
    rc = score_rollout(copy, clips, c)
    assert rc["mse_per_step"] == pytest.approx(rc["copy_last_mse_per_step"]) and rc["rollout_mse"] > 0
    assert r["chance_mse"] > r["copy_last_mse"] > 0
    with pytest.raises(ValueError, match="does not fit"):
        score_rollout(truth[:, :3], clips[:, :5], c)


def test_agent_position_accuracy_truth_copy_and_chance():
    world = ShapesWorld(seed=1)
    samples = [world.action_video(i) for i in range(8)]
    c = samples[0].context_frames
    truth = np.stack([s.frames[c:] for s in samples])
    r = score_agent_positions(truth, samples)
    assert r["accuracy"] == 1.0 and r["chance"] == pytest.approx(1 / world.lattice.k ** 2)
    copy = np.stack([np.repeat(s.frames[c - 1:c], len(s.frames) - c, axis=0) for s in samples])
    rc = score_agent_positions(copy, samples)
    assert rc["accuracy"] == pytest.approx(rc["copy_last"]) and rc["copy_last"] < 1.0
    blank = np.zeros_like(truth)
    assert score_agent_positions(blank, samples)["accuracy"] == 0.0
    # the agent is found at every lattice point, whatever the distractors
    ep = samples[0].episode
    for col in range(world.lattice.k):
        for row in range(world.lattice.k):
            assert agent_position(ep.render(np.array([[col, row]]))[0], ep) == (col, row)


def test_planning_with_a_perfect_world_model_and_with_a_blind_one():
    world = ShapesWorld(seed=2)
    tasks = [world.planning_task(i, horizon=4, n_candidates=8) for i in range(40)]

    def perfect_model(task):
        def predict(start_frame, actions):
            start = agent_position(start_frame, task.episode)
            return task.episode.render(apply_actions(start, actions, world.lattice.k))[-1]
        return world_model_plan_scorer(predict)

    assert all(score_planning([t], perfect_model(t))["success"] == 1.0 for t in tasks)
    chance = np.mean([t.reaches_goal.mean() for t in tasks])
    rng = np.random.default_rng(0)
    blind = score_planning(tasks, lambda s, g, cands: rng.random(len(cands)))
    assert blind["chance"] == pytest.approx(chance) and 1 / 8 <= chance < 0.5
    assert blind["success"] < 0.5
    with pytest.raises(ValueError, match="candidates"):
        score_planning(tasks[:1], lambda s, g, cands: [0.0])


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    docs = heldout_documents(5)
    assert docs == heldout_documents(5) and docs != [ShapesWorld(0).text_document(i).text for i in range(5)]
    vocab = 64
    r = perplexity(docs, lambda text: [-math.log(vocab)] * len(text), vocab_size=vocab)
    assert r["perplexity"] == pytest.approx(vocab) and r["chance_perplexity"] == vocab
    assert r["tokens"] == sum(len(d) for d in docs)
    assert r["bits_per_byte"] == pytest.approx(math.log2(vocab))  # one ASCII byte per token
    # a model that is sure half the time and uniform otherwise: ppl = exp(mean nll)
    half = perplexity(["ab"], lambda text: [0.0, -math.log(vocab)])
    assert half["perplexity"] == pytest.approx(math.sqrt(vocab))
    with pytest.raises(ValueError, match="log p <= 0"):
        perplexity(["x"], lambda text: [0.5])


def test_every_result_is_json_ready_with_a_headline_and_its_chance():
    world = ShapesWorld(seed=6)
    imgs = [world.image_text(i) for i in range(4)]
    acts = [world.action_video(i) for i in range(3)]
    c = acts[0].context_frames
    rollouts = np.stack([a.frames[c:] for a in acts])
    results = {
        "generation": score_generation([s.image for s in imgs], [s.caption for s in imgs], chance_samples=2),
        "captions": score_captions([s.caption for s in imgs], [s.scene for s in imgs], chance_samples=2),
        "vqa": score_vqa([v.answer for s in imgs for v in s.vqa], [v for s in imgs for v in s.vqa]),
        "rollout": score_rollout(rollouts, np.stack([a.frames for a in acts]), c),
        "agent": score_agent_positions(rollouts, acts),
        "planning": score_planning([world.planning_task(0)], lambda s, g, cands: np.zeros(len(cands))),
        "text": perplexity(["abc"], lambda t: [-1.0] * 3, vocab_size=10),
    }
    for name, r in results.items():
        h = r["headline"]
        assert h["chance"] is not None and np.isfinite(h["value"]), name
        assert json.loads(json.dumps(r)) == r, name
    flat = flatten_results(results)
    assert flat["vqa/accuracy"] == 1.0 and flat["rollout/mse_per_step/1"] == 0.0
    assert flat["generation/chance/count"] == results["generation"]["chance"]["count"]
    assert not any(k.endswith("chance_method") or k.endswith("higher_is_better") for k in flat)
