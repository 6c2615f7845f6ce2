"""The IsoFLOP planner: configs whose FLOPs spend each budget, size grids per family rule,
launch scripts, and clear errors for families that cannot be planned."""

from __future__ import annotations

import copy
import json
import math
import subprocess

import pytest
import yaml

from conftest import CONFIGS

from megafusion.scaling import isoflop_cli
from megafusion.scaling.flops import ModelShape, nominal_packing, params, training_flops_per_step
from megafusion.scaling.plan import PlanError, candidate_sizes, plan_sweep, write_plan

TEXT_FAMILY = {
    "model": {"kind": "text", "vocab_size": 512, "seq_length": 128, "activation": "swiglu"},
    "train": {"global_batch_size": 16, "micro_batch_size": 2, "precision": "bf16"},
    "optimizer": {"lr": 3e-3},
    "family": {"widths": [32, 48, 64, 96, 128, 192, 256, 384], "aspect_ratio": 16, "head_dim": 16,
               "ffn_ratio": 2.75, "ffn_multiple": 16, "min_steps": 10},
}

MOE_TRANSFUSION_FAMILY = {
    "model": {"kind": "transfusion", "vocab_size": 256, "seq_length": 96, "moe": {"top_k": 2}},
    "train": {"global_batch_size": 4},
    "family": {"widths": [32, 64, 96, 128], "aspect_ratio": 32, "head_dim": 16,
               "moe": {"num_experts": [4, 8, 8, 16], "expert_ffn_ratio": 0.5, "shared_expert_ffn_ratio": 1},
               "packing": {"doc_length": 48, "span_length": 16, "spans_per_doc": 2, "latent_dim": 48}},
}


def flops_of_written_config(cfg: dict, packing: dict) -> tuple[int, int]:
    """(training FLOPs of the whole run, FLOPs of one step), from the YAML alone."""
    model = dict(cfg["model"])
    model.setdefault("latent_dim", packing.get("latent_dim") or 0)
    shape = ModelShape.from_model_config(model)
    layout = nominal_packing(model["seq_length"], packing.get("doc_length"), packing.get("span_length", 0),
                             packing.get("spans_per_doc", 0))
    per_step = cfg["train"]["global_batch_size"] * training_flops_per_step(shape, *layout)
    return cfg["train"]["steps"] * per_step, per_step


@pytest.mark.parametrize("family", [TEXT_FAMILY, MOE_TRANSFUSION_FAMILY], ids=["dense_text", "moe_transfusion"])
def test_written_configs_spend_the_budget_within_rounding(tmp_path, family):
    budgets = [1e13, 3e13, 1e14]
    runs = plan_sweep(family, budgets)
    write_plan(family, runs, tmp_path)
    manifest = json.loads((tmp_path / "plan.json").read_text())
    assert sorted(manifest["budgets"]) == budgets and len(manifest["runs"]) == len(runs)
    packing = family["family"].get("packing", {})
    for entry in manifest["runs"]:
        cfg = yaml.safe_load((tmp_path / entry["config"]).read_text())
        assert "family" not in cfg
        spent, per_step = flops_of_written_config(cfg, packing)
        assert abs(spent - entry["budget"]) <= per_step / 2 + 1, entry["name"]  # nearest whole step
        assert cfg["train"]["steps"] == entry["steps"] >= 1
        assert entry["tokens"] == cfg["train"]["steps"] * cfg["train"]["global_batch_size"] * cfg["model"]["seq_length"]
        # the rest of the trainer config is carried over untouched
        for section, values in family.items():
            if section not in ("family", "model", "train"):
                assert cfg[section] == values
        assert {k: v for k, v in cfg["train"].items() if k != "steps"} == family["train"]
    by_budget = {b: [r for r in runs if r.budget == b] for b in budgets}
    assert all(len(v) >= 3 for v in by_budget.values())


def test_family_rule_sets_width_depth_heads_ffn_and_experts():
    sizes = candidate_sizes(TEXT_FAMILY["family"])
    assert [s["hidden_size"] for s in sizes] == TEXT_FAMILY["family"]["widths"]
    for s in sizes:
        assert s["num_layers"] == max(1, round(s["hidden_size"] / 16))
        assert s["num_heads"] * 16 == s["hidden_size"]
        assert s["ffn_hidden_size"] % 16 == 0 and 0 <= s["ffn_hidden_size"] - 2.75 * s["hidden_size"] < 16
    moe = candidate_sizes(MOE_TRANSFUSION_FAMILY["family"])
    assert [s["moe"]["num_experts"] for s in moe] == [4, 8, 8, 16]
    assert [s["moe"]["ffn_hidden_size"] for s in moe] == [16, 32, 48, 64]
    assert [s["moe"]["shared_expert_ffn_hidden_size"] for s in moe] == [32, 64, 96, 128]
    runs = plan_sweep(MOE_TRANSFUSION_FAMILY, [1e13])
    cfg_model = {**MOE_TRANSFUSION_FAMILY["model"], **runs[0].model,
                 "moe": {**MOE_TRANSFUSION_FAMILY["model"]["moe"], **runs[0].model["moe"]}}
    assert runs[0].params == params(ModelShape.from_model_config({**cfg_model, "latent_dim": 48})).active_non_embedding


def test_sizes_picks_a_window_centred_on_tokens_per_param():
    family = copy.deepcopy(TEXT_FAMILY)
    family["family"]["tokens_per_param"] = 20
    every = plan_sweep(family, [3e14])
    chosen = plan_sweep(family, [3e14], sizes=3)
    assert len(chosen) == 3 and len(every) > 3
    ratio = [abs(math.log(r.tokens / r.params / 20)) for r in every]
    best = every[ratio.index(min(ratio))].name
    names = [r.name for r in chosen]
    assert names[1] == best and names == [r.name for r in every][[r.name for r in every].index(names[0]):][:3]


def test_launch_scripts(tmp_path):
    runs = plan_sweep(TEXT_FAMILY, [1e13, 3e13], sizes=4)
    local = write_plan(TEXT_FAMILY, runs, tmp_path / "local")[-1]
    text = local.read_text().splitlines()
    commands = [line for line in text if line.startswith("megafusion train")]
    assert len(commands) == len(runs)
    for line, run in zip(commands, runs):
        assert f"--config configs/{run.name}.yaml --run-dir runs/{run.name}" in line
        assert (tmp_path / "local" / "configs" / f"{run.name}.yaml").is_file()
    slurm = write_plan(TEXT_FAMILY, runs, tmp_path / "slurm", launcher="slurm", gpus_per_run=8)[-1]
    body = slurm.read_text()
    assert f"#SBATCH --array=0-{len(runs) - 1}" in body and "#SBATCH --gpus-per-node=8" in body
    assert body.count("torchrun --standalone --nproc_per_node 8 -m megafusion.train") == len(runs)
    assert (tmp_path / "slurm" / "logs").is_dir()
    for script in (local, slurm):
        subprocess.run(["bash", "-n", str(script)], check=True)  # valid shell
    # the array task picks its own run
    probe = slurm.read_text().replace('eval "${COMMANDS[$SLURM_ARRAY_TASK_ID]}"',
                                      'echo "${COMMANDS[$SLURM_ARRAY_TASK_ID]}"')
    out = subprocess.run(["bash", "-c", probe], env={"SLURM_ARRAY_TASK_ID": "2", "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, check=True).stdout
    assert f"runs/{runs[2].name}" in out


def test_unplannable_families_are_refused_clearly():
    with pytest.raises(PlanError, match="no 'family:' section"):
        plan_sweep({"model": {}}, [1e13])
    typo = copy.deepcopy(TEXT_FAMILY)
    typo["family"]["aspect_ration"] = typo["family"].pop("aspect_ratio")
    with pytest.raises(PlanError, match="unknown key 'family.aspect_ration'. Did you mean 'family.aspect_ratio'"):
        plan_sweep(typo, [1e13])
    both = copy.deepcopy(TEXT_FAMILY)
    both["family"]["sizes"] = [{"hidden_size": 32}]
    with pytest.raises(PlanError, match="either 'widths'.*or an explicit 'sizes'"):
        plan_sweep(both, [1e13])
    odd = copy.deepcopy(TEXT_FAMILY)
    odd["family"]["widths"] = [32, 40]
    with pytest.raises(PlanError, match=r"family.widths\[1\] = 40 is not a multiple of family.head_dim = 16"):
        plan_sweep(odd, [1e13])
    with pytest.raises(PlanError, match=r"budget 1e\+09 FLOPs: only 0 of 8 family sizes.*min_steps = 10"):
        plan_sweep(TEXT_FAMILY, [1e9])
    with pytest.raises(PlanError, match="at least 3 sizes"):
        plan_sweep(TEXT_FAMILY, [1e13], sizes=2)
    wrong_latent = copy.deepcopy(MOE_TRANSFUSION_FAMILY)
    wrong_latent["family"]["packing"]["latent_dim"] = 8  # the pixel representation 16 px / patch 4 gives 48
    with pytest.raises(PlanError, match="latent_dim = 8 but the vision representation gives latent patches of 48"):
        plan_sweep(wrong_latent, [1e13])
    both_packings = copy.deepcopy(MOE_TRANSFUSION_FAMILY)
    both_packings["family"]["packing"]["measure"] = 4
    with pytest.raises(PlanError, match="either measure .* or the nominal keys"):
        plan_sweep(both_packings, [1e13])
    measured_text = copy.deepcopy(TEXT_FAMILY)
    measured_text["family"]["packing"] = {"measure": 4}
    with pytest.raises(PlanError, match="measure counts the packing of Transfusion data"):
        plan_sweep(measured_text, [1e13])
    bad_trainer_key = copy.deepcopy(MOE_TRANSFUSION_FAMILY)
    bad_trainer_key["vision"] = {"representation": "pixels"}
    with pytest.raises(PlanError, match="vision.representation"):
        plan_sweep(bad_trainer_key, [1e13])


def test_explicit_sizes_and_the_cli(tmp_path, capsys):
    family = copy.deepcopy(TEXT_FAMILY)
    del family["family"]["widths"], family["family"]["aspect_ratio"], family["family"]["head_dim"]
    family["family"]["sizes"] = [{"hidden_size": h, "num_layers": l, "num_heads": 2}
                                 for h, l in ((32, 1), (32, 3), (64, 2), (64, 5))]
    path = tmp_path / "family.yaml"
    path.write_text(yaml.safe_dump(family))
    out = tmp_path / "sweep"
    assert isoflop_cli.main(["plan", "--budgets", "3e13,1e13", "--family", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "8 runs" in printed and "c1e13_h32_l3" in printed
    manifest = json.loads((out / "plan.json").read_text())
    assert manifest["budgets"] == [1e13, 3e13]
    cfg = yaml.safe_load((out / "configs" / "c3e13_h64_l5.yaml").read_text())
    assert (cfg["model"]["hidden_size"], cfg["model"]["num_layers"], cfg["model"]["num_heads"]) == (64, 5, 2)
    assert (out / "launch.sh").stat().st_mode & 0o111
    assert isoflop_cli.main(["plan", "--budgets", "1e13", "--family", str(tmp_path / "nope.yaml"),
                             "--out", str(out)]) == 2
    assert "family file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        isoflop_cli.main(["plan", "--budgets", "lots", "--family", str(path), "--out", str(out)])


def test_transfusion_family_counts_the_image_tokens_of_its_own_data(tmp_path):
    """The ShapesWorld family: FLOPs per step are the mean over the measured sequences of the
    accounting on the real packed samples (text, image latents, padding, attention pairs),
    with the latent width of the pixel representation; tokens are split by modality."""
    from megafusion.data.shapes_stream import ShapesStream
    from megafusion.data.sample import IMAGE, Sample, TEXT
    from megafusion.scaling.plan import trainer_config

    family = yaml.safe_load((CONFIGS / "isoflop_family_shapes.yaml").read_text())
    family["family"]["packing"] = {"measure": 6}
    family["family"]["widths"] = [16, 32, 48]
    runs = plan_sweep(family, [3e10])
    write_plan(family, runs, tmp_path)

    stream = ShapesStream.from_config(trainer_config(family))
    batch = Sample.collate([stream.sample(i) for i in range(6)])
    seq, gbs = family["model"]["seq_length"], family["train"]["global_batch_size"]
    image = int((batch.modality == IMAGE).sum())
    padding = int(((batch.modality == TEXT) & (batch.tokens == stream.tokenizer.pad_id)).sum())
    assert image > 0 and padding > 0  # the data really mixes images in, and packs with padding
    manifest = json.loads((tmp_path / "plan.json").read_text())
    per_sequence = manifest["packing"]["per_sequence"]
    assert per_sequence["image"] == pytest.approx(image / 6) and per_sequence["padding"] == pytest.approx(padding / 6)
    assert per_sequence["text"] + per_sequence["image"] + per_sequence["video"] + per_sequence["padding"] == seq

    for run in runs:
        size = run.model
        shape = ModelShape(hidden_size=size["hidden_size"], num_layers=size["num_layers"],
                           num_heads=size["num_heads"], ffn_hidden_size=size["ffn_hidden_size"],
                           vocab_size=family["model"]["vocab_size"], latent_dim=3 * 8 * 8,
                           time_conditioning="additive")
        per_step = gbs * training_flops_per_step(shape, batch.doc_ids, batch.span_ids, batch.modality) / 6
        assert run.flops == int(run.steps * per_step)
        assert abs(run.flops - run.budget) <= per_step / 2 + 1
        assert run.params == params(shape).active_non_embedding
        assert run.tokens == run.steps * gbs * seq  # D counts every position, image latents included
        assert run.tokens_by_modality["image"] == round(run.steps * gbs * image / 6)
        assert abs(sum(run.tokens_by_modality.values()) - run.tokens) <= 2  # (rounded per modality)
