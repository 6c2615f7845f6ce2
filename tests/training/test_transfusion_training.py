"""The tiny Transfusion configs through the real `megafusion train` entry point.

- tiny_transfusion.yaml learns: both the text and the image loss fall.
- TP2, TP2+SP, PP2 (tiny_transfusion.yaml), EP2 (tiny_transfusion_moe.yaml), TP2+SP with
  AdaLN time conditioning and PP2 with U-Net adapters and 2-D positions reproduce the
  world-size-1 losses (total and per modality) to 1e-5: weights are initialised by
  checkpoint key, data and noise are functions of (seed, sample index), and each
  micro-batch's loss is a mean over the same micro-batch in every layout.
"""

import pytest

from conftest import read_metrics, run_train

QUIET = ["checkpoint.save_final=false", "logging.tensorboard=false"]
LAYOUT_STEPS = 2
LAYOUT_COMMON = [f"train.steps={LAYOUT_STEPS}", "schedule.warmup_steps=1", "model.seq_length=128", *QUIET]
KEYS = ("loss", "loss_text", "loss_image")

# name -> (config, model overrides shared with its world-size-1 reference, parallel overrides)
LAYOUTS = {
    "tp2": ("tiny_transfusion.yaml", (), ["parallel.tp=2"]),
    "tp2_sp": ("tiny_transfusion.yaml", (), ["parallel.tp=2", "parallel.sp=true"]),
    "pp2": ("tiny_transfusion.yaml", (), ["parallel.pp=2"]),
    "ep2": ("tiny_transfusion_moe.yaml", (), ["parallel.ep=2"]),
    # the quickstart's model options: AdaLN, learned patch positions, 3-D RoPE with 1-D frames
    "quickstart_model_tp2_sp": ("tiny_transfusion.yaml",
                                ("model.time_conditioning=adaln", "model.patch_positions=learned",
                                 "model.image_positions=3d", "model.frame_positions=1d",
                                 "diffusion.frame_clean_fraction=0.5"),
                                ["parallel.tp=2", "parallel.sp=true"]),
    "unet_2d_pp2": ("tiny_transfusion.yaml", ("model.patch_adapter=unet", "model.image_positions=2d"),
                    ["parallel.pp=2"]),
}
REFERENCES = sorted({(config, model) for config, model, _ in LAYOUTS.values()})


def test_tiny_transfusion_text_and_image_losses_fall(tmp_path):
    steps = 14
    run_train(tmp_path, "tiny_transfusion.yaml", [f"train.steps={steps}", *QUIET])
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    for key in ("loss_text", "loss_image"):
        values = [m[key] for m in metrics]
        first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
        assert last < 0.8 * first, f"{key} did not fall: first 3 steps {values[:3]}, last 3 {values[-3:]}"


@pytest.fixture(scope="module")
def reference_metrics(tmp_path_factory):
    refs = {}
    for config, model in REFERENCES:
        run_dir = tmp_path_factory.mktemp("ref")
        run_train(run_dir, config, LAYOUT_COMMON + list(model))
        refs[config, model] = read_metrics(run_dir)
        assert [m["step"] for m in refs[config, model]] == list(range(1, LAYOUT_STEPS + 1))
    return refs


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(tmp_path, reference_metrics, name):
    config, model, parallel = LAYOUTS[name]
    run_train(tmp_path, config, LAYOUT_COMMON + list(model) + parallel, nproc=2)
    reference = reference_metrics[config, model]
    # MoE runs also log per-layer, per-modality routing fractions: the same tokens must be routed alike
    assert any(k.startswith("moe/") for k in reference[-1]) == (name == "ep2")
    got_metrics = read_metrics(tmp_path)
    assert [m["step"] for m in got_metrics] == [m["step"] for m in reference]
    for got, ref in zip(got_metrics, reference):
        routing = sorted(k for k in ref if k.startswith("moe/"))
        assert routing == sorted(k for k in got if k.startswith("moe/"))
        for key in (*KEYS, *routing):
            assert got[key] == pytest.approx(ref[key], abs=1e-5), \
                f"{key} step {ref['step']}: {got[key]} vs world-size-1 {ref[key]}"
