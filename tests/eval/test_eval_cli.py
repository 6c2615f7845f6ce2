"""`megafusion eval` on a tiny Transfusion checkpoint trained here by `megafusion train`."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import run_train

TRAIN = ["train.steps=2", "schedule.warmup_steps=1", "train.global_batch_size=2", "model.seq_length=128"]
HEADLINED = ("generation", "captioning", "world_model", "planning", "perplexity")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny trained run per test session (same directory and settings as tests/inference)."""
    run_dir = tmp_path_factory.getbasetemp() / "tiny_transfusion_for_inference"
    if not (run_dir / "checkpoints").is_dir():
        run_train(run_dir, "tiny_transfusion.yaml", TRAIN)
    return run_dir


@pytest.fixture(scope="module")
def loaded(run_dir, cpu_layer):
    from megafusion.inference.loading import load_run

    with load_run(run_dir, device="cpu") as loaded:
        yield loaded


def test_eval_cli_writes_metrics_with_chance_levels(run_dir, loaded, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megafusion.eval.cli import main

    out = tmp_path / "eval"
    assert main(["--run-dir", str(run_dir), "--out", str(out), "--n", "3", "--steps", "2",
                 "--planning-candidates", "2", "--planning-n", "2", "--generation-n", "4"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["settings"]["n"] == 3 and metrics["settings"]["planning_n"] == 2
    assert metrics["settings"]["generation_n"] == 4
    assert set(metrics["headlines"]) == set(HEADLINED)
    for name, head in metrics["headlines"].items():
        assert head["chance"] is not None and math.isfinite(head["value"]), name
        assert head == metrics["results"][name]["headline"]
    results = metrics["results"]
    assert results["vqa"]["skipped"].startswith("not trained on this modality")
    assert results["generation"]["n"] == 4 and results["world_model"]["rollout"]["n"] == 3
    assert results["planning"]["candidates"] == 2 and results["planning"]["n"] == 2
    assert results["perplexity"]["chance_perplexity"] == 266.0  # the byte tokenizer's vocabulary
    assert (out / "generation_grid.png").is_file() and (out / "rollout_grid.png").is_file()
    # data.shapes_holdout = compositions (tiny_transfusion.yaml): the unseen split beside the seen one
    assert metrics["settings"]["splits"] == ["seen", "unseen"]
    held = metrics["settings"]["heldout_compositions"]
    assert len(held["color_shape"]) >= 1 and held["grid"] == 3  # tiny_transfusion: the full world
    for name in ("generation", "captioning", "world_model", "planning"):
        head = metrics["headlines"][name]
        assert math.isfinite(head["value_unseen"]) and head["chance_unseen"] is not None, name
        assert head["value_unseen"] == results[name]["unseen"]["headline"]["value"], name
    assert "value_unseen" not in metrics["headlines"]["perplexity"]
    assert results["generation"]["unseen"]["n"] == 4 and results["world_model"]["unseen"]["rollout"]["n"] == 3
    assert results["planning"]["unseen"]["n"] == 2
    # generation and captioning per kind of held-out composition: the items split among the kinds
    for name in ("generation", "captioning"):
        per_kind = results[name]["unseen"]["by_composition"]
        assert sum(r["n"] for r in per_kind.values()) == results[name]["unseen"]["n"], name
        assert set(per_kind) <= {"color_shape", "placement", "object_pair"} and len(per_kind) >= 2, name
        assert all(0 <= r["value"] <= 1 for r in per_kind.values()), name
    assert "by_composition" not in results["generation"]  # the seen split has no kinds
    assert (out / "generation_grid_unseen.png").is_file() and (out / "rollout_grid_unseen.png").is_file()

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "eval/perplexity/perplexity" in tags and "eval/generation/headline/value" in tags
    assert "eval/generation/unseen/headline/value" in tags and "eval/generation/headline/value_unseen" in tags
    assert events.Scalars("eval/perplexity/perplexity")[-1].step == 2


def test_untrained_modalities_are_reported_not_dropped(loaded, tmp_path):
    from megafusion.eval.cli import evaluate
    from megafusion.inference.generate import Generator, SamplingOptions

    weights = {"text": 1.0, "image_text": 1.0, "video": 0.0, "action_video": 0.0}
    cfg = replace(loaded.cfg, data=replace(loaded.cfg.data, shapes_weights=weights))
    metrics = evaluate(Generator.from_run(loaded), cfg, tmp_path, n=2, opts=SamplingOptions(steps=1),
                       caption_first_prob=1.0, log=lambda _: None)
    for name in ("captioning", "world_model", "planning", "vqa"):
        assert metrics["results"][name]["skipped"].startswith("not trained on this modality"), name
    assert set(metrics["headlines"]) == {"generation", "perplexity"}


def test_no_unseen_split_when_training_held_nothing_out(loaded, tmp_path):
    from megafusion.eval.cli import evaluate, results_table
    from megafusion.inference.generate import Generator, SamplingOptions

    gen = Generator.from_run(loaded)
    gen.world_config = replace(gen.world_config, holdout="none")  # data.shapes_holdout = none
    metrics = evaluate(gen, loaded.cfg, tmp_path, n=2, opts=SamplingOptions(steps=1), log=lambda _: None,
                       only=("generation", "perplexity"))
    assert metrics["settings"]["splits"] == ["seen"] and metrics["settings"]["heldout_compositions"] is None
    assert "unseen" not in metrics["results"]["generation"]
    assert "value_unseen" not in metrics["headlines"]["generation"]
    assert not (tmp_path / "generation_grid_unseen.png").exists()
    assert results_table(metrics["results"])[1].split() == ["evaluation", "metric", "value", "chance", "seconds"]


def test_only_runs_the_requested_evaluations(run_dir, tmp_path):
    from megafusion.eval.cli import main

    out = tmp_path / "eval"
    assert main(["--run-dir", str(run_dir), "--out", str(out), "--n", "2", "--steps", "1",
                 "--only", "world_model,perplexity", "--no-tensorboard"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["headlines"]) == {"world_model", "perplexity"}
    for name in ("generation", "captioning", "vqa", "planning"):
        assert metrics["results"][name] == {"skipped": "not requested (--only)"}, name
    assert metrics["results"]["world_model"]["rollout"]["n"] == 2
    assert main(["--run-dir", str(run_dir), "--out", str(out), "--only", "world_models"]) == 2  # a typo is an error


def test_evaluate_run_is_the_cli_as_a_typed_function(run_dir, tmp_path):
    """evaluate_run(EvalOptions(...)) does what the flags do, returns the metrics it writes."""
    from megafusion.eval.cli import EvalOptions, evaluate_run

    out = tmp_path / "eval"
    metrics = evaluate_run(EvalOptions(run_dir=run_dir, out=out, n=2, steps=1, only=("perplexity",),
                                       tensorboard=False))
    assert set(metrics["headlines"]) == {"perplexity"} and metrics["step"] == 2
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))


def test_eval_options_mirror_the_flags_and_refuse_what_the_cli_refuses(tmp_path, capsys):
    from megafusion.eval.cli import EvalError, EvalOptions, build_parser, evaluate_run, main

    # every field's default is the flag's default
    assert EvalOptions.from_args(build_parser().parse_args(["--run-dir", "r"])) == EvalOptions(run_dir="r")
    flags = ["--run-dir", "r", "--out", "o", "--step", "4", "--n", "5", "--steps", "3", "--sampler", "heun",
             "--cfg", "1.5", "--shift", "2", "--frame-shift", "4", "--planning-candidates", "3", "--planning-n", "2",
             "--generation-n", "6", "--seed", "7", "--world", "m.json", "--only", "vqa, perplexity",
             "--device", "cpu", "--no-tensorboard"]
    assert EvalOptions.from_args(build_parser().parse_args(flags)) == EvalOptions(
        run_dir="r", out="o", step=4, n=5, steps=3, sampler="heun", cfg=1.5, shift=2.0, frame_shift=4.0,
        planning_candidates=3, planning_n=2, generation_n=6, seed=7, world="m.json", only=("vqa", "perplexity"),
        device="cpu", tensorboard=False)
    for bad in (dict(n=1), dict(generation_n=1), dict(only=("world_models",)), dict(only=()), dict(steps=0),
                dict(planning_candidates=1), dict(planning_n=0), dict(shift=0.0), dict(frame_shift=float("nan")),
                dict(cfg=float("inf")), dict(sampler="rk4")):
        with pytest.raises(EvalError):
            EvalOptions(run_dir="r", **bad)
    with pytest.raises(EvalError, match="not a directory|does not exist"):
        evaluate_run(EvalOptions(run_dir=tmp_path / "missing"))
    assert main(["--run-dir", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("megafusion eval: ")


def test_perplexity_matches_the_models_training_loss(loaded):
    """Held-out perplexity from the generator's log-probs equals exp(mean CE) of the model's own
    (vocab-parallel) training loss on the same tokens."""
    from megafusion.eval.text import heldout_documents, perplexity
    from megafusion.inference.generate import Generator
    from megafusion.model.mask import HybridMaskInfo

    gen = Generator.from_run(loaded)
    docs = heldout_documents(2)
    result = perplexity(docs, gen.text_logprobs, vocab_size=gen.tokenizer.vocab_size)
    ce_sum, count = 0.0, 0
    for doc in docs:
        ids = (gen.tokenizer.encode(doc) + [gen.tokenizer.eod_id])[: loaded.cfg.model.seq_length]
        tokens = torch.tensor(ids[:-1])[None]
        labels = torch.tensor(ids[1:])[None]
        mask = HybridMaskInfo(torch.zeros_like(tokens), torch.full_like(tokens, -1)).as_tensor()
        with torch.no_grad():
            ce, _ = loaded.model(tokens, torch.arange(tokens.shape[1])[None], mask, labels=labels)
        ce_sum += float(ce.double().sum())
        count += ce.numel()
    assert result["tokens"] == count
    assert result["perplexity"] == pytest.approx(math.exp(ce_sum / count), rel=1e-5)


def test_vqa_answer_is_the_most_likely_candidate(loaded):
    """The VQA protocol scores every candidate's " answer." after image + question and takes
    the best: checked against the same log-probabilities from a full uncached forward."""
    from megafusion.data.shapes import ShapesWorld, vqa_prompt
    from megafusion.eval.cli import answer_question
    from megafusion.inference.generate import Chunk, Generator

    gen = Generator.from_run(loaded)
    s = ShapesWorld(seed=3).image_text(0)
    q = s.vqa[0]
    tok = gen.tokenizer
    latents = gen.encode_images(s.image[None])[0]
    scores = []
    for choice in q.choices:
        state = gen.new_state(use_cache=False)
        prefix = [tok.eoi_id] + tok.encode(vqa_prompt(q.question))
        ids = tok.encode(f"{choice}.")
        logits = state.run(Chunk.cat([gen.text_chunk([tok.boi_id]), gen.latent_chunk(latents, 0.0, 0),
                                      gen.text_chunk(prefix + ids)]))[0]
        logp = torch.log_softmax(logits[-len(ids) - 1:-1].double(), -1)
        scores.append(float(logp.gather(1, torch.tensor(ids)[:, None]).sum()))
    assert answer_question(gen, s.image, q.question, q.choices) == q.choices[max(range(len(scores)),
                                                                                 key=scores.__getitem__)]


def test_indexed_runs_read_their_sources_from_dataset_names(loaded):
    from megafusion.eval.cli import trained_sources

    paths = ["d/text_text_document", "d/image_text", "d/vqa", "d/video", "d/action_video"]
    data = replace(loaded.cfg.data, kind="indexed", paths=paths, weights=[0.5, 2.0, 1.0, 0.0, 0.0])
    got = trained_sources(replace(loaded.cfg, data=data))
    assert got == {"text": 0.5, "image_text": 2.0, "vqa": 1.0, "video": 0.0, "action_video": 0.0}
    data = replace(data, paths=["d/my_corpus", *paths[1:]])  # a name it cannot read: all but VQA count
    assert trained_sources(replace(loaded.cfg, data=data)) == {
        "text": 1.0, "image_text": 1.0, "vqa": 0.0, "video": 1.0, "action_video": 1.0}


def test_rollout_prompts_in_the_training_layout_frame_after_each_action(loaded):
    from megafusion.data.shapes import ShapesWorld
    from megafusion.inference.generate import Generator, SamplingOptions

    gen = Generator.from_run(loaded)
    a = ShapesWorld(seed=0, action_frames=4, context_frames=1).action_video(0)
    seen = []
    original = gen.sample_latents

    def spy(state, opts, modality, rng):  # the prompt each new frame is sampled after
        seen.append(state.tokens[-3:])
        return original(state, opts, modality=modality, rng=rng)

    gen.sample_latents = spy
    frames = gen.rollout(a.frames[:1], a.actions, a.caption, SamplingOptions(steps=1, cfg_scale=1.0))
    tok = gen.tokenizer
    assert frames.shape == (3, 32, 32, 3) and frames.dtype == np.uint8
    assert [s[1:] for s in seen] == [[tok.frame_id, tok.boi_id]] * 3
    assert [s[0] for s in seen] == [tok.encode_action(x)[0] for x in a.actions]


def test_a_step_without_checkpoint_is_refused_with_the_steps_there_are(run_dir, tmp_path, capsys):
    """`--step` naming no checkpoint: one line with the steps there are, exit 2 (eval and generate)."""
    from megafusion.eval.cli import main as eval_main
    from megafusion.inference.cli import main as generate_main

    for main, prog, extra in ((eval_main, "eval", ["--out", str(tmp_path / "e")]),
                              (generate_main, "generate", ["--prompt", "x", "--out", str(tmp_path / "g")])):
        assert main(["--run-dir", str(run_dir), "--step", "7", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"megafusion {prog}: ") and "no checkpoint for step 7; available steps: [2]" in err


def test_eval_prints_progress_and_a_results_table(run_dir, tmp_path, caplog):
    import logging

    from megafusion.eval.cli import EvalOptions, evaluate_run, results_table

    with caplog.at_level(logging.INFO, logger="megafusion.eval.cli"):
        evaluate_run(EvalOptions(run_dir=run_dir, out=tmp_path / "e", n=4, steps=1,
                                 only=("world_model", "perplexity"), tensorboard=False))
    lines = [r.getMessage() for r in caplog.records if r.name == "megafusion.eval.cli"]
    assert "[eval 1/2] world_model ..." in lines and "[eval 2/2] perplexity ..." in lines
    assert [line for line in lines if line.startswith("[eval] world_model: ") and "/4 rollouts" in line] == [
        "[eval] world_model: 1/4 rollouts", "[eval] world_model: 2/4 rollouts", "[eval] world_model: 3/4 rollouts"]
    assert "[eval] world_model unseen: 1/4 rollouts" in lines
    table = lines[lines.index("[eval] results:"):]
    assert table[1].split() == ["evaluation", "metric", "seen", "chance", "unseen", "chance_unseen", "seconds"]
    assert table[2].split()[:2] == ["world_model", "agent_position_accuracy"] and len(table[2].split()) == 7
    assert table[3].split()[2:] and table[3].split()[4:6] == ["-", "-"]  # perplexity: one split
    assert table[3].split()[:2] == ["perplexity", "perplexity"]
    assert any("generation: not requested (--only)" in line for line in table)
    assert results_table({"vqa": {"skipped": "why"}}) == [
        "[eval] results:", "  evaluation  metric  value  chance  seconds", "  vqa: why"]
