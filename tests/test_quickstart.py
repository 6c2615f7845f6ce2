"""A shortened quickstart runs end to end, with its --full comparisons, and leaves artifacts
that parse."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO


def test_quick_quickstart_writes_report_and_eval(tmp_path):
    out = tmp_path / "qs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "megafusion.cli", "quickstart", "--quick", "--out", str(out),
                           "--device", "cpu", "--compare", "synergy,moe,latents"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for stage in range(1, 6):
        assert f"[quickstart {stage}/5]" in proc.stdout

    # data made by the tools, a trained run, an evaluation, a report
    assert (out / "data" / "tokenizer.model").is_file()
    assert (out / "data" / "indexed" / "image_text.bin").is_file()
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6 and "loss_text" in records[-1]
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    headlines = metrics["headlines"]
    assert {"generation", "captioning", "vqa", "world_model", "perplexity"} <= set(headlines)
    assert metrics["settings"]["training_sources"]["vqa"] > 0  # VQA documents were trained on
    from megafusion.quickstart import EVAL_CFG, EVAL_SHIFT

    settings = metrics["settings"]  # the quickstart's sampling, not the run's training shifts
    sampled = (settings["cfg_scale"], settings["image_shift"], settings["frame_shift"])
    assert sampled == (EVAL_CFG, EVAL_SHIFT, EVAL_SHIFT)
    assert all("chance" in h and "value" in h for h in headlines.values())
    report = (out / "report.md").read_text()
    assert "loss_curves.png" in report and "| evaluation | metric | seen | unseen | chance (seen / unseen) |" in report
    assert "| perplexity | perplexity |" in report
    # the data held the simple world's compositions out; the evaluation scored them as the unseen split
    manifest = json.loads((out / "data" / "raw" / "manifest.json").read_text())
    assert manifest["config"]["holdout"] == "compositions" and manifest["holdout_compositions"]
    assert settings["splits"] == ["seen", "unseen"]
    for name in ("generation", "captioning", "vqa", "world_model"):
        assert "value_unseen" in headlines[name], name
    assert "![generation_grid_unseen](eval/generation_grid_unseen.png)" in report
    assert f"guidance {EVAL_CFG:g}, time shift {EVAL_SHIFT:g} (images) / {EVAL_SHIFT:g} (frames)" in report
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the comparisons: each variant trained and evaluated, one table per trend
    image_only = json.loads((out / "trends" / "synergy" / "image_only" / "eval" / "metrics.json").read_text())
    sources = image_only["settings"]["training_sources"]
    assert sources["text"] == sources["video"] == sources["action_video"] == 0 and sources["image_text"] > 0
    assert {"world_model", "planning"} <= {k for k, r in image_only["results"].items() if "skipped" in r}
    moe_records = [json.loads(line) for line in
                   (out / "trends" / "moe" / "moe" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "moe/specialization" in moe_records[-1]
    from megafusion.quickstart import Variant, _image_only_weights

    image_steps = Variant("image_only", (), *_image_only_weights()).steps(6)  # as many image documents as 6 steps
    assert image_steps < 6
    assert "### synergy" in report and f"| image_only | {image_steps} |" in report and "| multimodal | 6 |" in report
    # the dense variant is the main run, reused rather than trained again
    cells = {line.split("|")[1].strip(): line.split("|")[2:] for line in report.splitlines() if line.startswith("| ")}
    assert not (out / "trends" / "moe" / "dense").exists()
    assert cells["dense"] == cells["multimodal"]
    assert cells["dense"][1].strip() == (f"{headlines['generation']['value']:.4g} "
                                         f"(unseen {headlines['generation']['value_unseen']:.4g})")
    assert "### moe" in report and "| 0 | " in report.split("### moe")[1]  # routing row of layer 0
    assert (out / "moe_routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # latents: the pixel run is the main run; the RAE was built here and its run trained on its latents
    assert cells["pixel"] == cells["multimodal"] and "| rae | 6 |" in report
    assert "The RAE was built here" in report.split("### latents")[1]
    rae_vision = yaml.safe_load((out / "trends" / "latents" / "rae" / "run" / "config.yaml").read_text())["vision"]
    assert rae_vision["representation"] == "rae"
    assert (Path(rae_vision["path"]) / "representation.json").is_file()
    assert (out / "data" / "indexed_rae" / "image_text.bin").is_file()
    rae_eval = json.loads((out / "trends" / "latents" / "rae" / "eval" / "metrics.json").read_text())
    assert "generation" in rae_eval["headlines"]


def test_latents_comparison_without_transformers_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    from megafusion import quickstart

    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(SystemExit) as exit_info:
        quickstart.main(["--quick", "--out", str(tmp_path / "qs"), "--compare", "latents"])
    assert exit_info.value.code == 2
    assert "pip install -e '.[rae]'" in capsys.readouterr().err
    assert not (tmp_path / "qs").exists()


@pytest.mark.parametrize("error, code", [
    ("preempted", 143), ("non_finite", 3), ("checkpoint", 2)])
def test_training_stops_end_the_quickstart_with_trains_exit_codes(tmp_path, monkeypatch, capsys, error, code):
    """A stop signal, a NaN or an unloadable checkpoint inside the quickstart's training is one
    line and `megafusion train`'s exit code, not a traceback (it called train() directly)."""
    from megafusion import quickstart
    from megafusion.training.checkpoint import CheckpointError
    from megafusion.training.guards import NonFiniteGradientError
    from megafusion.training.preemption import Preempted

    raised = {"preempted": Preempted("SIGTERM", 7), "non_finite": NonFiniteGradientError("NaN gradient at step 7"),
              "checkpoint": CheckpointError("no checkpoint verifies")}[error]

    def prepare_data(*args, **kwargs):
        raise raised

    monkeypatch.setattr(quickstart, "prepare_data", prepare_data)
    assert quickstart.main(["--quick", "--out", str(tmp_path / "qs")]) == code
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"megafusion quickstart: {raised}"]


# --------------------------------------------------------------------------- the recipe as data
# The quickstart's training overrides as quickstart.py built them in Python before its recipe
# moved to megafusion/configs/quickstart.yaml (commit c6552e1), on examples/configs/tiny_transfusion.yaml:
# the reference the YAML must resolve to, field for field.
def _reference_overrides(vocab: int, prefixes: dict, steps: int, device: str, tokenizer: str,
                         data_weights: dict) -> list[str]:
    paths = ", ".join(str(p) for p in prefixes.values())
    weights = ", ".join(str(data_weights[name]) for name in prefixes)
    return [
        f"model.vocab_size={vocab}", "data.kind=indexed", f"data.paths=[{paths}]", f"data.weights=[{weights}]",
        "diffusion.time_shift=10.0", "diffusion.loss_weight=10.0", "diffusion.clean_fraction=1.0",
        "diffusion.clean_t_max=0.25", "model.image_positions=3d", "model.time_conditioning=additive",
        "model.frame_positions=1d", "model.patch_positions=learned", "model.patch_position_init_std=3.0",
        "diffusion.frame_clean_fraction=0.5", "model.frame_conditioning=window", "model.action_conditioning=embedding",
        "diffusion.frame_time_shift=30.0", "model.hidden_size=128", "model.ffn_hidden_size=256",
        "train.global_batch_size=8", "train.micro_batch_size=8", f"data.tokenizer={tokenizer}",
        "vision.image_size=32", "vision.patch_size=8", f"train.steps={steps}", f"train.device={device}",
        f"checkpoint.every={max(steps // 2, 1)}",
        "logging.console_every=50",  # added since: console output only (metrics.jsonl keeps every step)
        # added since: tiny_transfusion.yaml holds compositions out of its in-process data; the
        # quickstart's indexed data holds them out in its files (--holdout), the config keeps none
        "data.shapes_holdout=none",
        # added since: validate refuses ShapesWorld settings with indexed data (they never reached
        # the run); the recipe dropped tiny_transfusion.yaml's mixture, so the default is kept
        "data.shapes_weights={text: 1.0, image_text: 1.0, video: 0.0, action_video: 0.0}",
    ]


REFERENCE_WEIGHTS = {"text": 0.5, "image_text": 4.0, "vqa": 1.0, "video": 0.3, "action_video": 1.0}


class _FakeTokenizer:
    """Stands for the trained sentencepiece model: only its vocabulary size is read."""

    def __init__(self, path):
        self.vocab_size = 500  # padded to 512, as the quickstart's trained tokenizer


def _variants_and_runs():
    from megafusion.quickstart import MOE, SCALES, _image_only_weights

    image_only, _ = _image_only_weights()
    return [  # (steps, device, data weights, --set of the user, variant overrides)
        (SCALES["default"].steps, "auto", None, (), ()),
        (SCALES["quick"].steps, "cpu", None, (), ()),
        (SCALES["full"].steps, "cuda", None, ("model.hidden_size=64",), ()),
        (5, "cpu", image_only, (), ()),
        (6, "cpu", None, (), MOE),
        (6, "cpu", None, (), ("vision.representation=rae", "vision.path=/some/rae")),
    ]


@pytest.mark.parametrize("case", range(6))
def test_recipe_yaml_resolves_to_the_quickstarts_config_of_before(case, monkeypatch):
    """megafusion/configs/quickstart.yaml, with the per-run keys, gives the very config the
    quickstart trained with when its overrides were Python strings (every field)."""
    import megafusion.data.tokenizer
    from megafusion import quickstart
    from megafusion.config import load_config

    from conftest import CONFIGS

    monkeypatch.setattr(megafusion.data.tokenizer, "Tokenizer", _FakeTokenizer)
    steps, device, weights, user, variant = _variants_and_runs()[case]
    prefixes = {name: Path(f"/data/indexed/{name}") for name in quickstart.DATASETS}
    tokenizer = Path("/data/tokenizer.model")
    reference = load_config(CONFIGS / "tiny_transfusion.yaml",
                            _reference_overrides(512, prefixes, steps, device, str(tokenizer),
                                                 weights or REFERENCE_WEIGHTS) + [*user, *variant]).to_dict()
    assert quickstart.DATA_WEIGHTS == REFERENCE_WEIGHTS
    built = quickstart.training_config(tokenizer, prefixes, steps, device, weights, [*user, *variant])
    assert built.to_dict() == reference
    # the same config as --set strings only (what train_overrides gives other tests)
    as_sets = quickstart.train_overrides(tokenizer, prefixes, steps, device, weights) + [*user, *variant]
    assert load_config(None, as_sets).to_dict() == reference


def test_recipe_ships_in_the_package_and_examples_links_it():
    """The quickstart reads its recipe from the installed package (not the repository's
    examples/), and pyproject ships it; examples/configs/quickstart.yaml is the same file."""
    import tomllib
    from fnmatch import fnmatch

    from megafusion import quickstart

    packaged = REPO / "megafusion" / quickstart.RECIPE
    assert packaged.is_file()
    assert (REPO / "examples" / "configs" / "quickstart.yaml").read_bytes() == packaged.read_bytes()
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(fnmatch(quickstart.RECIPE, pattern) for pattern in package_data["megafusion"])
    assert "parents[" not in Path(quickstart.__file__).read_text()  # no path out of the package into the repo
    assert quickstart.recipe_tree()["model"]["kind"] == "transfusion"


def test_quickstart_evaluates_with_the_arguments_it_passed_to_the_eval_cli():
    """eval_options() are exactly what `megafusion eval` made of the quickstart's former flags."""
    import argparse

    from megafusion import quickstart
    from megafusion.eval.cli import EvalOptions, build_parser

    args = argparse.Namespace(cfg=quickstart.EVAL_CFG, shift=quickstart.EVAL_SHIFT, frame_shift=quickstart.EVAL_SHIFT,
                              manifest=Path("/qs/data/raw/manifest.json"))
    for name, scale in quickstart.SCALES.items():
        for cfg, shift, frame_shift in ((args.cfg, args.shift, args.frame_shift), (3.0, 7.5, 20.0)):
            args.cfg, args.shift, args.frame_shift = cfg, shift, frame_shift
            run_dir, eval_dir = Path("/qs/run"), Path("/qs/eval")
            before = ["--run-dir", str(run_dir), "--out", str(eval_dir),
                      "--n", str(scale.eval_n), "--steps", str(scale.eval_ode_steps),
                      "--planning-candidates", str(scale.planning_candidates), "--planning-n", str(scale.planning_n),
                      "--generation-n", str(scale.generation_n),
                      "--cfg", str(args.cfg), "--shift", str(args.shift), "--frame-shift", str(args.frame_shift),
                      "--world", str(args.manifest)]
            expected = EvalOptions.from_args(build_parser().parse_args(before))
            assert quickstart.eval_options(run_dir, eval_dir, scale, args) == expected, name


def test_per_run_paths_are_written_as_yaml_values(monkeypatch):
    """Data paths and the tokenizer reach the config verbatim, whatever characters they hold."""
    import megafusion.data.tokenizer
    from megafusion import quickstart

    monkeypatch.setattr(megafusion.data.tokenizer, "Tokenizer", _FakeTokenizer)
    prefixes = {name: Path(f"/runs/a, b: [c]/{name}") for name in quickstart.DATASETS}
    cfg = quickstart.training_config(Path("/runs/#1/tokenizer.model"), prefixes, 4, "cpu")
    assert cfg.data.paths == [str(p) for p in prefixes.values()] and cfg.data.tokenizer == "/runs/#1/tokenizer.model"
    assert cfg.data.weights == [REFERENCE_WEIGHTS[name] for name in prefixes] and cfg.checkpoint.every == 2


def test_report_shows_the_seen_and_unseen_splits_side_by_side():
    from megafusion.quickstart import evaluation_table

    def head(metric, value, chance, unseen=None):
        h = {"metric": metric, "value": value, "chance": chance, "higher_is_better": True}
        return h if unseen is None else {**h, "value_unseen": unseen, "chance_unseen": chance / 2}

    gen = {"objects": 0.9, "positions": 0.8, "count": 0.7, "chance": {"objects": 0.1, "positions": 0.05, "count": 0.5}}
    gen_unseen = {"objects": 0.4, "positions": 0.3, "count": 0.6, "chance": {"objects": 0.1, "positions": 0.05,
                                                                              "count": 0.5},
                  "by_composition": {"color_shape": {"n": 3, "value": 0.5, "chance": 0.01},
                                     "placement": {"n": 2, "value": 0.0, "chance": 0.02}}}
    vqa = {"accuracy": 0.7, "majority": 0.5, "per_kind": {"count": {"n": 10, "accuracy": 0.6, "chance": 0.2}}}
    vqa_unseen = {"accuracy": 0.5, "majority": 0.4, "per_kind": {"count": {"n": 7, "accuracy": 0.3, "chance": 0.2}}}
    settings = {"steps": 10, "sampler": "euler", "cfg_scale": 1.0, "image_shift": 100.0, "frame_shift": 100.0,
                "splits": ["seen", "unseen"],
                "heldout_compositions": {"color_shape": [["blue", "square"]], "placement": [["square", 0, 0]],
                                         "object_pair": [[["red", "circle"], ["green", "square"]]],
                                         "start_cell": [[2, 1]], "grid": 2, "lattice": 4}}
    metrics = {"settings": settings,
               "headlines": {"generation": head("geneval_correct", 0.9, 0.01, 0.25),
                             "vqa": head("vqa_accuracy", 0.7, 0.3, 0.5), "perplexity": head("perplexity", 1.5, 512)},
               "results": {"generation": {**gen, "unseen": gen_unseen}, "vqa": {**vqa, "unseen": vqa_unseen},
                           "perplexity": {}, "planning": {"skipped": "not requested (--only)"}}}
    lines = evaluation_table(metrics)
    assert "| evaluation | metric | seen | unseen | chance (seen / unseen) | better |" in lines
    assert "| generation | geneval_correct | 0.9 | 0.25 | 0.01 / 0.005 | higher |" in lines
    assert "| | positions: ... in its cell | 0.8 | 0.3 | 0.05 / 0.05 | higher |" in lines
    assert "| | count questions (10) | 0.6 | 0.3 | 0.2 / 0.2 | higher |" in lines  # matched by kind, not count
    assert "| perplexity | perplexity | 1.5 | - | 512 / - | higher |" in lines
    assert "| planning | skipped: not requested (--only) | | | | |" in lines
    assert ("Unseen, by the kind of held-out composition the items were drawn for: generation color shape 0.5 "
            "(n 3, chance 0.01), placement 0 (n 2, chance 0.02).") in lines
    assert any("blue square" in line and "a square in the top left cell" in line and "red circle + green square" in line
               and "(2, 1)" in line for line in lines)
    # a run whose data held nothing out: one value column, as before
    one = evaluation_table({**metrics, "settings": {**settings, "splits": ["seen"], "heldout_compositions": None},
                            "headlines": {"vqa": head("vqa_accuracy", 0.7, 0.3)}, "results": {"vqa": vqa}})
    assert "| evaluation | metric | value | chance | better |" in one
    assert "| vqa | vqa_accuracy | 0.7 | 0.3 | higher |" in one


def test_world_comparison_sets_the_asked_action_video_shares_and_reuses_the_main_run(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from megafusion import quickstart

    lengths = {"text": 60.0, "image_text": 30.0, "vqa": 80.0, "video": 100.0, "action_video": 150.0}
    monkeypatch.setattr(quickstart, "mean_positions", lambda prefix: lengths[Path(prefix).name])
    trained = {}

    def fake_train(where, tokenizer, data, n, scale, args, overrides, weights, stage=""):
        trained[where.name] = weights
        return where / "eval"

    monkeypatch.setattr(quickstart, "train_and_evaluate", fake_train)
    prefixes = {name: tmp_path / name for name in quickstart.DATASETS}
    results = quickstart.run_trends(tmp_path, ["world"], tmp_path / "tok", prefixes, 100, quickstart.SCALES["quick"],
                                    SimpleNamespace(rae=None), tmp_path / "eval")
    world = results["world"]
    assert world["main"]["run"] == tmp_path / "run" and "main" not in trained  # the main run, not trained again
    assert sorted(trained) == sorted(f"action_{100 * s:g}pct" for s in quickstart.ACTION_SHARES)
    for share in quickstart.ACTION_SHARES:
        weights = trained[f"action_{100 * share:g}pct"]
        # positions drawn per source = documents drawn (weight) x positions per document
        positions = {k: weights[k] * lengths[k] for k in lengths}
        assert positions["action_video"] / sum(positions.values()) == pytest.approx(share)
        assert {k: w for k, w in weights.items() if k != "action_video"} == {
            k: w for k, w in quickstart.DATA_WEIGHTS.items() if k != "action_video"}
        assert world[f"action_{100 * share:g}pct"]["action_share"] == pytest.approx(share)
    main_positions = {k: quickstart.DATA_WEIGHTS[k] * lengths[k] for k in lengths}
    assert world["main"]["action_share"] == pytest.approx(main_positions["action_video"] / sum(main_positions.values()))
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        quickstart.weights_for_action_share(1.0, lengths)
