"""Transfusion exports: the dense and the MoE tiny Transfusion configs trained at TP2, PP2
(and EP2 for MoE), exported, and compared with the world-size-1 model rebuilt from the same
checkpoint by dist_checkpointing directly (not through megafusion.interop): equal text
logits and image (flow) predictions on a fixed batch, every expert present and equal.
Then: import at another layout and continue training; architecture checks on import."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, losses_by_step, read_metrics, run_train

FAST = ["train.steps=2", "schedule.warmup_steps=1", "train.global_batch_size=2", "train.micro_batch_size=1",
        "model.seq_length=128", "logging.tensorboard=false"]
RUNS = {  # name: (config, layout)
    "dense_tp2": ("tiny_transfusion.yaml", ["parallel.tp=2"]),
    "dense_pp2": ("tiny_transfusion.yaml", ["parallel.pp=2"]),
    "moe_ep2": ("tiny_transfusion_moe.yaml", ["parallel.ep=2"]),
    "moe_tp2": ("tiny_transfusion_moe.yaml", ["parallel.tp=2", "parallel.sp=true"]),  # MoE + TP needs SP
    "moe_pp2": ("tiny_transfusion_moe.yaml", ["parallel.pp=2"]),
}
MEAN = torch.linspace(-0.2, 0.2, 192, dtype=torch.float64)
STD = torch.linspace(0.5, 1.5, 192, dtype=torch.float64)


def latent_stats_dir(base: Path) -> Path:
    """A saved pixel representation with (made-up) dataset latent statistics."""
    from megafusion.vision.pixel import PixelRepresentation

    directory = base / "pixel_with_stats"
    if not directory.is_dir():
        rep = PixelRepresentation(image_size=32, patch_size=8)
        rep.set_stats(MEAN, STD)
        rep.save(directory)
    return directory


def trained(name: str, base: Path) -> tuple[Path, Path]:
    """(run dir, export dir) of RUNS[name], trained and exported once per session."""
    from megafusion.interop.export import export_run

    run_dir, export_dir = base / name / "run", base / name / "export"
    config, layout = RUNS[name]
    extra = [f"vision.path={latent_stats_dir(base)}"] if name == "dense_tp2" else []
    if not (run_dir / "checkpoints" / "step_00000002").is_dir():
        run_train(run_dir, config, [*FAST, *layout, *extra], nproc=2)
    if not (export_dir / "config.json").is_file():
        export_run(run_dir, export_dir)
    return run_dir, export_dir


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "transfusion_exports"


@contextlib.contextmanager
def world_of_one_reference(run_dir: Path):
    """The run's model at world size 1 with the checkpoint loaded by dist_checkpointing itself."""
    from megatron.core import dist_checkpointing

    from megafusion.config import load_config
    from megafusion.inference.loading import build_model, checkpoint_path
    from megafusion.training.checkpoint import unwrap

    with build_model(load_config(run_dir / "config.yaml"), "cpu") as loaded:
        model = unwrap(loaded.model)
        _, path = checkpoint_path(run_dir, None)
        model.load_state_dict(dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))["model"])
        yield loaded


@torch.no_grad()
def predictions(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(text logits [b, s, vocab], latent predictions [b, s, C]) on a training batch."""
    mask = torch.stack([batch["doc_ids"], batch["span_ids"]])
    return model(batch["tokens"], batch["positions"], mask, latents=batch["x_t"], timesteps=batch["t"],
                 modality=batch["modality"])


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(RUNS))
def test_transfusion_export_equals_world_of_one(name, base, cpu_layer):
    from megafusion.inference.loading import load_run

    run_dir, export_dir = trained(name, base)
    exported = load_file(str(export_dir / "model.safetensors"))
    with world_of_one_reference(run_dir) as reference:
        ref_state = {k: v for k, v in reference.model.state_dict().items()
                     if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
        assert sorted(exported) == sorted(ref_state)
        for k, v in ref_state.items():
            assert torch.equal(exported[k], v), k
        moe = "moe" in name
        for layer in range(2):
            prefix = f"decoder.layers.{layer}.mlp."
            wanted = ([f"experts.local_experts.{e}.linear_fc{i}.weight" for e in range(4) for i in (1, 2)]
                      + [f"modality_shared_experts.{m}_mlp.linear_fc{i}.weight" for m in ("text", "vision")
                         for i in (1, 2)] + ["router.weight"]) if moe else ["linear_fc1.weight", "linear_fc2.weight"]
            assert all(prefix + w in exported for w in wanted), (layer, wanted)

        stream = reference.provider.stream  # two packed samples that hold images as well as text
        batch = reference.provider.batch([i for i in range(64) if bool((stream.sample(i).modality != 0).any())][:2])
        assert bool((batch["modality"] != 0).any()) and bool((batch["modality"] == 0).any())
        want_logits, want_latents = predictions(reference.model, batch)
        with load_run(export_dir, device="cpu") as loaded:  # inside the reference's world of one
            got_logits, got_latents = predictions(loaded.model, batch)
            assert loaded.step == 2 and want_logits.shape == (2, 128, 272) and want_latents.shape == (2, 128, 192)
            torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-5)
            torch.testing.assert_close(got_latents, want_latents, rtol=0, atol=1e-5)
            if name == "dense_tp2":  # the latent statistics travel with the export
                rep = loaded.provider.stream.representation
                assert torch.equal(rep.latent_mean, MEAN) and torch.equal(rep.latent_std, STD)


@pytest.mark.distributed
def test_transfusion_config_json_describes_the_architecture(base):
    from megafusion.data.byte_tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    specials = {"pad": tok.pad_id, "boi": tok.boi_id, "eoi": tok.eoi_id, "frame": tok.frame_id, "eod": tok.eod_id}
    dense = json.loads((trained("dense_tp2", base)[1] / "config.json").read_text())
    moe = json.loads((trained("moe_ep2", base)[1] / "config.json").read_text())
    for top in (dense, moe):
        assert top["model_type"] == "megafusion-transfusion"
        assert top["architectures"] == ["MegafusionTransfusionModel"]
    dense, moe = dense["megafusion"], moe["megafusion"]
    for raw in (dense, moe):
        arch = raw["architecture"]
        assert raw["format"] == "megafusion-safetensors-v1" and raw["step"] == 2 and raw["dtype"] == "fp32"
        assert arch["model_type"] == "megafusion-transfusion"
        assert arch["text"]["vocab_size"] == 272
        assert arch["text"]["tokenizer"]["special_tokens"] == specials
        assert arch["text"]["tokenizer"]["action_tokens"] == tok.action_ids()
        want = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "head_dim": 16,
                "ffn_hidden_size": 128, "max_sequence_length": 128, "image_positions": "1d"}
        assert {k: arch["transformer"][k] for k in want} == want
        # 32x32 pixels in 8x8 patches: 16 tokens of 3 * 8 * 8 values
        assert arch["patch_embedding"] == {"adapter": "linear", "latent_dim": 192, "tokens_per_image": 16,
                                           "positions": "none"}
        assert arch["time_embedding"] == {"conditioning": "additive", "frequency_dim": 256}
        assert arch["visual_representation"]["kind"] == "pixel"
        assert arch["visual_representation"]["patch_size"] == 8
    assert dense["architecture"]["moe"] is None and moe["config"]["parallel"]["ep"] == 2
    assert moe["architecture"]["moe"] == {"num_experts": 4, "top_k": 2, "expert_ffn_hidden_size": 64,
                                          "layers": [0, 1], "router_score": "softmax",
                                          "shared_expert_ffn_hidden_size": 64, "per_modality_shared_experts": True}
    stats = dense["architecture"]["visual_representation"]
    assert stats["path"] == "representation" and dense["config"]["vision"]["path"] == "representation"
    assert stats["latent_stats"] == {"mean": MEAN.tolist(), "std": STD.tolist()}
    assert moe["architecture"]["visual_representation"]["latent_stats"] is None


@pytest.mark.distributed
def test_text_moe_pp2_export_equals_world_of_one(base, cpu_layer):
    run_dir, export_dir = base / "text_pp2" / "run", base / "text_pp2" / "export"
    run_train(run_dir, "tiny_text_moe.yaml", ["parallel.pp=2", "train.steps=2", "schedule.warmup_steps=1",
                                              "checkpoint.every=2", "logging.tensorboard=false"], nproc=2)
    from megafusion.interop.export import export_run

    export_run(run_dir, export_dir)
    exported = load_file(str(export_dir / "model.safetensors"))
    with world_of_one_reference(run_dir) as reference:
        ref_state = {k: v for k, v in reference.model.state_dict().items()
                     if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
        assert sorted(exported) == sorted(ref_state)
        assert all(torch.equal(exported[k], v) for k, v in ref_state.items())
        assert sum(".local_experts." in k for k in exported) == 2 * 4 * 2  # layers x experts x (fc1, fc2)


@pytest.mark.distributed
def test_transfusion_import_then_reexport_is_identical(base, tmp_path):
    """Dense TP2 export with latent statistics: import, export again: same bytes, same architecture."""
    from megafusion.interop.export import export_run
    from megafusion.interop.import_ import import_export

    _, export_dir = trained("dense_tp2", base)
    import_export(export_dir, tmp_path / "imported")
    again = export_run(tmp_path / "imported", tmp_path / "again")
    first, second = load_file(str(export_dir / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert sorted(first) == sorted(second)
    for name in first:
        assert first[name].numpy().tobytes() == second[name].numpy().tobytes(), name
    a, b = (json.loads((d / "config.json").read_text())["megafusion"] for d in (export_dir, again))
    assert a["architecture"] == b["architecture"] and b["step"] == 0
    stats = load_file(str(again / "representation" / "latent_stats.safetensors"))
    assert torch.equal(stats["mean"], MEAN) and torch.equal(stats["std"], STD)


@pytest.mark.distributed
def test_import_at_another_layout_continues_like_the_original(base, tmp_path):
    """MoE trained at EP2, imported at PP2 (--keep-step): step 3's loss equals the original run's step 3."""
    run_dir, export_dir = trained("moe_ep2", base)
    original = tmp_path / "original"
    shutil.copytree(run_dir, original)
    continue_ = ["train.steps=3", "checkpoint.save_final=false"]
    run_train(original, str(original / "config.yaml"), continue_, nproc=2)

    imported = tmp_path / "imported"
    from megafusion.interop.import_ import main as import_main  # the CLI entry, in-process

    assert import_main(["--from", str(export_dir), "--run-dir", str(imported), "--keep-step",
                        "--set", "parallel.ep=1", "--set", "parallel.pp=2"]) == 0
    assert (imported / "checkpoints" / "step_00000002").is_dir()
    proc = run_train(imported, str(imported / "config.yaml"), continue_, nproc=2)
    assert "resumed from step 2" in proc.stdout
    want, got = losses_by_step(original), losses_by_step(imported)
    assert sorted(got) == [3] and 3 in want
    assert got[3] == pytest.approx(want[3], abs=1e-5)
    for key in ("loss_text", "loss_image"):
        assert losses_by_step(imported, key)[3] == pytest.approx(losses_by_step(original, key)[3], abs=1e-5)
    assert read_metrics(imported)[-1]["lr"] == pytest.approx(read_metrics(original)[-1]["lr"], rel=1e-6)


@pytest.mark.distributed
def test_import_into_a_disagreeing_run_config_names_the_field(base, tmp_path):
    import yaml

    from megafusion.config import ConfigError, load_config, save_config
    from megafusion.interop.import_ import import_export

    _, export_dir = trained("moe_ep2", base)
    with pytest.raises(ConfigError, match=r"model\.moe\.num_experts = 8 in .* but 4 in"):
        import_export(export_dir, tmp_path / "a", overrides=["model.moe.num_experts=8"])
    config = tmp_path / "finetune.yaml"
    tree = yaml.safe_load((REPO / "examples/configs/tiny_transfusion_moe.yaml").read_text())
    tree["model"]["hidden_size"] = 128
    config.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError) as err:
        import_export(export_dir, tmp_path / "b", config=config)
    assert "model.hidden_size = 128 in" in str(err.value) and "but 64 in" in str(err.value)
    assert "finetune.yaml" in str(err.value) and "config.json" in str(err.value)
    assert "seq_length" not in str(err.value)  # 256 vs 128: no weight depends on it
    prepared = tmp_path / "prepared"  # a run dir holding only its config
    prepared.mkdir()
    save_config(load_config(REPO / "examples/configs/tiny_transfusion.yaml"), prepared / "config.yaml")
    with pytest.raises(ConfigError, match=r"model\.moe\.num_experts = 0 in .*prepared.* but 4 in"):
        import_export(export_dir, prepared)
    assert not (prepared / "checkpoints").exists()


@pytest.mark.distributed
def test_config_json_with_unknown_or_disagreeing_fields_is_an_error(base, tmp_path):
    from megafusion.config import ConfigError
    from megafusion.inference.loading import load_run
    from megafusion.interop.import_ import read_config

    _, export_dir = trained("moe_ep2", base)
    raw = json.loads((export_dir / "config.json").read_text())["megafusion"]  # written back in the first layout
    shutil.copy(export_dir / "model.safetensors", tmp_path / "model.safetensors")
    cases = [
        (lambda r: r.update(notes="hi"), r"unknown field\(s\) \['notes'\]"),
        (lambda r: r["architecture"]["moe"].update(num_experts=8),
         r"'architecture\.moe\.num_experts' is 8 but the config gives 4"),
        (lambda r: r["architecture"]["transformer"].update(qk_norm=True),
         r"unknown field 'architecture\.transformer\.qk_norm'"),
        (lambda r: r["config"]["vision"].update(patch_sise=4), "patch_sise"),
        (lambda r: r.update(format="other-v9"), "format = 'other-v9'"),
    ]
    for edit, message in cases:
        broken = json.loads(json.dumps(raw))
        edit(broken)
        (tmp_path / "config.json").write_text(json.dumps(broken))
        with pytest.raises(ConfigError, match=message):
            read_config(tmp_path)
        with pytest.raises(ConfigError, match=message):
            with load_run(tmp_path, device="cpu"):  # generate / eval on the export refuse it too
                pass
