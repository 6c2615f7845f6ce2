"""Hybrid attention: the mask against its definition, and the backends against each other
and a float64 reference, through megatron's core-attention call signature."""

import math

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megafusion.model.attention import (
    ATTENTION_BACKENDS,
    FlexCoreAttention,
    SdpaCoreAttention,
    core_attention_class,
)
from megafusion.model.mask import HybridMaskInfo, hybrid_mask


def random_pack(batch, n, gen):
    """Packs of several documents of text and image spans, then padding (its own doc id)."""
    doc_ids = torch.empty(batch, n, dtype=torch.long)
    span_ids = torch.full((batch, n), -1, dtype=torch.long)
    for b in range(batch):
        pos, doc, span = 0, 0, 0
        end = n - int(torch.randint(0, n // 4 + 1, (1,), generator=gen))  # padding after `end`
        while pos < end:
            doc_len = min(int(torch.randint(1, n // 2 + 2, (1,), generator=gen)), end - pos)
            doc_ids[b, pos:pos + doc_len] = doc
            p = pos + int(torch.randint(0, 3, (1,), generator=gen))
            while p < pos + doc_len - 1:  # text runs and image spans, spans may be adjacent
                span_len = min(int(torch.randint(1, 8, (1,), generator=gen)), pos + doc_len - p)
                if torch.rand(1, generator=gen) < 0.6:
                    span_ids[b, p:p + span_len] = span
                    span += 1
                p += span_len + int(torch.randint(0, 4, (1,), generator=gen))
            pos += doc_len
            doc += 1
        doc_ids[b, end:] = doc
    return doc_ids, span_ids


def brute_force_mask(doc_ids, span_ids):
    B, N = doc_ids.shape
    mask = torch.zeros(B, N, N, dtype=torch.bool)
    for b in range(B):
        for i in range(N):
            for j in range(N):
                same_doc = doc_ids[b, i] == doc_ids[b, j]
                same_span = span_ids[b, i] >= 0 and span_ids[b, i] == span_ids[b, j]
                mask[b, i, j] = bool(same_doc and (j <= i or same_span))
    return mask


def make_config(heads=4, groups=4, head_dim=16, dropout=0.0):
    return TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                             num_query_groups=groups, kv_channels=head_dim, attention_dropout=dropout)


def build(name, config, **kw):
    # exactly how megatron's SelfAttention builds its core attention
    return core_attention_class(name)(config=config, layer_number=1, attn_mask_type=AttnMaskType.arbitrary,
                                      attention_type="self", cp_comm_type=None, softmax_scale=None,
                                      pg_collection=None, **kw)


def naive_attention64(q, k, v, mask, scale):
    """q [s, b, h, d], k/v [s, b, g, d] -> [s, b, h*d] in float64, explicit softmax."""
    q, k, v = (x.double().permute(1, 2, 0, 3) for x in (q, k, v))
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.exp(scores - scores.amax(-1, keepdim=True))
    probs = probs / probs.sum(-1, keepdim=True)
    out = probs @ v
    return out.permute(2, 0, 1, 3).reshape(q.shape[2], q.shape[0], -1)


def qkv(seq, batch, heads, groups, head_dim, gen, dtype=torch.float32):
    q = torch.randn(seq, batch, heads, head_dim, generator=gen, dtype=dtype).requires_grad_()
    k = torch.randn(seq, batch, groups, head_dim, generator=gen, dtype=dtype).requires_grad_()
    v = torch.randn(seq, batch, groups, head_dim, generator=gen, dtype=dtype).requires_grad_()
    return q, k, v


def test_hybrid_mask_equals_brute_force():
    gen = torch.Generator().manual_seed(0)
    for n in (1, 7, 33, 64):
        doc_ids, span_ids = random_pack(3, n, gen)
        assert torch.equal(hybrid_mask(doc_ids, span_ids), brute_force_mask(doc_ids, span_ids))
    # a hand-made case: text, a span, text of the same doc, another doc
    doc = torch.tensor([[0, 0, 0, 0, 1, 1]])
    span = torch.tensor([[-1, 5, 5, -1, -1, -1]])
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0],
                             [0, 0, 0, 0, 1, 0],
                             [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(hybrid_mask(doc, span)[0], expected)


def test_sdpa_equals_float64_naive_softmax():
    gen = torch.Generator().manual_seed(1)
    doc_ids, span_ids = random_pack(2, 45, gen)
    attn = build("sdpa", make_config(heads=4, groups=2))
    q, k, v = qkv(45, 2, 4, 2, 16, gen)
    out = attn(q, k, v, HybridMaskInfo(doc_ids, span_ids))
    ref = naive_attention64(q, k, v, brute_force_mask(doc_ids, span_ids), 1 / math.sqrt(16))
    assert out.shape == (45, 2, 4 * 16) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (4, 1)])
def test_sdpa_and_flex_agree_outputs_and_gradients(heads, groups):
    gen = torch.Generator().manual_seed(2 + groups)
    seq, batch, head_dim = 50, 2, 16
    doc_ids, span_ids = random_pack(batch, seq, gen)
    config = make_config(heads, groups, head_dim)
    q, k, v = qkv(seq, batch, heads, groups, head_dim, gen)
    grad_out = torch.randn(seq, batch, heads * head_dim, generator=gen)
    results = {}
    for name in ("sdpa", "flex"):
        info = HybridMaskInfo(doc_ids, span_ids)
        out = build(name, config)(q, k, v, info)
        results[name] = (out, *torch.autograd.grad(out, (q, k, v), grad_out))
    for a, b in zip(results["sdpa"], results["flex"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_explicit_softmax_scale_and_tensor_mask_form():
    gen = torch.Generator().manual_seed(3)
    doc_ids, span_ids = random_pack(2, 30, gen)
    config = make_config(heads=2, groups=2, head_dim=16)
    q, k, v = qkv(30, 2, 2, 2, 16, gen)
    ref = naive_attention64(q, k, v, hybrid_mask(doc_ids, span_ids), 0.3)
    packed = HybridMaskInfo(doc_ids, span_ids).as_tensor()  # what survives megatron's recompute
    for name in ("sdpa", "flex"):
        attn = ATTENTION_BACKENDS[name](config, 1, AttnMaskType.arbitrary, "self", softmax_scale=0.3)
        with torch.no_grad():
            out = attn(q, k, v, packed)
        torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    # the tensor form maps to one cached HybridMaskInfo (one mask per step, not per layer)
    assert HybridMaskInfo.coerce(packed) is HybridMaskInfo.coerce(packed.detach())


def test_queries_of_a_kv_cache_see_the_right_keys():
    """Decoding: the last sq positions query all sk keys (queries inside an image span
    see the whole span, text queries see the past)."""
    gen = torch.Generator().manual_seed(4)
    sk, sq = 40, 6
    doc_ids, span_ids = random_pack(2, sk, gen)
    span_ids[:, sk - 4:] = 99  # the new positions end inside an image span
    span_ids[:, sk - 6:sk - 4] = -1
    config = make_config(heads=4, groups=2)
    q, k, v = qkv(sk, 2, 4, 2, 16, gen)
    full = naive_attention64(q, k, v, hybrid_mask(doc_ids, span_ids), 0.25)[sk - sq:]
    for name in ("sdpa", "flex"):
        with torch.no_grad():
            out = build(name, config)(q[sk - sq:], k, v, HybridMaskInfo(doc_ids, span_ids))
        torch.testing.assert_close(out.double(), full, atol=2e-6, rtol=1e-5)


def test_mask_forms_are_cached_across_layers():
    doc_ids, span_ids = random_pack(1, 20, torch.Generator().manual_seed(5))
    info = HybridMaskInfo(doc_ids, span_ids)
    assert info.dense_mask() is info.dense_mask()
    assert info.block_mask() is info.block_mask()
    assert info.dense_mask().shape == (1, 1, 20, 20)


def test_triton_backend_matches_sdpa():
    """The kernel lives in kernels/megafusion_kernels/hybrid_attention.py (Triton interpreter on CPU)."""
    pytest.importorskip("megafusion_kernels.hybrid_attention",
                        reason="kernels/megafusion_kernels/hybrid_attention.py not present in this checkout")
    gen = torch.Generator().manual_seed(6)
    seq, batch, heads, groups, head_dim = 40, 2, 4, 2, 16
    doc_ids, span_ids = random_pack(batch, seq, gen)
    config = make_config(heads, groups, head_dim)
    q, k, v = qkv(seq, batch, heads, groups, head_dim, gen)
    info = HybridMaskInfo(doc_ids, span_ids)
    grad_out = torch.randn(seq, batch, heads * head_dim, generator=gen)
    results = {}
    for name in ("sdpa", "triton"):
        out = build(name, config)(q, k, v, info)
        results[name] = (out, *torch.autograd.grad(out, (q, k, v), grad_out))
    for a, b in zip(results["sdpa"], results["triton"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_clear_errors():
    config = make_config()
    with pytest.raises(ValueError, match="unknown"):
        core_attention_class("flash")
    q = torch.randn(8, 1, 4, 16)
    k = torch.randn(8, 1, 4, 16)
    with pytest.raises(TypeError, match="HybridMaskInfo"):
        build("sdpa", config)(q, k, k, None)
    with pytest.raises(ValueError, match="mask ids"):
        build("sdpa", config)(q, k, k, HybridMaskInfo(torch.zeros(1, 9, dtype=torch.long),
                                                      torch.zeros(1, 9, dtype=torch.long)))
    with pytest.raises(ValueError, match="attention_dropout"):
        FlexCoreAttention(make_config(dropout=0.1), 1, AttnMaskType.arbitrary, "self")
    assert SdpaCoreAttention(make_config(dropout=0.1), 1, AttnMaskType.arbitrary, "self").dropout_p == 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention is checked on a CUDA GPU")
def test_compiled_flex_matches_sdpa_on_gpu():
    gen = torch.Generator().manual_seed(7)
    seq, batch, heads, groups, head_dim = 300, 2, 4, 2, 64
    doc_ids, span_ids = random_pack(batch, seq, gen)
    config = make_config(heads, groups, head_dim)
    q, k, v = (x.detach().cuda().requires_grad_() for x in qkv(seq, batch, heads, groups, head_dim, gen))
    info = HybridMaskInfo(doc_ids.cuda(), span_ids.cuda())
    grad_out = torch.randn(seq, batch, heads * head_dim, device="cuda")
    results = {}
    for name in ("sdpa", "flex"):
        out = build(name, config)(q, k, v, info)
        results[name] = (out, *torch.autograd.grad(out, (q, k, v), grad_out))
    for a, b in zip(results["sdpa"], results["flex"]):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


# ------------------------------------------------------- inside megatron's SelfAttention


def self_attention(backend, **config_overrides):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                               attention_dropout=0.0, hidden_dropout=0.0, use_cpu_initialization=True,
                               **config_overrides)
    spec = ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.arbitrary},
                      submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear,
                                                         core_attention=ATTENTION_BACKENDS[backend],
                                                         linear_proj=RowParallelLinear))
    return build_module(spec, config=config, layer_number=1)


def test_backends_inside_megatron_self_attention(megatron_world):
    """sdpa and flex as megatron's core attention (GQA, arbitrary mask type), also under
    selective recomputation of core attention, where the mask must travel as a tensor."""
    gen = torch.Generator().manual_seed(8)
    seq, batch = 24, 2
    doc_ids, span_ids = random_pack(batch, seq, gen)
    hidden = torch.randn(seq, batch, 32, generator=gen)
    runs = {}
    reference = self_attention("sdpa")
    for name, overrides, mask in [
        ("sdpa", {}, HybridMaskInfo(doc_ids, span_ids)),
        ("flex", {}, HybridMaskInfo(doc_ids, span_ids)),
        ("flex", dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
         HybridMaskInfo(doc_ids, span_ids).as_tensor()),
    ]:
        layer = self_attention(name, **overrides)
        layer.load_state_dict(reference.state_dict())
        x = hidden.clone().requires_grad_()
        out, _ = layer(x, mask)
        out.square().sum().backward()
        runs[(name, bool(overrides))] = (out, x.grad, *(p.grad for p in layer.parameters()))
    expected = runs[("sdpa", False)]
    for key, got in runs.items():
        for a, b in zip(expected, got):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{key}: {m}")
