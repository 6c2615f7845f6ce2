"""`megafusion train` at EP=2 (torchrun, gloo): our MoE path equals megatron-core's, step by step.

tiny_transfusion_moe.yaml (per-modality shared experts, top-2 of 4 experts, 2 per EP rank)
trains with ``model.moe.dispatch = triton`` + ``model.moe.experts = grouped`` and with
megatron's dispatch + SequentialMLP; loss and grad norm agree to 1e-5 at every step, over
the alltoall and the allgather dispatchers. The grouped run's checkpoint (model and
optimizer state) then resumes with megatron's modules and continues the megatron run.
"""

import pytest

from conftest import losses_by_step, run_train

SMALL = ["parallel.ep=2", "model.seq_length=128", "train.micro_batch_size=1", "train.global_batch_size=2",
         "schedule.warmup_steps=1", "logging.tensorboard=false"]


def assert_same_steps(ours, ref, what):
    assert sorted(ours) == sorted(ref), what
    for step in ref:
        assert ours[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), f"{what}, step {step}"


@pytest.mark.distributed
@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_triton_dispatch_and_grouped_experts_train_like_megatron_at_ep2(tmp_path, dispatcher):
    common = SMALL + [f"model.moe.dispatcher={dispatcher}"]
    megatron = common + ["model.moe.dispatch=megatron", "model.moe.experts=megatron"]
    ours = common + ["model.moe.dispatch=triton", "model.moe.experts=grouped"]
    resume = dispatcher == "alltoall"  # the checkpoint round trip once is enough
    run_train(tmp_path / "megatron", "tiny_transfusion_moe.yaml", megatron + [f"train.steps={3 if resume else 2}"],
              nproc=2)
    run_train(tmp_path / "ours", "tiny_transfusion_moe.yaml", ours + ["train.steps=2", "checkpoint.every=2"], nproc=2)
    for key in ("loss", "grad_norm"):
        ref = losses_by_step(tmp_path / "megatron", key)
        got = losses_by_step(tmp_path / "ours", key)
        assert len(got) == 2
        assert_same_steps(got, {s: v for s, v in ref.items() if s <= 2}, f"{dispatcher} {key}")
    if resume:
        # the grouped experts' checkpoint loads into SequentialMLP (weights and Adam state)
        run_train(tmp_path / "ours", "tiny_transfusion_moe.yaml", megatron + ["train.steps=3"], nproc=2)
        for key in ("loss", "grad_norm"):
            ref, got = losses_by_step(tmp_path / "megatron", key), losses_by_step(tmp_path / "ours", key)
            assert 3 in got, f"the resumed run did not log step 3: {got}"
            assert got[3] == pytest.approx(ref[3], rel=1e-5, abs=1e-6), f"resumed {key}"


def test_text_moe_model_honours_dispatch_and_experts(tmp_path):
    """The text model builds its MoE layers through the same dispatch/experts choice."""
    small = ["train.steps=3", "train.global_batch_size=4", "logging.tensorboard=false", "checkpoint.save_final=false"]
    run_train(tmp_path / "megatron", "tiny_text_moe.yaml", small)
    run_train(tmp_path / "ours", "tiny_text_moe.yaml", small + ["model.moe.dispatch=triton", "model.moe.experts=grouped"])
    assert_same_steps(losses_by_step(tmp_path / "ours"), losses_by_step(tmp_path / "megatron"), "text moe loss")


def test_text_moe_model_builds_the_chosen_modules(megatron_world):
    import torch

    from megafusion.config import load_config
    from megafusion.model.grouped_experts import GroupedExperts
    from megafusion.model.moe_dispatch import TritonAlltoAllTokenDispatcher, TritonDispatchMoELayer
    from megafusion.model.transformer_config import build_transformer_config
    from megafusion.recipes.text import TextModelProvider

    from conftest import CONFIGS

    cfg = load_config(CONFIGS / "tiny_text_moe.yaml", ["model.moe.dispatch=triton", "model.moe.experts=grouped"])
    model = TextModelProvider(cfg, build_transformer_config(cfg, torch.device("cpu"))).build(True, True, None)
    layers = [m for m in model.modules() if isinstance(m, TritonDispatchMoELayer)]
    assert len(layers) == cfg.model.num_layers
    assert all(isinstance(m.token_dispatcher, TritonAlltoAllTokenDispatcher) for m in layers)
    assert all(isinstance(m.experts, GroupedExperts) for m in layers)
