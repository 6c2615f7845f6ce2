"""The step-time model: each term against its closed form, and every assumption changes it."""

from __future__ import annotations

import math

import pytest

from megafusion.config import load_config
from megafusion.scaling.flops import ModelShape, flop_breakdown, nominal_packing, params, peak_flops
from megafusion.scaling.plan import packing_of
from megafusion.scaling.step_time import Hardware, estimate_step_time

H100_BF16 = 989.4e12


def _text(**sets):
    """A bf16 text model of 8 layers, width 1024, 2048 positions, and its shape and packing."""
    base = {"model.kind": "text", "model.vocab_size": 32768, "model.hidden_size": 1024, "model.num_layers": 8,
            "model.num_heads": 8, "model.seq_length": 2048, "train.precision": "bf16",
            "train.micro_batch_size": 1, "train.global_batch_size": 64}
    base.update(sets)
    cfg = load_config(None, [f"{k}={v}" for k, v in base.items()])
    tree = cfg.to_dict()
    shape = ModelShape.from_model_config(tree["model"])
    return cfg, shape, packing_of(tree)


def test_compute_is_the_batch_flops_over_the_gpus_at_the_assumed_mfu():
    cfg, shape, packing = _text()
    layout = nominal_packing(2048)  # one causal document: what packing_of gives a text model
    fwd = flop_breakdown(shape, *layout).forward
    est = estimate_step_time(cfg, shape, packing, world_size=8, hardware=Hardware(mfu=0.5))
    assert est.flops_per_step == pytest.approx(3 * fwd * 64)
    assert est.compute_s == pytest.approx(3 * fwd * 64 / 8 / (0.5 * H100_BF16))
    # the MFU assumption is used: halving it doubles the compute time
    slower = estimate_step_time(cfg, shape, packing, world_size=8, hardware=Hardware(mfu=0.25))
    assert slower.compute_s == pytest.approx(2 * est.compute_s)
    assert est.tokens_per_s == pytest.approx(64 * 2048 / est.total_s)


@pytest.mark.parametrize("pp, vpp, world, expected", [(4, None, 32, 3 / 8), (4, 2, 32, 3 / 16), (2, None, 8, 1 / 16)])
def test_bubble_is_the_1f1b_fraction(pp, vpp, world, expected):
    sets = {"parallel.pp": pp}
    if vpp:
        sets["parallel.vpp"] = vpp
    cfg, shape, packing = _text(**sets)
    est = estimate_step_time(cfg, shape, packing, world_size=world)
    micro = 64 // (world // pp)
    assert (pp - 1) / (micro * (vpp or 1)) == pytest.approx(expected)
    assert est.bubble_s == pytest.approx(expected * est.compute_s)


def test_tensor_parallel_communication_within_and_across_nodes():
    cfg, shape, packing = _text(**{"parallel.tp": 2})
    est = estimate_step_time(cfg, shape, packing, world_size=2)
    message = 2048 * 1024 * 2  # one layer's bf16 activations
    per_all_reduce = 2 * (2 - 1) / 2 * message / 450e9
    # 64 micro-batches x 8 layers x (forward + backward) x 2 all-reduces
    assert est.tp_comm_s == pytest.approx(64 * 8 * 2 * 2 * per_all_reduce)
    full = estimate_step_time(load_config(None, [*_overrides(cfg), "train.recompute=full"]), shape, packing, 2)
    assert full.tp_comm_s == pytest.approx(1.5 * est.tp_comm_s)  # the recomputed forward talks again
    # the same group over 2-GPU nodes crosses InfiniBand: 450 / 50 times slower
    across = estimate_step_time(cfg, shape, packing, world_size=2, hardware=Hardware(gpus_per_node=1))
    assert across.tp_comm_s == pytest.approx(9 * est.tp_comm_s)


def _overrides(cfg) -> list[str]:
    tree = cfg.to_dict()
    return [f"{section}.{key}={value}" for section in ("model", "parallel", "train")
            for key, value in tree[section].items() if not isinstance(value, dict) and value is not None]


def test_data_parallel_sync_and_the_distributed_optimizer():
    cfg, shape, packing = _text()
    plain = estimate_step_time(cfg, shape, packing, world_size=4, params_per_rank=1_000_000)
    assert plain.dp_comm_s == pytest.approx(2 * 3 / 4 * 4e6 / 450e9)  # fp32 gradient all-reduce
    dist_opt = estimate_step_time(load_config(None, [*_overrides(cfg), "parallel.distributed_optimizer=true"]),
                                  shape, packing, world_size=4, params_per_rank=1_000_000)
    # reduce-scatter of fp32 gradients + all-gather of bf16 weights: 6 bytes instead of 8
    assert dist_opt.dp_comm_s == pytest.approx(0.75 * plain.dp_comm_s)
    default = estimate_step_time(cfg, shape, packing, world_size=4)  # the transformer's own count
    assert default.dp_comm_s == pytest.approx(2 * 3 / 4 * params(shape).total * 4 / 450e9)


def test_expert_parallel_all_to_all():
    cfg, shape, packing = _text(**{"model.moe.num_experts": 8, "model.moe.top_k": 2, "parallel.ep": 4})
    est = estimate_step_time(cfg, shape, packing, world_size=4)
    moved = 2048 * 2 * 1024 * 2 * 3 / 4  # top-2 copies of every token, 3/4 leave the GPU
    # dp 4: 16 micro-batches per step x 8 layers x (forward + backward) x (dispatch + combine)
    assert est.ep_comm_s == pytest.approx(16 * 8 * 2 * 2 * moved / 450e9)
    dense = estimate_step_time(_text()[0], shape, packing, world_size=4)
    assert dense.ep_comm_s == 0


def test_unknown_gpu_and_bad_assumptions_are_refused():
    cfg, shape, packing = _text()
    with pytest.raises(ValueError, match="'RTX 9090'"):
        estimate_step_time(cfg, shape, packing, 1, Hardware(gpu="RTX 9090"))
    with pytest.raises(ValueError, match="mfu = 1.5"):
        Hardware(mfu=1.5)
    assert peak_flops("H100 SXM", "bf16") == H100_BF16
    assert math.isfinite(estimate_step_time(cfg, shape, packing, 1).total_s)


def test_routed_experts_sync_over_the_expert_data_parallel_group():
    cfg, shape, packing = _text(**{"model.moe.num_experts": 8, "model.moe.top_k": 2, "parallel.ep": 4})
    # world 8: dense parameters over dp 8, routed experts over expert-dp 8 / 4 = 2
    est = estimate_step_time(cfg, shape, packing, world_size=8, params_per_rank=3_000_000,
                             expert_params_per_rank=2_000_000)
    dense, experts = 2 * 7 / 8 * 1e6 * 4, 2 * 1 / 2 * 2e6 * 4
    assert est.dp_comm_s == pytest.approx((dense + experts) / 450e9)
