"""Feed-forward variants of the Transfusion layer (megafusion.model.modality_ffn / moe), CPU, gloo.

References are plain torch written from the weights (SwiGLU MLP), megatron's own MoELayer
with the same weights, and brute-force counts from the router's top-k. The TP2+SP / EP2
comparisons with a world-size-1 run are in the torchrun worker at the bottom of this file.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megafusion.config import load_config
from megafusion.data.sample import IMAGE, TEXT, VIDEO
from megafusion.model.ffn import ffn_spec
from megafusion.model.modality_ffn import ModalityFFN
from megafusion.model.moe import (
    ModalityMoELayer,
    routing_counts,
    routing_stats_from_counts,
)
from megafusion.model.routing import ModalityContext, model_contexts

HIDDEN, FFN, SEQ, BATCH = 16, 24, 12, 2


def run_config(*overrides):
    base = [f"model.hidden_size={HIDDEN}", f"model.ffn_hidden_size={FFN}", "model.num_heads=2", "model.num_layers=2",
            "model.kind=transfusion"]
    return load_config(overrides=base + list(overrides))


def transformer_config_for(cfg):
    from megafusion.model.transformer_config import build_transformer_config

    return build_transformer_config(cfg, torch.device("cpu"))


def pgs():
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    return get_default_pg_collection()


def random_modality(seed=0, batch=BATCH, seq=SEQ):
    g = torch.Generator().manual_seed(seed)
    mod = torch.randint(0, 3, (batch, seq), generator=g)
    mod[0, 0], mod[0, 1], mod[1, 0] = TEXT, IMAGE, VIDEO  # every modality present
    return mod


def swiglu_reference(x, mlp):
    """Plain-torch SwiGLU MLP from a megatron MLP's weights (TP=1): x [n, h] -> [n, h]."""
    gate, up = F.linear(x, mlp.linear_fc1.weight).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, mlp.linear_fc2.weight)


def grads_of(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------- modality FFN


def test_modality_ffn_matches_separate_mlps(megatron_world):
    cfg = run_config("model.ffn=modality")
    tc = transformer_config_for(cfg)
    ctx = ModalityContext()
    torch.manual_seed(0)
    ffn = ffn_spec(cfg, tc, ctx)(config=tc, pg_collection=pgs(), is_mtp_layer=False, name="mlp")
    assert isinstance(ffn, ModalityFFN)
    modality = random_modality()
    ctx.set(modality)
    x = torch.randn(SEQ, BATCH, HIDDEN, requires_grad=True)
    out, bias = ffn(x)
    assert bias is None and out.shape == x.shape
    weight = torch.randn_like(out)
    (out * weight).sum().backward()

    # reference: every token through its modality's FFN, built from the same weights as leaves
    ref_params = {n: p.detach().clone().requires_grad_() for n, p in ffn.named_parameters()}

    class View:  # the reference MLP reads weights from ref_params
        def __init__(self, prefix):
            self.linear_fc1 = type("L", (), {"weight": ref_params[f"{prefix}.linear_fc1.weight"]})
            self.linear_fc2 = type("L", (), {"weight": ref_params[f"{prefix}.linear_fc2.weight"]})

    xr = x.detach().clone().requires_grad_()
    is_text = (modality.t() == TEXT).unsqueeze(-1)  # [s, b, 1]
    ref = torch.where(is_text, swiglu_reference(xr, View("text_mlp")), swiglu_reference(xr, View("vision_mlp")))
    (ref * weight).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
    for name, p in ffn.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-5, atol=1e-6, msg=name)


def test_modality_ffn_gradients_reach_only_the_tokens_ffn(megatron_world):
    cfg = run_config("model.ffn=modality")
    tc = transformer_config_for(cfg)
    ctx = ModalityContext()
    ffn = ffn_spec(cfg, tc, ctx)(config=tc, pg_collection=pgs(), is_mtp_layer=False)
    for only, used, unused in ((TEXT, "text_mlp", "vision_mlp"), (IMAGE, "vision_mlp", "text_mlp")):
        ffn.zero_grad()
        ctx.set(torch.full((BATCH, SEQ), only))
        out, _ = ffn(torch.randn(SEQ, BATCH, HIDDEN))
        out.square().sum().backward()
        grads = grads_of(ffn)
        assert all(grads[n].abs().sum() > 0 for n in grads if n.startswith(used))
        assert all(grads.get(n, torch.zeros(1)).abs().sum() == 0 for n, _ in ffn.named_parameters()
                   if n.startswith(unused))


def test_modality_ffn_in_a_transformer_layer(megatron_world):
    """Built through the layer spec: TP attributes and layout-independent checkpoint keys."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megafusion.model.spec import local_layer_spec

    cfg = run_config("model.ffn=modality")
    tc = transformer_config_for(cfg)
    ctx = ModalityContext()
    spec = local_layer_spec(None)
    spec.submodules.mlp = ffn_spec(cfg, tc, ctx)
    layer = TransformerLayer(tc, spec.submodules, layer_number=1)
    assert isinstance(layer.mlp, ModalityFFN)
    ctx.set(random_modality())
    out, _ = layer(torch.randn(SEQ, BATCH, HIDDEN), attention_mask=None)
    assert out.shape == (SEQ, BATCH, HIDDEN)
    fc1 = layer.mlp.vision_mlp.linear_fc1.weight
    assert fc1.tensor_model_parallel and fc1.partition_dim == 0
    assert layer.mlp.text_mlp.linear_fc2.weight.partition_dim == 1
    keys = set(layer.sharded_state_dict(prefix="decoder.layers.0.").keys())
    for which in ("text_mlp", "vision_mlp"):
        for lin in ("linear_fc1", "linear_fc2"):
            assert f"decoder.layers.0.mlp.{which}.{lin}.weight" in keys


def _one_f_one_b_grads(ffn, ctx, xs, modalities, recompute):
    """Forward micro-batch 0 then 1, then backward 0 then 1 (pipeline 1F1B order), through two
    layers (the FFN twice, each checkpointed on its own): input and parameter grads."""
    from megatron.core import tensor_parallel

    ffn.zero_grad()
    xs = [x.clone().requires_grad_() for x in xs]
    outs = []
    for x, modality in zip(xs, modalities):
        ctx.set(modality)
        h = x
        for _layer in range(2):
            if recompute:
                h = tensor_parallel.checkpoint(lambda t: ffn(t)[0], False, h)
            else:
                h = ffn(h)[0]
        outs.append(h)
    for out in outs:
        out.square().sum().backward()
    return [x.grad for x in xs] + [p.grad.clone() for p in ffn.parameters()]


def test_recompute_in_backward_uses_the_micro_batch_modality(megatron_world):
    cfg = run_config("model.ffn=modality", "train.recompute=full", "model.init_std=0.5")  # O(1) through 2 layers
    tc = transformer_config_for(cfg)
    ctx = ModalityContext()
    ffn = ffn_spec(cfg, tc, ctx)(config=tc, pg_collection=pgs(), is_mtp_layer=False)
    assert ctx.recompute
    xs = [torch.randn(SEQ, BATCH, HIDDEN) for _ in range(2)]
    modalities = [random_modality(30), random_modality(31)]
    expected = _one_f_one_b_grads(ffn, ctx, xs, modalities, recompute=False)
    ctx.clear()
    got = _one_f_one_b_grads(ffn, ctx, xs, modalities, recompute=True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)  # fp32 at O(10) magnitudes
    assert not ctx._pending  # every queued modality was taken by its backward
    ctx.recompute = False  # without the queue, micro-batch 0's recompute would read micro-batch 1's modality
    wrong = _one_f_one_b_grads(ffn, ctx, xs, modalities, recompute=True)
    assert not torch.allclose(wrong[0], expected[0], rtol=1e-2)


def test_dense_ffn_is_megatrons_mlp(megatron_world):
    from megatron.core.transformer.mlp import MLP

    cfg = run_config()
    tc = transformer_config_for(cfg)
    mlp = ffn_spec(cfg, tc, ModalityContext())(config=tc, pg_collection=pgs(), is_mtp_layer=False)
    assert type(mlp) is MLP


def test_modality_ffn_without_set_says_what_to_do(megatron_world):
    cfg = run_config("model.ffn=modality")
    tc = transformer_config_for(cfg)
    ffn = ffn_spec(cfg, tc, ModalityContext())(config=tc, pg_collection=pgs(), is_mtp_layer=False)
    with pytest.raises(RuntimeError, match="ctx.set"):
        ffn(torch.randn(SEQ, BATCH, HIDDEN))


# --------------------------------------------------------------------------- MoE

MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_hidden_size=8",
       "model.moe.shared_expert_ffn_hidden_size=12", "model.moe.per_modality_shared_experts=true",
       "model.moe.aux_loss_coeff=0.01", "model.moe.z_loss_coeff=0.001"]


def build_moe(cfg, ctx, layer_number=2):
    tc = transformer_config_for(cfg)
    layer = ffn_spec(cfg, tc, ctx)(config=tc, pg_collection=pgs(), is_mtp_layer=False, name="mlp")
    layer.set_layer_number(layer_number)
    return tc, layer


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_moe_with_modality_shared_experts_matches_reference(megatron_world, dispatcher):
    """Routed output of megatron's own MoELayer (same weights) + the token's modality shared expert."""
    import copy

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules

    cfg = run_config(*MOE, f"model.moe.dispatcher={dispatcher}")
    ctx = ModalityContext()
    torch.manual_seed(0)
    tc, layer = build_moe(cfg, ctx)
    assert isinstance(layer, ModalityMoELayer) and layer.shared_experts is None
    assert layer.modality_shared_experts.text_mlp.linear_fc1.weight.shape == (2 * 12, HIDDEN)

    plain_tc = copy.copy(tc)
    plain_tc.moe_shared_expert_intermediate_size = None
    ref = get_gpt_layer_local_submodules(num_experts=4, moe_grouped_gemm=False).mlp(config=plain_tc)
    ref.set_layer_number(2)
    missing, unexpected = ref.load_state_dict(layer.state_dict(), strict=False)
    assert not missing and all(k.startswith("modality_shared_experts.") for k in unexpected)

    modality = random_modality(1)
    ctx.set(modality)
    x = torch.randn(SEQ, BATCH, HIDDEN)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, _ = layer(x1)
    routed, _ = ref(x2)
    shared = layer.modality_shared_experts
    is_text = (modality.t() == TEXT).unsqueeze(-1)
    expected = routed + torch.where(is_text, swiglu_reference(x2, shared.text_mlp),
                                    swiglu_reference(x2, shared.vision_mlp))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    our_shared_grads = grads_of(shared)  # the reference graph reuses these weights: keep ours first
    shared.zero_grad()
    (expected * weight).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    g_ref = grads_of(ref)
    for name, p in layer.named_parameters():
        if name.startswith("modality_shared_experts."):
            torch.testing.assert_close(our_shared_grads[name[len("modality_shared_experts."):]],
                                       p.grad, rtol=1e-5, atol=1e-6, msg=name)
        else:
            torch.testing.assert_close(p.grad, g_ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_moe_with_one_global_shared_expert_is_megatrons(megatron_world):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
    from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

    cfg = run_config(*[o for o in MOE if "per_modality" not in o])
    ctx = ModalityContext()
    tc, layer = build_moe(cfg, ctx)
    assert isinstance(layer.shared_experts, SharedExpertMLP) and layer.modality_shared_experts is None
    ref = get_gpt_layer_local_submodules(num_experts=4, moe_grouped_gemm=False).mlp(config=tc)
    ref.load_state_dict(layer.state_dict())
    ctx.set(random_modality(4))
    x = torch.randn(SEQ, BATCH, HIDDEN)
    torch.testing.assert_close(layer(x)[0], ref(x)[0], rtol=1e-6, atol=1e-7)


def brute_force_counts(layer, x, modality, num_experts=4, top_k=2):
    """(modality, expert) assignment counts from the router's own top-k of softmax scores."""
    counts = torch.zeros(3, num_experts + 1, dtype=torch.int64)
    logits = x.reshape(-1, HIDDEN) @ layer.router.weight.detach().t()
    experts = torch.topk(logits.softmax(-1), top_k, dim=-1).indices
    for token, m in enumerate(modality.t().reshape(-1).tolist()):
        counts[m, num_experts] += 1
        for e in experts[token].tolist():
            counts[m, e] += 1
    return counts


def test_routing_counts_equal_brute_force_over_micro_batches(megatron_world):
    cfg = run_config(*MOE)
    ctx = ModalityContext()
    tc, layer = build_moe(cfg, ctx, layer_number=2)
    expected = torch.zeros(3, 5, dtype=torch.int64)
    for micro_batch in range(2):
        modality = random_modality(10 + micro_batch)
        x = torch.randn(SEQ, BATCH, HIDDEN)
        ctx.set(modality)
        out, _ = layer(x)
        out.sum().backward()
        expected += brute_force_counts(layer, x, modality)
    counts = ctx.take_routing_counts()
    assert counts.shape == (2, 3, 5)
    assert counts[0].sum() == 0  # layer 0 is not this layer
    torch.testing.assert_close(counts[1], expected)
    assert ctx.take_routing_counts().sum() == 0  # taking resets

    stats = routing_stats_from_counts(counts)
    for m, name in ((TEXT, "text"), (IMAGE, "image"), (VIDEO, "video")):
        assert stats[f"moe/layer1/tokens_{name}"] == expected[m, 4]
        for e in range(4):
            assert stats[f"moe/layer1/frac_{name}_tokens_expert{e}"] == pytest.approx(
                float(expected[m, e] / expected[m, 4]))
    vision = expected[IMAGE] + expected[VIDEO]
    assert stats["moe/layer1/frac_vision_tokens_expert3"] == pytest.approx(float(vision[3] / vision[4]))
    assert sum(stats[f"moe/layer1/frac_text_tokens_expert{e}"] for e in range(4)) == pytest.approx(2.0)  # top-2


def test_routing_is_not_counted_again_by_activation_recompute(megatron_world):
    from torch.utils.checkpoint import checkpoint

    cfg = run_config(*MOE)
    ctx = ModalityContext()
    _, layer = build_moe(cfg, ctx)
    modality = random_modality(3)
    ctx.set(modality)
    x = torch.randn(SEQ, BATCH, HIDDEN, requires_grad=True)
    out, _ = checkpoint(layer, x, use_reentrant=False)
    out.sum().backward()
    torch.testing.assert_close(ctx.take_routing_counts()[1], brute_force_counts(layer, x.detach(), modality))


def test_collect_routing_stats_in_a_world_of_one(megatron_world):
    from megafusion.model.moe import collect_routing_stats

    cfg = run_config(*MOE)
    ctx_a, ctx_b = ModalityContext(), ModalityContext()  # two model chunks, layers 1 and 2
    _, layer_a = build_moe(cfg, ctx_a, layer_number=1)
    _, layer_b = build_moe(cfg, ctx_b, layer_number=2)
    for ctx, layer in ((ctx_a, layer_a), (ctx_b, layer_b)):
        ctx.set(random_modality(5))
        layer(torch.randn(SEQ, BATCH, HIDDEN))
    assert model_contexts([torch.nn.ModuleList([layer_a]), layer_b]) == [ctx_a, ctx_b]
    stats = collect_routing_stats([ctx_a, ctx_b])
    assert "moe/layer0/specialization" in stats and "moe/layer1/specialization" in stats
    assert stats["moe/specialization"] == pytest.approx(
        (stats["moe/layer0/specialization"] + stats["moe/layer1/specialization"]) / 2)
    assert collect_routing_stats([ctx_a, ctx_b]) == {}  # taken: nothing routed since


def test_triton_dispatch_option_gives_the_same_layer(megatron_world):
    from megafusion.model.moe_dispatch import TritonAlltoAllTokenDispatcher

    ctx = ModalityContext()
    torch.manual_seed(0)
    _, ours = build_moe(run_config(*MOE, "model.moe.dispatch=triton"), ctx)
    _, ref = build_moe(run_config(*MOE), ctx)
    assert isinstance(ours.token_dispatcher, TritonAlltoAllTokenDispatcher)
    ref.load_state_dict(ours.state_dict())
    ctx.set(random_modality(7))
    x = torch.randn(SEQ, BATCH, HIDDEN)
    torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-5, atol=1e-6)


def test_moe_config_errors(megatron_world):
    with pytest.raises(ValueError, match="shared_expert_ffn_hidden_size"):
        build_moe(run_config(*[o for o in MOE if "shared_expert_ffn" not in o]), ModalityContext())
    with pytest.raises(ValueError, match="per_modality_shared_experts"):
        build_moe(run_config(*MOE, "model.ffn=modality"), ModalityContext())


# --------------------------------------------------------------------------- statistics


def test_routing_counts_function():
    modality = torch.tensor([TEXT, IMAGE, VIDEO, TEXT])
    routing_map = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1], [0, 1, 1]], dtype=torch.bool)
    expected = torch.tensor([[1, 2, 1, 2], [0, 1, 1, 1], [1, 0, 1, 1]])
    torch.testing.assert_close(routing_counts(modality, routing_map), expected)


def counts_from(text_assign, vision_assign, text_tokens, vision_tokens):
    """[1, 3, E + 1] counts with the vision part all image."""
    e = len(text_assign)
    c = torch.zeros(1, 3, e + 1, dtype=torch.int64)
    c[0, TEXT, :e], c[0, IMAGE, :e] = torch.tensor(text_assign), torch.tensor(vision_assign)
    c[0, TEXT, e], c[0, IMAGE, e] = text_tokens, vision_tokens
    return c


def test_specialization_score():
    # expert 0: only vision (max), expert 1: only text (min), expert 2: the layer's mix (neutral)
    stats = routing_stats_from_counts(counts_from([0, 30, 20], [20, 0, 20], 50, 40))
    assert stats["moe/layer0/specialization_expert0"] == pytest.approx(1.0)
    assert stats["moe/layer0/specialization_expert1"] == pytest.approx(-1.0)
    overall = 40 / 90
    assert stats["moe/layer0/specialization_expert2"] == pytest.approx((0.5 - overall) / (1 - overall))
    weighted = (20 * 1.0 + 30 * 1.0 + 40 * abs((0.5 - overall) / (1 - overall))) / 90
    assert stats["moe/layer0/specialization"] == pytest.approx(weighted)
    assert stats["moe/layer0/frac_vision_tokens_expert0"] == pytest.approx(20 / 40)
    assert stats["moe/layer0/frac_text_tokens_expert1"] == pytest.approx(30 / 50)
    assert "moe/layer0/frac_video_tokens_expert0" not in stats  # no video tokens: undefined, not 0/0

    separated = routing_stats_from_counts(counts_from([10, 0], [0, 30], 10, 30))
    assert separated["moe/layer0/specialization"] == pytest.approx(1.0)
    assert separated["moe/layer0/modality_nmi"] == pytest.approx(1.0)
    mixed = routing_stats_from_counts(counts_from([10, 20], [5, 10], 30, 15))  # same mix in each expert
    assert mixed["moe/layer0/specialization"] == pytest.approx(0.0, abs=1e-12)
    assert mixed["moe/layer0/modality_nmi"] == pytest.approx(0.0, abs=1e-12)
    text_only = routing_stats_from_counts(counts_from([10, 20], [0, 0], 15, 0))
    assert "moe/layer0/specialization" not in text_only and text_only["moe/layer0/tokens_text"] == 15


# --------------------------------------------------------------------------- TP2+SP and EP2, torchrun


def test_tp2_sp_and_ep2_match_the_unsharded_reference():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("WORKER OK") == 2, proc.stdout[-3000:]


def _all_gather(t, group):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return parts


def _full_swiglu_weights(mlp, group):
    """(W1 [2f, h] = [gate; up], W2 [h, f]) of a TP-sharded megatron SwiGLU MLP (stride-2 fc1 shards)."""
    fc1 = [w.chunk(2) for w in _all_gather(mlp.linear_fc1.weight, group)]
    w1 = torch.cat([g for g, _ in fc1] + [u for _, u in fc1])
    w2 = torch.cat(_all_gather(mlp.linear_fc2.weight, group), dim=1)
    return w1.requires_grad_(), w2.requires_grad_()


def _swiglu(x, w1, w2):
    gate, up = F.linear(x, w1).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def _moe_reference(x, router_w, experts, top_k):
    """Brute-force top-k MoE (top-k of the logits, softmax over the chosen ones): x [n, h] -> [n, h]."""
    values, idx = (x @ router_w.t()).topk(top_k, dim=-1)
    probs = values.softmax(-1)
    out = torch.zeros_like(x)
    for slot in range(top_k):
        for e, (w1, w2) in enumerate(experts):
            chosen = (idx[:, slot] == e).unsqueeze(-1)
            out = out + torch.where(chosen, probs[:, slot:slot + 1] * _swiglu(x, w1, w2), 0.0)
    return out, idx


def _counts_from_topk(modality, idx, num_experts):
    counts = torch.zeros(3, num_experts + 1, dtype=torch.int64)
    for token, m in enumerate(modality.tolist()):
        counts[m, num_experts] += 1
        for e in idx[token].tolist():
            counts[m, e] += 1
    return counts


def _init_parallel(tp, ep):
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    tensor_parallel.model_parallel_cuda_manual_seed(0)


def _worker_modality_ffn_tp2_sp(rank):
    from megatron.core import parallel_state

    _init_parallel(tp=2, ep=1)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    cfg = run_config("model.ffn=modality", "parallel.tp=2", "parallel.sp=true")
    tc = transformer_config_for(cfg)
    ctx = ModalityContext()
    torch.manual_seed(0)
    ffn = ffn_spec(cfg, tc, ctx)(config=tc, pg_collection=pgs(), is_mtp_layer=False)
    modality = random_modality(2)
    modality[:, :6] = TEXT  # rank 0's chunk is all text, rank 1's mostly vision: uneven rows per rank
    x_full, w_full = torch.randn(SEQ, BATCH, HIDDEN), torch.randn(SEQ, BATCH, HIDDEN)
    mine = slice(rank * SEQ // 2, (rank + 1) * SEQ // 2)
    ctx.set(modality)
    x = x_full[mine].clone().requires_grad_()
    out, _ = ffn(x)
    (out * w_full[mine]).sum().backward()

    weights = {name: _full_swiglu_weights(getattr(ffn, name), tp_group) for name in ("text_mlp", "vision_mlp")}
    xr = x_full.clone().requires_grad_()
    is_text = (modality.t() == TEXT).unsqueeze(-1)
    ref = torch.where(is_text, _swiglu(xr, *weights["text_mlp"]), _swiglu(xr, *weights["vision_mlp"]))
    (ref * w_full).sum().backward()
    torch.testing.assert_close(out, ref[mine], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, xr.grad[mine], rtol=1e-5, atol=1e-6)
    f = FFN // 2
    for name, (w1, w2) in weights.items():
        mlp = getattr(ffn, name)
        gate, up = w1.grad.chunk(2)
        shard = torch.cat([gate[rank * f:(rank + 1) * f], up[rank * f:(rank + 1) * f]])
        torch.testing.assert_close(mlp.linear_fc1.weight.grad, shard, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mlp.linear_fc2.weight.grad, w2.grad[:, rank * f:(rank + 1) * f],
                                   rtol=1e-5, atol=1e-6)


def _worker_moe(rank, tp, ep):
    """MoE with per-modality shared experts at TP2+SP (same data on both ranks) or EP2 (different data)."""
    from megatron.core import parallel_state

    from megafusion.model.moe import collect_routing_stats

    _init_parallel(tp=tp, ep=ep)
    moe = [o for o in MOE if "loss_coeff" not in o]  # no aux/z loss: x gradients comparable to the reference
    cfg = run_config(*moe, f"parallel.tp={tp}", f"parallel.sp={str(tp > 1).lower()}", f"parallel.ep={ep}")
    ctx = ModalityContext()
    torch.manual_seed(0)
    _, layer = build_moe(cfg, ctx, layer_number=1)
    torch.manual_seed(100 + (rank if ep > 1 else 0))  # EP ranks are data-parallel: their own data
    modality = random_modality(20 + (rank if ep > 1 else 0))
    x_full, w_full = torch.randn(SEQ, BATCH, HIDDEN), torch.randn(SEQ, BATCH, HIDDEN)
    mine = slice(rank * SEQ // 2, (rank + 1) * SEQ // 2) if tp > 1 else slice(None)
    ctx.set(modality)
    x = x_full[mine].clone().requires_grad_()
    out, _ = layer(x)
    (out * w_full[mine]).sum().backward()

    expert_tp = parallel_state.get_expert_tensor_parallel_group()
    ep_group = parallel_state.get_expert_model_parallel_group()
    # global expert r * num_local + i lives on EP rank r as local expert i
    local = [[_all_gather(w, ep_group) for w in _full_swiglu_weights(e, expert_tp)]
             for e in layer.experts.local_experts]
    experts = [(w1[r], w2[r]) for r in range(ep) for w1, w2 in local]
    tp_group = parallel_state.get_tensor_model_parallel_group()
    shared = {n: _full_swiglu_weights(getattr(layer.modality_shared_experts, n), tp_group)
              for n in ("text_mlp", "vision_mlp")}
    xr = x_full.clone().requires_grad_()
    flat = xr.reshape(-1, HIDDEN)
    routed, idx = _moe_reference(flat, layer.router.weight.detach(), experts, top_k=2)
    is_text = (modality.t().reshape(-1) == TEXT).unsqueeze(-1)
    ref = (routed + torch.where(is_text, _swiglu(flat, *shared["text_mlp"]), _swiglu(flat, *shared["vision_mlp"])))
    ref = ref.view(SEQ, BATCH, HIDDEN)
    (ref * w_full).sum().backward()
    torch.testing.assert_close(out, ref[mine], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, xr.grad[mine], rtol=1e-5, atol=1e-6)

    expected = _counts_from_topk(modality.t().reshape(-1), idx, 4)
    if ep > 1:
        dist.all_reduce(expected)  # every EP rank routed its own tokens
    counts = torch.zeros(2, 3, 5, dtype=torch.int64)
    counts[0] = expected
    assert collect_routing_stats([ctx]) == routing_stats_from_counts(counts)


if __name__ == "__main__":  # torchrun worker
    from megafusion.parallel import cpu_compat

    torch.set_num_threads(1)
    with cpu_compat.applied("cpu"):  # this worker process, as an entry point would
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        _worker_modality_ffn_tp2_sp(rank)
        _worker_moe(rank, tp=2, ep=1)
        _worker_moe(rank, tp=1, ep=2)
        print(f"rank {rank} WORKER OK", flush=True)
        dist.destroy_process_group()
