"""TensorBoard images and W&B: sample grids every ``logging.sample_every`` steps that leave the
training bit-identical, MoE routing heatmaps, and ``logging.wandb`` (a fake wandb: no network)."""

import importlib.machinery
import json
import sys
import types

import numpy as np
import pytest

from conftest import CONFIGS, read_metrics, run_train

TIMING = ("step_time_s", "tokens_per_s", "data_time_s", "tflops_per_gpu", "mfu")
COMMON = ["train.steps=6", "model.seq_length=128", "checkpoint.save_final=false", "logging.console_every=3"]


def _images(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    return {tag: acc.Images(tag) for tag in acc.Tags()["images"]}


def test_sampling_leaves_the_run_bit_identical_and_tensorboard_gets_grids_and_heatmaps(tmp_path):
    """A tiny MoE Transfusion run with sample grids every 3 steps has the same metrics.jsonl
    (losses, grad norms, routing statistics) as one without; TensorBoard has both images."""
    plain, sampled = tmp_path / "plain", tmp_path / "sampled"
    run_train(plain, "tiny_transfusion_moe.yaml", COMMON)
    run_train(sampled, "tiny_transfusion_moe.yaml", COMMON + ["logging.sample_every=3", "logging.sample_steps=2"])
    strip = [{k: v for k, v in row.items() if k not in TIMING} for row in read_metrics(plain)]
    assert [{k: v for k, v in row.items() if k not in TIMING} for row in read_metrics(sampled)] == strip
    assert any(k.startswith("moe/layer") for k in strip[-1])

    images = _images(sampled)
    assert [e.step for e in images["samples"]] == [3, 6]
    assert images["samples"][0].width == 4 * (2 * 32 + 2) + 2  # four prompts, 32-pixel images shown 2x
    assert [e.step for e in images["moe/routing_heatmap"]] == [3, 6]  # every console line (console_every 3)
    assert "samples" not in _images(plain) and "moe/routing_heatmap" in _images(plain)


def test_routing_heatmap_from_metrics():
    from megafusion.training.samples import routing_fractions, routing_heatmap

    metrics = {f"moe/layer{layer}/frac_{m}_tokens_expert{e}": 0.1 * (e + layer)
               for layer in range(2) for m in ("text", "image") for e in range(4)}
    fractions = routing_fractions({**metrics, "loss": 1.0})
    assert sorted(fractions) == ["image", "text"] and fractions["text"].shape == (2, 4)
    assert fractions["text"][1, 3] == pytest.approx(0.4)
    image = routing_heatmap(metrics, step=7)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert routing_heatmap({"loss": 1.0}, step=7) is None


@pytest.mark.parametrize("config, overrides, world, expected", [
    ("tiny_text.yaml", ["logging.sample_every=5"], 1, r"logging.sample_every = 5 needs model.kind = transfusion"),
    ("tiny_transfusion.yaml", ["logging.sample_every=5", "parallel.tp=2"], 2,
     r"logging.sample_every = 5 needs world size 1 .*tp = 2"),
    ("tiny_transfusion.yaml", ["logging.sample_every=5"], 2, r"logging.sample_every = 5 needs world size 1 .*world size 2"),
    ("tiny_transfusion.yaml", ["logging.sample_every=-1"], 1, r"logging.sample_every = -1 must be >= 0"),
])
def test_validate_refuses_sampling_where_it_cannot_run(config, overrides, world, expected):
    from megafusion.config import ConfigError, load_config, validate

    with pytest.raises(ConfigError, match=expected) as err:
        validate(load_config(CONFIGS / config, overrides), world)
    assert "\n" not in str(err.value)


def _fake_wandb(monkeypatch):
    calls = {"init": [], "log": [], "finish": 0}
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    class Run:
        def log(self, data, step=None):
            calls["log"].append((step, dict(data)))

        def finish(self):
            calls["finish"] += 1

    def init(**kwargs):
        calls["init"].append(kwargs)
        return Run()

    fake.init = init
    fake.Image = lambda array: ("image", np.asarray(array).shape)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return calls


def test_wandb_needs_the_package(monkeypatch):
    from megafusion.config import ConfigError, load_config, validate

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails, as without the package
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else
                        importlib.machinery.PathFinder.find_spec(name))
    with pytest.raises(ConfigError, match=r"logging.wandb.project = demo needs the wandb package.*pip install wandb"
                                          r".*unset logging.wandb.project"):
        validate(load_config(CONFIGS / "tiny_text.yaml", ["logging.wandb.project=demo"]), 1)


def test_wandb_gets_the_config_and_the_metrics_jsonl_scalars(tmp_path, monkeypatch):
    from megafusion.config import load_config, validate
    from megafusion.training.metrics import MetricsWriter

    calls = _fake_wandb(monkeypatch)
    cfg = load_config(CONFIGS / "tiny_text.yaml", ["logging.wandb.project=demo", "logging.wandb.entity=team",
                                                   "logging.wandb.mode=offline"])
    validate(cfg, 1)  # the (fake) package is there: accepted
    writer = MetricsWriter(tmp_path, True, False, total_steps=2, wandb=cfg.logging.wandb, run_config=cfg.to_dict())
    writer.log(1, {"loss": 2.0, "lr": 0.1, "mfu": None})
    writer.log(2, {"loss": 1.5, "lr": 0.05, "grad_norm": float("nan")})
    writer.add_image("samples", np.zeros((4, 6, 3), np.uint8), 2)
    writer.close()
    (init,) = calls["init"]
    assert init == {"project": "demo", "entity": "team", "config": cfg.to_dict(), "dir": str(tmp_path),
                    "mode": "offline"}
    assert calls["log"] == [(1, {"loss": 2.0, "lr": 0.1}), (2, {"loss": 1.5, "lr": 0.05}),
                            (2, {"samples": ("image", (4, 6, 3))})]
    assert calls["finish"] == 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_wandb_is_not_imported_unless_set(tmp_path, monkeypatch):
    from megafusion.config import load_config
    from megafusion.training.metrics import MetricsWriter

    monkeypatch.setitem(sys.modules, "wandb", None)  # any import of wandb would raise
    cfg = load_config(CONFIGS / "tiny_text.yaml")
    writer = MetricsWriter(tmp_path, True, False, total_steps=1, wandb=cfg.logging.wandb, run_config=cfg.to_dict())
    writer.log(1, {"loss": 1.0})
    writer.close()
