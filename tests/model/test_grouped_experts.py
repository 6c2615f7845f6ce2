"""model.moe.experts = grouped: GroupedExperts against megatron-core's SequentialMLP (CPU, gloo, EP=1).

Same weights in both modules: outputs and every gradient agree to 1e-5 (fp32), also for
experts that get no token; plain and sharded state dicts name and shape the same tensors,
so checkpoints of either load into the other and megafusion's layout-independent init
draws the same weights. EP=2 sharding is covered by tests/model/test_moe_train_dispatch.py.
"""

import types

import pytest
import torch
import torch.nn.functional as F

from megafusion.model.grouped_experts import GroupedExperts

HIDDEN, FFN = 16, 12


def expert_config(gated=True, activation=F.silu, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(num_layers=1, hidden_size=HIDDEN, num_attention_heads=2, ffn_hidden_size=32, moe_ffn_hidden_size=FFN,
              num_moe_experts=4, moe_router_topk=2, add_bias_linear=False, gated_linear_unit=gated,
              activation_func=activation, use_cpu_initialization=True, params_dtype=torch.float32)
    kw.update(overrides)
    return TransformerConfig(**kw)


def pgs():
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    return get_default_pg_collection()


def build_pair(config):
    from megatron.core.models.backends import LocalSpecProvider

    torch.manual_seed(0)
    sequential = LocalSpecProvider().grouped_mlp_modules(False)(config.num_moe_experts, config, pg_collection=pgs())
    grouped = GroupedExperts(config.num_moe_experts, config, pg_collection=pgs())
    result = grouped.load_state_dict(sequential.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return sequential, grouped


def run(module, x, counts, probs, dy):
    x, probs = x.clone().requires_grad_(), probs.clone().requires_grad_()
    y, bias = module(x, counts, probs)
    assert bias is None
    y.backward(dy)
    return y.detach(), x.grad, probs.grad


@pytest.mark.parametrize("gated,activation", [(True, F.silu), (False, F.gelu)], ids=["swiglu", "gelu"])
def test_grouped_matches_sequential_forward_backward(megatron_world, gated, activation):
    config = expert_config(gated, activation)
    sequential, grouped = build_pair(config)
    counts = torch.tensor([3, 0, 5, 0])  # experts 1 and 3 get no token
    n = int(counts.sum())
    g = torch.Generator().manual_seed(1)
    x, probs, dy = torch.randn(n, HIDDEN, generator=g), torch.rand(n, generator=g), torch.randn(n, HIDDEN, generator=g)
    y_ref, dx_ref, dp_ref = run(sequential, x, counts, probs, dy)
    y, dx, dp = run(grouped, x, counts, probs, dy)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol)
    torch.testing.assert_close(dp, dp_ref, **tol)
    for i, expert in enumerate(sequential.local_experts):
        torch.testing.assert_close(grouped.weight1.grad[i], expert.linear_fc1.weight.grad, **tol)
        torch.testing.assert_close(grouped.weight2.grad[i], expert.linear_fc2.weight.grad, **tol)
        if counts[i] == 0:
            assert grouped.weight1.grad[i].abs().sum() == 0 and grouped.weight2.grad[i].abs().sum() == 0
    assert grouped.weight1.grad[0].abs().sum() > 0


def test_no_rows_at_all(megatron_world):
    _, grouped = build_pair(expert_config())
    x = torch.zeros(0, HIDDEN, requires_grad=True)
    y, _ = grouped(x, torch.zeros(4, dtype=torch.int64), torch.zeros(0))
    y.sum().backward()
    assert y.shape == (0, HIDDEN) and grouped.weight1.grad.abs().sum() == 0


def test_state_dict_is_sequentials(megatron_world):
    sequential, grouped = build_pair(expert_config())
    ours, ref = grouped.state_dict(), sequential.state_dict()
    assert list(ours) == list(ref)  # same keys, same order (incl. the linears' _extra_state)
    for k in ref:
        if ref[k] is None:
            assert ours[k] is None
        else:
            torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=0)
    other, _ = build_pair(expert_config())
    with torch.no_grad():
        grouped.weight2.mul_(2)
    assert not other.load_state_dict(grouped.state_dict(), strict=True).missing_keys
    torch.testing.assert_close(other.local_experts[3].linear_fc2.weight, grouped.weight2[3], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="local_experts.2.linear_fc1.weight"):
        grouped.load_state_dict({k: v for k, v in ref.items() if k != "local_experts.2.linear_fc1.weight"})
    with pytest.raises(RuntimeError, match="size mismatch"):
        grouped.load_state_dict({**ref, "local_experts.0.linear_fc2.weight": torch.zeros(3, 3)})


def leaves(sharded_state_dict):
    """(checkpoint key, global offset) -> (global shape, fragmentation, replica, prepend axes, local data)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    apply_factories(sharded_state_dict)
    out = {}
    for v in nested_values(sharded_state_dict):
        if isinstance(v, ShardedTensor):
            out[(v.key, v.global_offset)] = (v.global_shape, v.axis_fragmentations, v.replica_id,
                                             v.prepend_axis_num, v.data.detach().clone())
        else:
            assert isinstance(v, ShardedObject)
            out[(v.key, v.global_offset)] = (v.global_shape, None, v.replica_id, None, v.data)
    return out


@pytest.mark.parametrize("singleton", [False, True], ids=["stacked", "singleton_local_shards"])
def test_sharded_state_dict_describes_sequentials_tensors(megatron_world, singleton):
    sequential, grouped = build_pair(expert_config())
    args = dict(prefix="decoder.layers.1.mlp.experts.", sharded_offsets=((0, 1, 2),),
                metadata={"singleton_local_shards": singleton})
    from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding

    ssds = [m.sharded_state_dict(**args) for m in (grouped, sequential)]
    for ssd in ssds:  # what the transformer block does to its layers' entries
        replace_prefix_for_sharding(ssd, "decoder.layers.1.", "decoder.layers.")
    ours, ref = leaves(ssds[0]), leaves(ssds[1])
    assert all(key.startswith("decoder.layers.mlp.experts.experts.") for key, _ in ref)
    assert ours.keys() == ref.keys() and len(ref) == 4 * 5  # per expert: fc1 halves w, v; fc2; 2 extra states
    for key, (shape, frag, replica, prepend, data) in ref.items():
        o = ours[key]
        assert o[:4] == (shape, frag, replica, prepend), key
        if isinstance(data, torch.Tensor):
            torch.testing.assert_close(o[4], data, rtol=0, atol=0)


def test_dist_checkpoint_loads_across_sequential_and_grouped(megatron_world, tmp_path):
    from megatron.core import dist_checkpointing

    sequential, grouped = build_pair(expert_config())
    with torch.no_grad():
        grouped.weight1.mul_(-1.5)  # make them differ
    prefix = "mlp.experts."
    for src, dst, name in ((grouped, sequential, "g2s"), (sequential, grouped, "s2g")):
        with torch.no_grad():
            src.weight1.add_(0.25) if src is grouped else src.local_experts[1].linear_fc2.weight.add_(0.5)
        expected = {k: v.clone() for k, v in src.state_dict(prefix=prefix).items() if v is not None}
        (tmp_path / name).mkdir()
        dist_checkpointing.save(src.sharded_state_dict(prefix=prefix), str(tmp_path / name))
        loaded = dist_checkpointing.load(dst.sharded_state_dict(prefix=prefix), str(tmp_path / name))
        dst.load_state_dict({k[len(prefix):]: v for k, v in loaded.items()}, strict=True)
        for k, v in dst.state_dict(prefix=prefix).items():
            if v is not None:
                torch.testing.assert_close(v, expected[k], rtol=0, atol=0, msg=f"{name} {k}")


def test_layout_independent_init_is_sequentials(megatron_world):
    from megafusion.model.init import init_weights

    sequential, grouped = build_pair(expert_config())
    for m in (sequential, grouped):
        init_weights(m, seed=7, std=0.02, num_layers=2)
    for k, v in sequential.state_dict().items():
        if v is not None:
            torch.testing.assert_close(grouped.state_dict()[k], v, rtol=0, atol=0)
    assert grouped.weight1.std() > 0.01


def test_optimizer_state_maps_to_the_stacked_parameters(megatron_world):
    """megatron's optimizer finds a parameter's sharded tensor by identity: each stacked weight has one."""
    from megatron.core.dist_checkpointing.optimizer import get_param_id_to_sharded_param_map

    _, grouped = build_pair(expert_config())
    mapping = get_param_id_to_sharded_param_map(grouped.sharded_state_dict(), iter([grouped.weight1, grouped.weight2]))
    assert sorted(mapping) == [0, 1]


def test_expert_tensor_parallel_and_other_settings_are_refused(megatron_world):
    fake = types.SimpleNamespace(**{name: getattr(pgs(), name) for name in ("ep", "expt_dp")},
                                 expt_tp=types.SimpleNamespace(size=lambda: 2))
    with pytest.raises(ValueError, match="parallel.tp"):
        GroupedExperts(4, expert_config(), pg_collection=fake)
    with pytest.raises(ValueError, match="gated activation"):
        GroupedExperts(4, expert_config(activation=F.gelu), pg_collection=pgs())
    with pytest.raises(ValueError, match="add_bias_linear"):
        GroupedExperts(4, expert_config(add_bias_linear=True), pg_collection=pgs())


def test_expert_parameter_flags_follow_megatrons(megatron_world):
    sequential, grouped = build_pair(expert_config())
    ref = sequential.local_experts[0]
    for ours, theirs in ((grouped.weight1, ref.linear_fc1.weight), (grouped.weight2, ref.linear_fc2.weight)):
        assert ours.allreduce == theirs.allreduce and ours.tensor_model_parallel == theirs.tensor_model_parallel
