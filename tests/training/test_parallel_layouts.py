"""Every parallel layout reproduces the single-process losses, through `megafusion train`.

Weights are initialised independently of layout and losses are summed per token, so in
fp32 the per-step losses of any (TP, PP, EP, DP) layout equal the world-size-1 run up to
reduction order (1e-5).
"""

import pytest

from conftest import losses_by_step, run_train

STEPS = 3
COMMON = [f"train.steps={STEPS}", "checkpoint.save_final=false", "logging.tensorboard=false"]

DENSE_LAYOUTS = {
    "dp2": (2, ["train.global_batch_size=8"]),
    "dp2_distributed_optimizer": (2, ["parallel.distributed_optimizer=true"]),
    "tp2": (2, ["parallel.tp=2"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sp=true"]),
    "pp2_1f1b_4_microbatches": (2, ["parallel.pp=2"]),  # global 8 / micro 2 = 4 micro-batches
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
    "pp2_vpp2_interleaved": (2, ["parallel.pp=2", "parallel.vpp=2"]),
}
MOE_LAYOUTS = {
    "ep2_alltoall": (2, ["parallel.ep=2", "model.moe.dispatcher=alltoall"]),
    "ep2_allgather": (2, ["parallel.ep=2", "model.moe.dispatcher=allgather"]),
}


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory):
    refs = {}
    for name, config in (("text", "tiny_text.yaml"), ("moe", "tiny_text_moe.yaml")):
        run_dir = tmp_path_factory.mktemp("ref")
        run_train(run_dir, config, COMMON)
        refs[name] = losses_by_step(run_dir)
        assert sorted(refs[name]) == list(range(1, STEPS + 1))
    return refs


def _check(tmp_path, reference_losses, name, config, nproc, overrides):
    run_train(tmp_path, config, COMMON + overrides, nproc=nproc)
    got, ref = losses_by_step(tmp_path), reference_losses[name]
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=1e-5), f"step {step}: {got[step]} vs world-size-1 {ref[step]}"


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(DENSE_LAYOUTS))
def test_dense_layout_matches_single_process(tmp_path, reference_losses, name):
    nproc, overrides = DENSE_LAYOUTS[name]
    _check(tmp_path, reference_losses, "text", "tiny_text.yaml", nproc, overrides)


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(MOE_LAYOUTS))
def test_moe_layout_matches_single_process(tmp_path, reference_losses, name):
    nproc, overrides = MOE_LAYOUTS[name]
    _check(tmp_path, reference_losses, "moe", "tiny_text_moe.yaml", nproc, overrides)
