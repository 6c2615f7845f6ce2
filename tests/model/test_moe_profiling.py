"""The profiler range ``megafusion.moe_dispatch`` around MoE token dispatch and combine (CPU profiler).

One forward of the Transfusion MoE layer (ModalityMoELayer, as the model builds it) under
torch.profiler, for megatron's and our dispatch: the range appears once per dispatch/combine
step, and the permute/unpermute work (megatron's index ops, or our Triton custom ops) runs
inside it while the expert matmuls do not.
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from megafusion.config import load_config
from megafusion.model.ffn import ffn_spec
from megafusion.model.routing import ModalityContext
from megafusion.model.moe_dispatch import DISPATCH_RANGE, TritonDispatchMoELayer, with_moe_dispatch

STEPS = ("dispatch_preprocess", "token_dispatch", "dispatch_postprocess", "combine_preprocess", "token_combine",
         "combine_postprocess")


def build_layer(dispatch, experts, dispatcher="alltoall"):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megafusion.model.transformer_config import build_transformer_config

    cfg = load_config(overrides=["model.kind=transfusion", "model.hidden_size=16", "model.ffn_hidden_size=24",
                                 "model.num_heads=2", "model.moe.num_experts=4", "model.moe.ffn_hidden_size=8",
                                 f"model.moe.dispatch={dispatch}", f"model.moe.experts={experts}",
                                 f"model.moe.dispatcher={dispatcher}"])
    tc = build_transformer_config(cfg, torch.device("cpu"))
    ctx = ModalityContext()
    layer = ffn_spec(cfg, tc, ctx)(config=tc, pg_collection=get_default_pg_collection(), is_mtp_layer=False,
                                   name="mlp")
    layer.set_layer_number(1)
    ctx.set(torch.zeros(2, 6, dtype=torch.int64))  # [batch, seq] all text
    return layer


def ranges_of(prof):
    """[(name, start_us, end_us)] of the recorded CPU events."""
    return [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()]


def inside(events, ranges):
    return [name for name, s, e in events if any(rs <= s and e <= re for rs, re in ranges)]


@pytest.mark.parametrize("dispatch,experts", [("megatron", "megatron"), ("triton", "grouped")])
def test_dispatch_range_in_a_cpu_profile_of_one_moe_forward(megatron_world, dispatch, experts):
    layer = build_layer(dispatch, experts)
    x = torch.randn(6, 2, 16)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        layer(x)
    events = ranges_of(prof)
    dispatch_ranges = [(s, e) for name, s, e in events if name == DISPATCH_RANGE]
    assert len(dispatch_ranges) == len(STEPS), [name for name, _, _ in events]
    within = inside(events, dispatch_ranges)
    permute_ops = ({"megafusion::moe_scatter_rows", "megafusion::moe_gather_sum"} if dispatch == "triton"
                   else {"aten::index_select", "aten::scatter_add_"})
    assert permute_ops <= set(within), sorted(set(within))
    matmuls = [s for name, s, _ in events if name in ("aten::mm", "aten::matmul")]
    assert matmuls and not inside([(n, s, e) for n, s, e in events if n in ("aten::mm", "aten::matmul")],
                                  dispatch_ranges), "the expert matmuls must stay outside the dispatch range"


def test_triton_dispatch_layer_of_a_plain_spec_is_profiled_too(megatron_world):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules

    from megafusion.model.transformer_config import build_transformer_config

    cfg = load_config(overrides=["model.hidden_size=16", "model.ffn_hidden_size=24", "model.num_heads=2",
                                 "model.moe.num_experts=4", "model.moe.ffn_hidden_size=8"])
    tc = build_transformer_config(cfg, torch.device("cpu"))
    sub = with_moe_dispatch(get_gpt_layer_local_submodules(num_experts=4, moe_grouped_gemm=False), "triton", "grouped")
    layer = sub.mlp(config=tc)
    assert isinstance(layer, TritonDispatchMoELayer) and type(layer.experts).__name__ == "GroupedExperts"
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        layer(torch.randn(6, 2, 16))
    assert sum(name == DISPATCH_RANGE for name, _, _ in ranges_of(prof)) == len(STEPS)
