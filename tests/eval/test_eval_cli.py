"""`megafusion eval` on a tiny Transfusion checkpoint trained here by `megafusion train`."""

import json
import math
from dataclasses import replace

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
def loaded(run_dir):
    from megafusion.inference.loading import close, load_run

    loaded = load_run(run_dir, device="cpu")
    yield loaded
    close()


def test_eval_cli_writes_metrics_with_chance_levels(run_dir, loaded, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megafusion.eval.cli import main

    out = tmp_path / "eval"
    assert main(["--run-dir", str(run_dir), "--out", str(out), "--n", "2", "--steps", "2",
                 "--planning-candidates", "2"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["settings"]["n"] == 2
    assert set(metrics["headlines"]) == set(HEADLINED)
    for name, head in metrics["headlines"].items():
        assert head["chance"] is not None and math.isfinite(head["value"]), name
        assert head == metrics["results"][name]["headline"]
    results = metrics["results"]
    assert results["vqa"]["skipped"].startswith("not trained on this modality")
    assert results["generation"]["n"] == 2 and results["world_model"]["rollout"]["n"] == 2
    assert results["planning"]["candidates"] == 2
    assert results["perplexity"]["chance_perplexity"] == 266.0  # the byte tokenizer's vocabulary
    assert (out / "generation_grid.png").is_file() and (out / "rollout_grid.png").is_file()

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "eval/perplexity/perplexity" in tags and "eval/generation/headline/value" in tags
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
