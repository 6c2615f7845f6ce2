"""MoE token dispatch: permute + unpermute (with routing weights), forward and forward+backward.

Run on a GPU machine (CPU runs skip every case with a reason):

    python3 -m pytest benchmarks/bench_moe_dispatch.py -o addopts="" --benchmark-only \
        --benchmark-json benchmarks/results/moe_dispatch_h100.json

Implementations, each fed the routing in its own native form (the router can emit both):
  triton    megafusion_kernels.moe_dispatch (topk_idx [T, k], topk_probs [T, k])
  megatron  megatron-core's unfused moe_utils.permute / unpermute (routing_map [T, E], probs [T, E]).
            The GPU machines have no megatron-core; then a verbatim copy of 0.19.2's dropless
            path (below) runs instead and extra_info["megatron_source"] says which one ran.
            To use the real package there, copy it into the ignored build/ folder and carry it:
            cp -r <site-packages>/megatron build/bench_deps/ ; PYTHONPATH=build/bench_deps
  te        Transformer Engine's fused moe_permute / moe_unpermute (mask map); skipped without TE
Shapes: T in {4k, 16k} tokens, Hd in {1024, 4096}, (E, k) in {(64, 8), (256, 8), (1008, 16)}, bf16.

Each case records in extra_info the bytes it must move at least (every row read and written
once: fwd 2(T+N)Hd elements, bwd another (2T+3N)Hd) and the resulting GB/s, plus that as a
fraction of the device copy bandwidth (~3.0 TB/s H100, ~4.3 TB/s H200, platform.md).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU benchmark: needs a CUDA device (the Triton interpreter is not a speed test)")

TOKENS = [4096, 16384]
HIDDEN = [1024, 4096]
EXPERTS_TOPK = [(64, 8), (256, 8), (1008, 16)]
IMPLS = ["triton", "megatron", "te"]
PASSES = ["fwd", "fwd_bwd"]
DTYPE = torch.bfloat16


def copy_bandwidth_bytes_per_s() -> float:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return 4.3e12 if "H200" in name else 3.0e12


def make_routing(T, E, k, device):
    """Random distinct top-k experts per token, softmax-normalised weights, in both forms."""
    g = torch.Generator(device=device).manual_seed(0)
    scores = torch.rand(T, E, device=device, generator=g)
    topk_probs, topk_idx = torch.topk(scores, k, dim=1)
    topk_probs = torch.softmax(topk_probs, dim=1)
    routing_map = torch.zeros(T, E, dtype=torch.bool, device=device).scatter_(1, topk_idx, True)
    probs = torch.zeros(T, E, device=device).scatter_(1, topk_idx, topk_probs)
    return topk_idx, topk_probs, routing_map, probs


def triton_impl(x, r, num_experts):
    from megafusion_kernels.moe_dispatch import moe_permute, moe_unpermute

    topk_idx, topk_probs, _, _ = r
    n = topk_idx.numel()

    def run(x, probs):
        x_perm, _, state = moe_permute(x, topk_idx, num_experts, num_out_rows=n)
        return moe_unpermute(x_perm, state, probs)

    return run, topk_probs


def _megatron_copy_permute(tokens, routing_map, num_out_tokens):
    """megatron-core 0.19.2 moe_utils.permute, unfused dropless path, verbatim."""
    num_tokens, hidden = tokens.shape
    routing_map = routing_map.bool().T.contiguous()
    flat_sorted = routing_map.reshape(-1).argsort(descending=True, stable=True)
    flat_sorted = flat_sorted[:num_out_tokens]
    sorted_indices = flat_sorted % num_tokens
    permuted_input = tokens.index_select(0, sorted_indices)
    return permuted_input, None, sorted_indices, None, None


def _megatron_copy_unpermute(permuted_tokens, sorted_indices, restore_shape, probs, routing_map):
    """megatron-core 0.19.2 moe_utils.unpermute, unfused non-deterministic path, verbatim."""
    _, hidden = restore_shape
    input_dtype = permuted_tokens.dtype
    permuted_probs = probs.T.contiguous().masked_select(routing_map.T.contiguous())
    permuted_tokens = permuted_tokens * permuted_probs.unsqueeze(-1)
    output_tokens = torch.zeros(restore_shape, dtype=permuted_tokens.dtype, device=permuted_tokens.device)
    output_tokens.scatter_add_(0, sorted_indices.unsqueeze(1).expand(-1, hidden), permuted_tokens)
    return output_tokens.to(dtype=input_dtype)


def megatron_unfused():
    """(permute, unpermute, source): megatron-core's own when importable, else the copy above."""
    try:
        from megatron.core.transformer.moe import moe_utils
    except Exception:  # not installed, or fails to import on this Python
        return _megatron_copy_permute, _megatron_copy_unpermute, "copy of megatron-core 0.19.2 moe_utils"
    return moe_utils.permute, moe_utils.unpermute, "megatron-core import"


def megatron_impl(x, r, num_experts):
    permute, unpermute, _ = megatron_unfused()
    _, topk_probs, routing_map, probs = r
    n = topk_probs.numel()

    def run(x, probs):
        x_perm, _, sorted_indices, _, _ = permute(x, routing_map, num_out_tokens=n)
        return unpermute(x_perm, sorted_indices, x.shape, probs=probs, routing_map=routing_map)

    return run, probs


def te_impl(x, r, num_experts):
    te = pytest.importorskip("transformer_engine.pytorch", reason="Transformer Engine is not installed")
    if not hasattr(te, "moe_permute"):
        pytest.skip("this Transformer Engine has no moe_permute (needs TE >= 1.11)")
    _, topk_probs, routing_map, probs = r
    n = topk_probs.numel()

    def run(x, probs):
        x_perm, row_id_map = te.moe_permute(x, routing_map, num_out_tokens=n, map_type="mask")
        return te.moe_unpermute(x_perm, row_id_map, merging_probs=probs, restore_shape=x.shape, map_type="mask")

    return run, probs


IMPL_BUILDERS = {"triton": triton_impl, "megatron": megatron_impl, "te": te_impl}


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("E,k", EXPERTS_TOPK, ids=[f"E{e}k{k}" for e, k in EXPERTS_TOPK])
@pytest.mark.parametrize("Hd", HIDDEN, ids=[f"H{h}" for h in HIDDEN])
@pytest.mark.parametrize("T", TOKENS, ids=[f"T{t}" for t in TOKENS])
def test_permute_unpermute(benchmark, T, Hd, E, k, impl, pass_):
    device = torch.device("cuda")
    r = make_routing(T, E, k, device)
    x = torch.randn(T, Hd, device=device, dtype=DTYPE)
    dy = torch.randn(T, Hd, device=device, dtype=DTYPE)
    run, probs = IMPL_BUILDERS[impl](x, r, E)

    if pass_ == "fwd":
        def step():
            with torch.no_grad():
                run(x, probs)
            torch.cuda.synchronize()
    else:
        x_leaf = x.clone().requires_grad_()
        p_leaf = probs.clone().requires_grad_()

        def step():
            y = run(x_leaf, p_leaf)
            y.backward(dy)
            x_leaf.grad = p_leaf.grad = None
            torch.cuda.synchronize()

    step()  # compile / autotune outside the timing
    benchmark.pedantic(step, rounds=20, warmup_rounds=3, iterations=1)

    n = T * k
    elements = 2 * (T + n) * Hd + (0 if pass_ == "fwd" else (2 * T + 3 * n) * Hd)
    nbytes = elements * x.element_size()
    median = benchmark.stats.stats.median
    benchmark.extra_info.update({
        "min_bytes": nbytes,
        "GB_per_s": nbytes / median / 1e9,
        "fraction_of_copy_bw": nbytes / median / copy_bandwidth_bytes_per_s(),
        "device": torch.cuda.get_device_name(),
    })
    if impl == "megatron":
        benchmark.extra_info["megatron_source"] = megatron_unfused()[2]


@pytest.mark.parametrize("T,Hd,E,k", [(4096, 1024, 64, 8), (16384, 4096, 256, 8)])
def test_dispatch_matches_megatron_on_gpu(T, Hd, E, k):
    """Sanity before trusting the timings: same result as megatron's unfused path."""
    from megafusion_kernels.moe_dispatch import moe_permute, moe_unpermute

    permute, unpermute, _ = megatron_unfused()
    topk_idx, topk_probs, routing_map, probs = make_routing(T, E, k, torch.device("cuda"))
    x = torch.randn(T, Hd, device="cuda", dtype=DTYPE)
    ours_perm, tpe, state = moe_permute(x, topk_idx, E)
    ref_perm, _, sorted_indices, _, _ = permute(x, routing_map, num_out_tokens=T * k)
    assert torch.equal(ours_perm, ref_perm)
    assert torch.equal(tpe, routing_map.sum(0))
    ours = moe_unpermute(ours_perm, state, topk_probs)
    ref = unpermute(ref_perm, sorted_indices, x.shape, probs=probs, routing_map=routing_map)
    torch.testing.assert_close(ours.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("use_grouped_mm", [True, False], ids=["grouped_mm", "loop"])
@pytest.mark.parametrize("E", [64, 256])
def test_grouped_mlp(benchmark, E, use_grouped_mm):
    """Expert swiglu MLP over permuted rows: one torch._grouped_mm per projection vs a loop.
    T=4096 tokens, k=8, Hd=1024, per-expert F=512 (fine-grained experts); TFLOP/s vs ~800 bf16 peak."""
    from megafusion_kernels.grouped_mlp import grouped_mlp
    from megafusion_kernels.moe_dispatch import moe_permute

    T, k, Hd, F = 4096, 8, 1024, 512
    topk_idx, _, _, _ = make_routing(T, E, k, torch.device("cuda"))
    x = torch.randn(T, Hd, device="cuda", dtype=DTYPE)
    x_perm, tpe, _ = moe_permute(x, topk_idx, E)
    w_in = torch.randn(E, Hd, 2 * F, device="cuda", dtype=DTYPE) / Hd**0.5
    w_out = torch.randn(E, F, Hd, device="cuda", dtype=DTYPE) / F**0.5

    def step():
        with torch.no_grad():
            grouped_mlp(x_perm, tpe, w_in, w_out, use_torch_grouped_mm=use_grouped_mm)
        torch.cuda.synchronize()

    step()
    benchmark.pedantic(step, rounds=20, warmup_rounds=3, iterations=1)
    flops = 6 * x_perm.shape[0] * Hd * F
    benchmark.extra_info["TFLOP_per_s"] = flops / benchmark.stats.stats.median / 1e12
