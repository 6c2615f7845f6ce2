"""`megafusion generate` and `megafusion eval` on an exported directory (config.json +
model.safetensors + tokenizer) give exactly what they give on the run dir it came from."""

import json
from pathlib import Path

import pytest
import torch
from conftest import run_train

TRAIN = ["train.steps=2", "schedule.warmup_steps=1", "train.global_batch_size=2", "model.seq_length=128"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """The session's tiny trained run (same directory and settings as tests/inference/test_generate.py)."""
    run_dir = tmp_path_factory.getbasetemp() / "tiny_transfusion_for_inference"
    if not (run_dir / "checkpoints").is_dir():
        run_train(run_dir, "tiny_transfusion.yaml", TRAIN)
    return run_dir


@pytest.fixture(scope="module")
def export_dir(run_dir, tmp_path_factory) -> Path:
    from megafusion.interop.export import export_run

    # sharded, so the index path of the loader is the one exercised
    return export_run(run_dir, tmp_path_factory.mktemp("export") / "tiny", max_shard_bytes=100_000)


def without(record: dict, *keys: str) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


def test_load_run_on_an_export_equals_the_run(run_dir, export_dir, cpu_layer):
    """Both loaded at once: the export's block reuses the run's world of one, and leaves it up."""
    from megatron.core import parallel_state

    from megafusion.inference.loading import load_run

    assert (export_dir / "model.safetensors.index.json").is_file()
    with load_run(run_dir, device="cpu") as a:
        with load_run(export_dir, device="cpu") as b:
            assert b.step == a.step == 2 and b.run_dir == export_dir
            assert b.cfg.model == a.cfg.model and b.cfg.vision == a.cfg.vision
            sa, sb = a.model.state_dict(), b.model.state_dict()
            assert sa.keys() == sb.keys()
            for k, v in sa.items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(v, sb[k]), k
        assert parallel_state.model_parallel_is_initialized(), "the inner block shut the outer one's world down"
    assert not parallel_state.model_parallel_is_initialized(), "the outer block left its world up"


def test_generate_on_an_export_equals_the_run(run_dir, export_dir, tmp_path):
    from megafusion.inference.cli import main

    records = {}
    for name, source in (("run", run_dir), ("export", export_dir)):
        out = tmp_path / name
        assert main(["--run-dir", str(source), "--prompt", "A big blue square.", "--image-prompt", "--steps", "2",
                     "--cfg", "2", "--max-new-tokens", "6", "--out", str(out)]) == 0
        records[name] = json.loads((out / "generation.json").read_text())
    assert records["export"]["run_dir"] == str(export_dir)
    assert without(records["export"], "run_dir") == without(records["run"], "run_dir")
    assert records["run"]["images"] == ["image_0.png"]
    assert (tmp_path / "run" / "image_0.png").read_bytes() == (tmp_path / "export" / "image_0.png").read_bytes()


def test_eval_on_an_export_equals_the_run(run_dir, export_dir, tmp_path):
    from megafusion.eval.cli import main

    metrics = {}
    for name, source in (("run", run_dir), ("export", export_dir)):
        out = tmp_path / name
        assert main(["--run-dir", str(source), "--out", str(out), "--n", "2", "--steps", "2",
                     "--planning-candidates", "2", "--no-tensorboard"]) == 0
        metrics[name] = json.loads((out / "metrics.json").read_text())
        for result in metrics[name]["results"].values():  # wall-clock times differ, nothing else
            result.pop("seconds", None)
    assert metrics["export"]["step"] == 2
    assert without(metrics["export"], "run_dir") == without(metrics["run"], "run_dir")
    assert (tmp_path / "run" / "generation_grid.png").read_bytes() == \
        (tmp_path / "export" / "generation_grid.png").read_bytes()


def test_export_step_and_kind_errors(export_dir):
    from megafusion.inference.loading import load_run

    with pytest.raises(FileNotFoundError, match="export of step 2 only"):
        with load_run(export_dir, step=1, device="cpu"):
            pass
