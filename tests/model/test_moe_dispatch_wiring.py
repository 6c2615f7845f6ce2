"""model.moe.dispatch = triton inside megatron-core's MoELayer (one process, EP=1, CPU, gloo).

The same MoELayer weights run with megatron's dispatch and with ours; outputs and all
gradients must agree to 1e-5 (fp32) for both dispatchers, dropless and with capacity drops.
The same comparison also runs with EP=2 across two gloo processes: this file is the
torchrun worker (``python -m torch.distributed.run --nproc_per_node 2 <this file>``).
"""

import functools
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from megafusion.model.grouped_experts import GroupedExperts
from megafusion.model.moe_dispatch import (
    ProfiledMoELayer,
    TritonAllGatherTokenDispatcher,
    TritonAlltoAllTokenDispatcher,
    TritonDispatchMoELayer,
    routing_map_to_topk,
    with_moe_dispatch,
)


def moe_config(dispatcher, capacity_factor=None, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(num_layers=1, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, moe_ffn_hidden_size=24,
              num_moe_experts=6, moe_router_topk=2, moe_token_dispatcher_type=dispatcher,
              moe_aux_loss_coeff=0.0, add_bias_linear=False, gated_linear_unit=True,
              activation_func=torch.nn.functional.silu, use_cpu_initialization=True,
              params_dtype=torch.float32, bf16=False)
    if capacity_factor is not None:
        kw.update(moe_expert_capacity_factor=capacity_factor, moe_token_drop_policy="probs")
    kw.update(overrides)
    return TransformerConfig(**kw)


def run_layer(layer, x):
    x = x.clone().requires_grad_()
    out, _ = layer(x)
    out.square().sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    experts = layer.experts
    if isinstance(experts, GroupedExperts):  # SequentialMLP's names for the stacked gradients
        for stacked, linear in (("weight1", "linear_fc1"), ("weight2", "linear_fc2")):
            g = grads.pop(f"experts.{stacked}")
            grads.update({f"experts.local_experts.{i}.{linear}.weight": g[i] for i in range(g.shape[0])})
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5], ids=["dropless", "drop"])
@pytest.mark.parametrize("experts", ["megatron", "grouped"])
def test_triton_dispatch_matches_megatron(megatron_world, dispatcher, capacity_factor, experts):
    config = moe_config(dispatcher, capacity_factor)
    layer_submodules = get_layer_submodules(config.num_moe_experts)
    megatron_builder = layer_submodules.mlp
    triton_builder = with_moe_dispatch(layer_submodules, "triton", experts).mlp

    torch.manual_seed(0)
    ref = megatron_builder(config=config)
    ours = triton_builder(config=config)
    assert type(ours) is TritonDispatchMoELayer
    expected = {"allgather": TritonAllGatherTokenDispatcher, "alltoall": TritonAlltoAllTokenDispatcher}[dispatcher]
    assert type(ours.token_dispatcher) is expected
    ours.load_state_dict(ref.state_dict())

    x = torch.randn(10, 2, config.hidden_size)  # [seq, batch, hidden]
    with torch.no_grad():
        _, routing_map = ref.router(x.view(-1, config.hidden_size))
    kept = int(routing_map.sum())
    assert kept == 20 * 2 if capacity_factor is None else kept < 20 * 2  # the drop case really drops
    out_ref, dx_ref, g_ref = run_layer(ref, x)
    out, dx, g = run_layer(ours, x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    assert g.keys() == g_ref.keys()
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-5, atol=1e-5, msg=name)
    assert g["router.weight"].abs().sum() > 0  # the router is trained through the routing weights


def get_layer_submodules(num_experts):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules

    return get_gpt_layer_local_submodules(num_experts=num_experts, moe_grouped_gemm=False)


def test_with_moe_dispatch_spec_forms():
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer

    sub = get_layer_submodules(4)
    profiled = with_moe_dispatch(sub, "megatron")
    assert profiled.mlp.func is ProfiledMoELayer and profiled.mlp.keywords == sub.mlp.keywords
    grouped = with_moe_dispatch(sub, "megatron", "grouped").mlp.keywords["submodules"]
    assert grouped.experts is GroupedExperts and grouped.router is sub.mlp.keywords["submodules"].router
    spec = ModuleSpec(module=TransformerLayer, submodules=sub)
    swapped = with_moe_dispatch(spec, "triton")
    assert isinstance(swapped.submodules.mlp, functools.partial)
    assert swapped.submodules.mlp.func is TritonDispatchMoELayer
    assert swapped.submodules.mlp.keywords == sub.mlp.keywords
    assert sub.mlp.func.__name__ == "MoELayer"  # the input spec is not modified
    with pytest.raises(ValueError, match="not one of"):
        with_moe_dispatch(sub, "te")
    with pytest.raises(ValueError, match="model.moe.experts"):
        with_moe_dispatch(sub, "triton", "te")
    with pytest.raises(ValueError, match="MoELayer"):
        with_moe_dispatch(get_gpt_layer_dense_submodules(), "triton")


def get_gpt_layer_dense_submodules():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules

    return get_gpt_layer_local_submodules(num_experts=None)


def test_unsupported_settings_are_refused(megatron_world):
    config = moe_config("alltoall", capacity_factor=1.0, moe_pad_expert_input_to_capacity=True)
    with pytest.raises(ValueError, match="moe_pad_expert_input_to_capacity"):
        with_moe_dispatch(get_layer_submodules(6), "triton").mlp(config=config)


def test_version_check_reads_megatron_core_version_not_dist_info(megatron_world, monkeypatch):
    """megatron-core on PYTHONPATH without its dist-info (the GPU machines' copy): the check
    reads megatron.core.__version__, ignores a local build suffix, and still refuses others."""
    from importlib import metadata

    import megatron.core

    from megafusion.model import moe_dispatch

    def no_dist_info(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", no_dist_info)
    config = moe_config("alltoall")
    monkeypatch.setattr(megatron.core, "__version__", "0.19.2+f6a5b40")
    moe_dispatch._check_supported(config)
    monkeypatch.setattr(megatron.core, "__version__", "0.20.0")
    with pytest.raises(RuntimeError, match="megatron-core 0.20.0 is installed"):
        moe_dispatch._check_supported(config)


def test_routing_map_to_topk():
    routing_map = torch.tensor([[False, True, False, True], [False, False, False, False], [True, False, False, False]])
    probs = torch.arange(12.0).view(3, 4)
    idx, p = routing_map_to_topk(routing_map, probs, 2)
    assert idx.tolist() == [[1, 3], [-1, -1], [0, -1]]
    assert p.tolist() == [[1.0, 3.0], [0.0, 0.0], [8.0, 0.0]]


# ------------------------------------------------------------------------ EP=2, torchrun


@pytest.mark.distributed
def test_triton_dispatch_matches_megatron_with_ep2():
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("moe-dispatch-ep2 ok") == 2, proc.stdout[-3000:]


def _ep2_worker() -> None:
    """Each rank: megatron's and our dispatch (and experts) on the same weights and inputs, EP=2."""
    from megatron.core import parallel_state, tensor_parallel

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    rank = dist.get_rank()
    settings = [(d, c, "megatron") for d in ("allgather", "alltoall") for c in (None, 0.5)]
    settings += [(d, None, "grouped") for d in ("allgather", "alltoall")]  # 3 experts per rank
    for dispatcher, capacity_factor, experts in settings:
        config = moe_config(dispatcher, capacity_factor)
        sub = get_layer_submodules(config.num_moe_experts)
        ref = sub.mlp(config=config)
        ours = with_moe_dispatch(sub, "triton", experts).mlp(config=config)
        ours.load_state_dict(ref.state_dict())
        assert ours.num_local_experts == 3 and ours.local_expert_indices[0] == 3 * rank
        if experts == "grouped":
            assert ours.experts.weight1.shape[0] == 3
        x = torch.randn(8, 2, config.hidden_size, generator=torch.Generator().manual_seed(rank))
        results = run_layer(ref, x), run_layer(ours, x)
        (out_ref, dx_ref, g_ref), (out, dx, g) = results
        where = f"rank {rank}, {dispatcher}, capacity_factor={capacity_factor}, experts={experts}"
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{where}: {m}")
        torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{where}: {m}")
        for name in g_ref:
            torch.testing.assert_close(g[name], g_ref[name], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{where}, {name}: {m}")
    print(f"moe-dispatch-ep2 ok rank {rank}", flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    from megafusion.parallel import cpu_compat

    with cpu_compat.applied("cpu"):  # this worker process, as an entry point would
        _ep2_worker()
