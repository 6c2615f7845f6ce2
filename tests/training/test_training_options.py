"""Precision and activation recomputation through `megafusion train`."""

import pytest

from conftest import losses_by_step, run_train

COMMON = ["train.steps=3", "checkpoint.save_final=false", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def fp32_losses(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fp32")
    run_train(run_dir, "tiny_text.yaml", COMMON)
    return losses_by_step(run_dir)


def test_full_recompute_matches_exactly(tmp_path, fp32_losses):
    run_train(tmp_path, "tiny_text.yaml", COMMON + ["train.recompute=full"])
    got = losses_by_step(tmp_path)
    for step, loss in fp32_losses.items():
        assert got[step] == pytest.approx(loss, abs=1e-6)


def test_bf16_tracks_fp32(tmp_path, fp32_losses):
    run_train(tmp_path, "tiny_text.yaml", COMMON + ["train.precision=bf16"])
    got = losses_by_step(tmp_path)
    for step, loss in fp32_losses.items():
        assert got[step] == pytest.approx(loss, abs=2e-2)
