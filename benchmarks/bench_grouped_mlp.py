"""Routed experts: one grouped MLP (``model.moe.experts = grouped``) vs SequentialMLP's per-expert loop.

On a GPU machine (bf16):

    python3 -m pytest benchmarks/bench_grouped_mlp.py -o addopts="" --benchmark-only \
        --benchmark-json benchmarks/results/grouped_mlp_h100.json
    python3 benchmarks/bench_grouped_mlp.py table benchmarks/results/grouped_mlp_h100.json

Without pytest-benchmark: ``python3 benchmarks/bench_grouped_mlp.py run OUT.json [-k T4096]``.
On a CPU it runs one tiny fp32 case per implementation (a smoke test of the benchmark).

Implementations, both computing the SwiGLU experts of GroupedExperts / SequentialMLP
(weights [E, 2F, Hd] and [E, Hd, F], the routing weight applied after the activation):
  grouped  megafusion_kernels.grouped_mlp.grouped_mlp: one torch._grouped_mm per projection
           (Hopper, bf16), what GroupedExperts runs
  loop     SequentialMLP's computation (megatron-core 0.19.2 SequentialMLP + MLP, written out
           because the GPU machines have no megatron-core): tokens_per_expert.tolist() (one
           device sync), then per expert fc1, SwiGLU, scale, fc2, and a final cat
Cases: T in {4k, 16k} tokens, Hd in {1024, 4096}, (E, k, F) in {(64, 8, 512), (256, 8, 256),
(1008, 16, 256)} (fine-grained experts: F is the per-expert width), uniform random routing.
extra_info: TFLOP/s (forward 6*N*Hd*F flops for N = T*k rows, forward+backward 3x that: plain
matmuls, whose backward is two products per forward one, as the trainer counts every step) and
``fraction_of_peak``: of the device's documented dense bf16 peak,
``megafusion.scaling.flops.peak_flops(torch.cuda.get_device_name(), "bf16")`` (989 TFLOP/s
on an H100 SXM / H200, 2250 on a B200; absent for a GPU that table does not know).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_moe_dispatch as common  # noqa: E402  (sets TRITON_INTERPRET on CPU first)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

try:
    import pytest
except ImportError:
    pytest = None

ON_GPU, DEVICE, DTYPE = common.ON_GPU, common.DEVICE, common.DTYPE
GPU_SIZES = [(T, Hd, E, k, Fw) for T in (4096, 16384) for Hd in (1024, 4096)
             for E, k, Fw in ((64, 8, 512), (256, 8, 256), (1008, 16, 256))]
SIZES = GPU_SIZES if common.LIST_GPU_CASES else [(64, 32, 8, 2, 16)]  # see bench_moe_dispatch
IMPLS = ["grouped", "loop"]
PASSES = ["fwd", "fwd_bwd"]


def device_peak_flops() -> float | None:
    """Documented dense bf16 peak of this GPU (None on a CPU or an unknown GPU)."""
    if not ON_GPU:
        return None
    from megafusion.scaling.flops import peak_flops

    return peak_flops(torch.cuda.get_device_name(), "bf16")


def sequential_loop(x_perm, tokens_per_expert, w1, w2, probs):
    """SequentialMLP (megatron-core 0.19.2) with local MLP experts, swiglu, probs after the activation."""
    counts = tokens_per_expert.tolist()
    outs = []
    for e, (tokens, p) in enumerate(zip(torch.split(x_perm, counts), torch.split(probs, counts))):
        gate, up = F.linear(tokens, w1[e]).chunk(2, dim=-1)
        h = (F.silu(gate) * up * p.unsqueeze(-1)).to(tokens.dtype)
        outs.append(F.linear(h, w2[e]))
    return torch.cat(outs, dim=0)


def grouped(x_perm, tokens_per_expert, w1, w2, probs):
    from megafusion_kernels.grouped_mlp import grouped_mlp

    return grouped_mlp(x_perm, tokens_per_expert, w1.transpose(1, 2), w2.transpose(1, 2), "swiglu", row_scale=probs)


IMPL_FNS = {"grouped": grouped, "loop": sequential_loop}


def make_inputs(T, Hd, E, k, Fw):
    from megafusion_kernels.moe_dispatch import moe_permute

    topk_idx, topk_probs, _, _ = common.make_routing(T, E, k, DEVICE)
    x = torch.randn(T, Hd, device=DEVICE, dtype=DTYPE)
    x_perm, tokens_per_expert, state = moe_permute(x, topk_idx, E, num_out_rows=T * k)
    probs = topk_probs.reshape(-1)[state.src_index].float()
    g = torch.Generator(device=DEVICE).manual_seed(1)
    w1 = (torch.randn(E, 2 * Fw, Hd, device=DEVICE, generator=g) / Hd**0.5).to(DTYPE)
    w2 = (torch.randn(E, Hd, Fw, device=DEVICE, generator=g) / Fw**0.5).to(DTYPE)
    return x_perm, tokens_per_expert, w1, w2, probs


def case_id(T, Hd, E, k, Fw, impl, pass_) -> str:
    return f"T{T}-H{Hd}-E{E}k{k}F{Fw}-{impl}-{pass_}"


def build_case(T, Hd, E, k, Fw, impl, pass_):
    x_perm, tpe, w1, w2, probs = make_inputs(T, Hd, E, k, Fw)
    fn = IMPL_FNS[impl]
    sync = torch.cuda.synchronize if ON_GPU else (lambda: None)
    if pass_ == "fwd":
        def step():
            with torch.no_grad():
                fn(x_perm, tpe, w1, w2, probs)
            sync()
    else:
        leaves = [t.clone().requires_grad_() for t in (x_perm, w1, w2, probs)]
        dy = torch.randn_like(x_perm)

        def step():
            x, a, b, p = leaves
            fn(x, tpe, a, b, p).backward(dy)
            for t in leaves:
                t.grad = None
            sync()

    flops = 6 * T * k * Hd * Fw * (1 if pass_ == "fwd" else 3)

    def extra_info(median_s: float) -> dict:
        info = {"TFLOP_per_s": flops / median_s / 1e12, "flops": flops, "device": common.device_name(),
                "dtype": str(DTYPE).removeprefix("torch."), "tokens": T, "hidden": Hd, "experts": E, "topk": k,
                "expert_ffn": Fw}
        if ON_GPU:
            peak = device_peak_flops()
            if peak:
                info["peak_TFLOP_per_s"] = peak / 1e12
                info["fraction_of_peak"] = flops / median_s / peak
            info["used_torch_grouped_mm"] = impl == "grouped" and _uses_grouped_mm(x_perm, w1)
        return info

    return step, extra_info


def _uses_grouped_mm(x, w1) -> bool:
    from megafusion_kernels.grouped_mlp import _grouped_mm_supported

    return _grouped_mm_supported(x, w1.transpose(1, 2))


CASES = [(case_id(*s, impl, p), (*s, impl, p)) for s in SIZES for impl in IMPLS for p in PASSES]

if pytest is not None:
    @pytest.mark.parametrize("args", [a for _, a in CASES], ids=[i for i, _ in CASES])
    def test_grouped_mlp(benchmark, args):
        step, extra_info = build_case(*args)
        step()
        benchmark.pedantic(step, rounds=common.ROUNDS, warmup_rounds=3 if ON_GPU else 0, iterations=1)
        benchmark.extra_info.update(extra_info(benchmark.stats.stats.median))

    @pytest.mark.gpu
    @pytest.mark.skipif(not ON_GPU, reason="checks the GPU sizes (tests/model/test_grouped_experts.py covers the CPU)")
    @pytest.mark.parametrize("size", [(4096, 1024, 64, 8, 512), (4096, 1024, 1008, 16, 256)])
    def test_grouped_matches_loop_on_gpu(size):
        """Sanity before trusting the timings: the grouped GEMM path equals the per-expert loop."""
        x_perm, tpe, w1, w2, probs = make_inputs(*size)
        torch.testing.assert_close(grouped(x_perm, tpe, w1, w2, probs).float(),
                                   sequential_loop(x_perm, tpe, w1, w2, probs).float(), rtol=2e-2, atol=2e-2)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "run":
        keep = sys.argv[sys.argv.index("-k") + 1] if "-k" in sys.argv else ""
        common.run_cases([(i, a) for i, a in CASES if keep in i], build_case, sys.argv[2], rounds=common.ROUNDS)
    elif len(sys.argv) == 3 and sys.argv[1] == "table":
        print(common.table(sys.argv[2], ("TFLOP_per_s", "fraction_of_peak"), baseline="loop"))
    else:
        sys.exit(__doc__)
