"""MoE token dispatch: permute + unpermute (with routing weights), forward and forward+backward.

On a GPU machine (bf16, the issue's sizes):

    python3 -m pytest benchmarks/bench_moe_dispatch.py -o addopts="" --benchmark-only \
        --benchmark-json benchmarks/results/moe_dispatch_h100.json
    python3 benchmarks/bench_moe_dispatch.py table benchmarks/results/moe_dispatch_h100.json

Without pytest-benchmark, the same cases and JSON fields (``-k`` keeps case ids containing it):

    python3 benchmarks/bench_moe_dispatch.py run benchmarks/results/moe_dispatch_h100.json [-k T4096]

On a CPU (no CUDA) the same code runs one tiny fp32 case per implementation in Triton's
interpreter: a smoke test of the benchmark, not a speed measurement
(``TRITON_INTERPRET=1 python3 -m pytest benchmarks/bench_moe_dispatch.py -o addopts="" --benchmark-only``).

Implementations, each fed the routing in its own native form (the router can emit both):
  triton    megafusion_kernels.moe_dispatch (topk_idx [T, k], topk_probs [T, k])
  megatron  megatron-core's unfused moe_utils.permute / unpermute (routing_map [T, E], probs [T, E]).
            The GPU machines have no megatron-core; then a verbatim copy of 0.19.2's dropless
            path (below) runs instead and extra_info["megatron_source"] says which one ran.
            To use the real package there, copy it into the ignored build/ folder and carry it:
            cp -r <site-packages>/megatron build/bench_deps/ ; PYTHONPATH=build/bench_deps
  te        Transformer Engine's fused moe_permute / moe_unpermute (mask map); skipped without TE
GPU shapes: T in {4k, 16k} tokens, Hd in {1024, 4096}, (E, k) in {(64, 8), (256, 8), (1008, 16)}.

Each case records in extra_info the bytes it must move at least (every row read and written
once: fwd 2(T+N)Hd elements, bwd another (2T+3N)Hd, N = T*k rows) and the resulting GB/s,
plus that as a fraction of the copy bandwidth measured on the same device at the start of the
run (``copy_bandwidth_bytes_per_s``: a 1 GiB device-to-device copy, bytes read + written;
~3.0 TB/s on an H100, ~4.3 TB/s on an H200), stored as ``copy_GB_per_s``. Goal (issue 6):
triton >= 3x megatron and >= 1.0x te; issue 30: permute+unpermute >= 60% of copy bandwidth.
"""

from __future__ import annotations

import functools
import os
import sys

ON_GPU = __import__("torch").cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any @triton.jit runs

import torch  # noqa: E402

try:
    import pytest
except ImportError:  # the `run` mode needs no pytest
    pytest = None

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
GPU_SIZES = [(T, Hd, E, k) for T in (4096, 16384) for Hd in (1024, 4096) for E, k in ((64, 8), (256, 8), (1008, 16))]
# MEGAFUSION_BENCH_GPU_CASES=1 lists the GPU cases on a CPU too, for `pytest --collect-only`
# (benchmarks/gpu_check.sh's dry run checks its -k selections against them); not to run them.
LIST_GPU_CASES = ON_GPU or os.environ.get("MEGAFUSION_BENCH_GPU_CASES") == "1"
SIZES = GPU_SIZES if LIST_GPU_CASES else [(64, 32, 8, 2)]
IMPLS = ["triton", "megatron", "te"]
PASSES = ["fwd", "fwd_bwd"]


class Skip(Exception):
    """A case that cannot run here (e.g. no Transformer Engine)."""


@functools.cache
def copy_bandwidth_bytes_per_s(nbytes: int = 1 << 30, rounds: int = 10) -> float | None:
    """Device-to-device copy bandwidth measured here (bytes read + written per second, the
    median of ``rounds`` copies of ``nbytes``), the ceiling of a permute; None on a CPU."""
    if not ON_GPU:
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    times = []
    for i in range(rounds + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 2:  # two warm-up copies
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / sorted(times)[len(times) // 2]


def device_name() -> str:
    return torch.cuda.get_device_name() if ON_GPU else "cpu (Triton interpreter smoke run, not a speed test)"


def make_routing(T, E, k, device):
    """Random distinct top-k experts per token, softmax-normalised weights, in both forms."""
    g = torch.Generator(device=device).manual_seed(0)
    scores = torch.rand(T, E, device=device, generator=g)
    topk_probs, topk_idx = torch.topk(scores, k, dim=1)
    topk_probs = torch.softmax(topk_probs, dim=1)
    routing_map = torch.zeros(T, E, dtype=torch.bool, device=device).scatter_(1, topk_idx, True)
    probs = torch.zeros(T, E, device=device).scatter_(1, topk_idx, topk_probs)
    return topk_idx, topk_probs, routing_map, probs


def triton_impl(r, num_experts):
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


def megatron_impl(r, num_experts):
    permute, unpermute, _ = megatron_unfused()
    _, topk_probs, routing_map, probs = r
    n = topk_probs.numel()

    def run(x, probs):
        x_perm, _, sorted_indices, _, _ = permute(x, routing_map, num_out_tokens=n)
        return unpermute(x_perm, sorted_indices, x.shape, probs=probs, routing_map=routing_map)

    return run, probs


def te_impl(r, num_experts):
    try:
        import transformer_engine.pytorch as te
    except Exception as err:  # not installed, or no GPU
        raise Skip(f"Transformer Engine is not importable ({type(err).__name__})") from err
    if not hasattr(te, "moe_permute"):
        raise Skip("this Transformer Engine has no moe_permute (needs TE >= 1.11)")
    _, topk_probs, routing_map, probs = r
    n = topk_probs.numel()

    def run(x, probs):
        x_perm, row_id_map = te.moe_permute(x, routing_map, num_out_tokens=n, map_type="mask")
        return te.moe_unpermute(x_perm, row_id_map, merging_probs=probs, restore_shape=x.shape, map_type="mask")

    return run, probs


IMPL_BUILDERS = {"triton": triton_impl, "megatron": megatron_impl, "te": te_impl}


def case_id(T, Hd, E, k, impl, pass_) -> str:
    return f"T{T}-H{Hd}-E{E}k{k}-{impl}-{pass_}"


def build_case(T, Hd, E, k, impl, pass_):
    """(step, extra_info): one timed call and the case's bytes/bandwidth fields given its median."""
    r = make_routing(T, E, k, DEVICE)
    x = torch.randn(T, Hd, device=DEVICE, dtype=DTYPE)
    dy = torch.randn(T, Hd, device=DEVICE, dtype=DTYPE)
    run, probs = IMPL_BUILDERS[impl](r, E)
    sync = torch.cuda.synchronize if ON_GPU else (lambda: None)
    if pass_ == "fwd":
        def step():
            with torch.no_grad():
                run(x, probs)
            sync()
    else:
        x_leaf = x.clone().requires_grad_()
        p_leaf = probs.clone().requires_grad_()

        def step():
            y = run(x_leaf, p_leaf)
            y.backward(dy)
            x_leaf.grad = p_leaf.grad = None
            sync()

    n = T * k
    elements = 2 * (T + n) * Hd + (0 if pass_ == "fwd" else (2 * T + 3 * n) * Hd)
    nbytes = elements * x.element_size()

    def extra_info(median_s: float) -> dict:
        info = {"min_bytes": nbytes, "GB_per_s": nbytes / median_s / 1e9, "device": device_name(),
                "dtype": str(DTYPE).removeprefix("torch."), "tokens": T, "hidden": Hd, "experts": E, "topk": k}
        bw = copy_bandwidth_bytes_per_s()
        if bw:
            info["copy_GB_per_s"] = bw / 1e9
            info["fraction_of_copy_bw"] = nbytes / median_s / bw
        if impl == "megatron":
            info["megatron_source"] = megatron_unfused()[2]
        return info

    return step, extra_info


CASES = [(case_id(*s, impl, p), (*s, impl, p)) for s in SIZES for impl in IMPLS for p in PASSES]
ROUNDS = 20 if ON_GPU else 1

if pytest is not None:
    @pytest.mark.parametrize("args", [a for _, a in CASES], ids=[i for i, _ in CASES])
    def test_permute_unpermute(benchmark, args):
        try:
            step, extra_info = build_case(*args)
        except Skip as why:
            pytest.skip(str(why))
        step()  # compile / autotune outside the timing
        benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=3 if ON_GPU else 0, iterations=1)
        benchmark.extra_info.update(extra_info(benchmark.stats.stats.median))

    @pytest.mark.gpu
    @pytest.mark.skipif(not ON_GPU, reason="checks the GPU sizes (tests/kernels covers the CPU)")
    @pytest.mark.parametrize("T,Hd,E,k", [(4096, 1024, 64, 8), (16384, 4096, 256, 8), (4096, 1024, 1008, 16)])
    def test_dispatch_matches_megatron_on_gpu(T, Hd, E, k):
        """Sanity before trusting the timings: same result as megatron's unfused path."""
        from megafusion_kernels.moe_dispatch import moe_permute, moe_unpermute

        permute, unpermute, _ = megatron_unfused()
        topk_idx, topk_probs, routing_map, probs = make_routing(T, E, k, DEVICE)
        x = torch.randn(T, Hd, device=DEVICE, dtype=DTYPE)
        ours_perm, tpe, state = moe_permute(x, topk_idx, E)
        ref_perm, _, sorted_indices, _, _ = permute(x, routing_map, num_out_tokens=T * k)
        assert torch.equal(ours_perm, ref_perm)
        assert torch.equal(tpe, routing_map.sum(0))
        ours = moe_unpermute(ours_perm, state, topk_probs)
        ref = unpermute(ref_perm, sorted_indices, x.shape, probs=probs, routing_map=routing_map)
        torch.testing.assert_close(ours.float(), ref.float(), rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------- runner without pytest-benchmark
# (also used by bench_grouped_mlp.py)


def run_cases(cases, build, out_path: str, rounds: int, skip=(), warmup: int = 3) -> None:
    """Times each (case id, args) with ``build(*args) -> (step, extra_info)``; writes JSON shaped
    like pytest-benchmark's (benchmarks[].param / stats.median / extra_info) to ``out_path``."""
    import json
    import statistics

    from bench_timing import time_step

    results = []
    for cid, args in cases:
        try:
            step, extra_info = build(*args)
        except skip as why:
            print(f"{cid:48s} skipped: {why}", flush=True)
            continue
        median, times = time_step(step, 1 + (warmup if ON_GPU else 0), rounds)
        results.append({"name": cid, "param": cid, "extra_info": extra_info(median),
                        "stats": {"median": median, "min": min(times), "mean": statistics.fmean(times),
                                  "rounds": rounds}})
        print(f"{cid:48s} {median * 1e3:9.3f} ms", flush=True)
    with open(out_path, "w") as f:
        json.dump({"machine_info": {"device": device_name(), "torch": torch.__version__}, "benchmarks": results},
                  f, indent=1)


def table(json_path: str, fields: tuple[str, ...], baseline: str) -> str:
    """Markdown table of a result JSON (ours or pytest-benchmark's): one row per case, the median,
    ``fields`` from extra_info, and the speed-up over the ``baseline`` implementation of the same case.
    Case ids end in ``-<impl>-<pass>``."""
    import json

    rows = json.load(open(json_path))["benchmarks"]
    median = {}
    for r in rows:
        median[r["param"]] = r["stats"]["median"]

    def baseline_of(cid: str):
        parts = cid.split("-")
        parts[-2] = baseline
        return median.get("-".join(parts))

    head = ["case", "median ms", *fields, f"x {baseline}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cid, m = r["param"], r["stats"]["median"]
        info = r.get("extra_info", {})
        vals = [f"{info[f]:.3g}" if isinstance(info.get(f), (int, float)) else "" for f in fields]
        base = baseline_of(cid)
        lines.append("| " + " | ".join([cid, f"{m * 1e3:.3f}", *vals, f"{base / m:.2f}" if base else ""]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "run":
        keep = sys.argv[sys.argv.index("-k") + 1] if "-k" in sys.argv else ""
        run_cases([(i, a) for i, a in CASES if keep in i], build_case, sys.argv[2], rounds=ROUNDS, skip=Skip)
    elif len(sys.argv) == 3 and sys.argv[1] == "table":
        print(table(sys.argv[2], ("GB_per_s", "fraction_of_copy_bw"), baseline="megatron"))
    else:
        sys.exit(__doc__)
