"""Hybrid causal + bidirectional attention: forward and forward+backward, GPU only.

Run on a GPU machine (CPU runs skip every case with a reason), then print the table:

    python3 -m pytest benchmarks/bench_hybrid_attention.py -o addopts="" --benchmark-only \
        --benchmark-json benchmarks/results/hybrid_attention_h100.json
    python3 benchmarks/bench_hybrid_attention.py table benchmarks/results/hybrid_attention_h100.json

Without pytest-benchmark, the same cases and JSON fields (``-k`` selects by case id):

    python3 benchmarks/bench_hybrid_attention.py run benchmarks/results/hybrid_attention_h100.json -k N2048

Implementations, all bf16, B*N = 16k tokens per step, H = 16 heads, D = 128:
  triton       megafusion_kernels.hybrid_attention (tile metadata computed inside each call)
  flex         torch FlexAttention, compiled, with the equivalent BlockMask built once
               outside the timed region (how a model reuses it across layers)
  sdpa_mask    torch SDPA with the dense boolean mask [B, 1, N, N] (built outside the timing)
  sdpa_causal  torch SDPA is_causal=True (flash): the ceiling, pack independent, so it is
               run once per N under pack "text"
Packs (``make_pack``): text (documents of 512-4096 text tokens), image_heavy (documents of
4096 tokens: 64 text tokens then a 1024-token image, repeated), mixed (documents of
1-8k tokens alternating text runs and 256- or 1024-token images).

TFLOP/s count only the visible (query, key) pairs P of each case: forward 4*P*D*H,
forward+backward 3.5x that (the backward does 5 matmuls of the 2 the forward does; FlashAttention's
convention). The trainer (``megafusion bench``, ``megafusion.scaling.flops``) counts a training
step as 3x forward for every matmul, attention included, so its attention TFLOP/s read 3/3.5 of
this one's for the same kernel time. Each case stores in ``extra_info``: ``tflops``,
``useful_pairs``, ``gpu`` and ``fraction_of_peak`` of the device's documented dense bf16 peak
(``megafusion.scaling.flops.peak_flops(torch.cuda.get_device_name(), "bf16")``; absent for a
GPU that table does not know).
"""

from __future__ import annotations

import json
import math
import sys

import torch

try:
    import pytest
except ImportError:  # `python3 benchmarks/bench_hybrid_attention.py run ...` needs no pytest
    pytest = None

SEQ_LENS = [2048, 8192, 16384]
TOKENS_PER_STEP = 16384
HEADS, HEAD_DIM = 16, 128
PACKS = ["text", "image_heavy", "mixed"]
IMPLS = ["triton", "flex", "sdpa_mask", "sdpa_causal"]
PASSES = ["fwd", "fwd_bwd"]
DTYPE = torch.bfloat16
DEVICE = "cuda"


def make_pack(kind: str, n: int, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """doc_ids, span_ids [batch, n] int64 for one of ``PACKS``."""
    gen = torch.Generator().manual_seed(seed)
    docs = torch.zeros(batch, n, dtype=torch.long)
    spans = torch.full((batch, n), -1, dtype=torch.long)

    def rand(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    for b in range(batch):
        pos, doc, span = 0, 0, 0
        while pos < n:
            length = {"text": rand(512, 4096), "image_heavy": 4096, "mixed": rand(1024, 8192)}[kind]
            end = min(n, pos + length)
            docs[b, pos:end] = doc
            p = pos
            while p < end:
                if kind == "text":
                    break
                text = 64 if kind == "image_heavy" else rand(64, 512)
                image = 1024 if kind == "image_heavy" else (256 if rand(0, 1) else 1024)
                p += text
                spans[b, p : min(end, p + image)] = span
                span, p = span + 1, p + image
            pos, doc = end, doc + 1
    return docs, spans


def visible_pairs(doc_ids: torch.Tensor, span_ids: torch.Tensor) -> int:
    """Number of (i, j) with i seeing j, summed over the batch (row blocks keep memory low)."""
    n = doc_ids.shape[1]
    total = 0
    j = torch.arange(n, device=doc_ids.device)
    for start in range(0, n, 2048):
        i = torch.arange(start, min(n, start + 2048), device=doc_ids.device)
        d_i, s_i = doc_ids[:, i, None], span_ids[:, i, None]
        vis = (d_i == doc_ids[:, None, :]) & ((j[None, None, :] <= i[None, :, None]) | ((s_i >= 0) & (s_i == span_ids[:, None, :])))
        total += int(vis.sum())
    return total


def _build(impl, q, k, v, doc, span):
    """A closure ``run(q, k, v) -> out`` with everything mask-related built up front."""
    n = q.shape[2]
    if impl == "triton":
        from megafusion_kernels.hybrid_attention import hybrid_attention

        return lambda q, k, v: hybrid_attention(q, k, v, doc, span)
    if impl == "sdpa_causal":
        return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    if impl == "sdpa_mask":
        from megafusion_kernels.hybrid_attention import visibility_mask

        mask = visibility_mask(doc, span)[:, None]
        return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if impl == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def mask_mod(b, h, q_idx, kv_idx):
            s_q = span[b, q_idx]
            return (doc[b, q_idx] == doc[b, kv_idx]) & ((kv_idx <= q_idx) | ((s_q >= 0) & (s_q == span[b, kv_idx])))

        block_mask = create_block_mask(mask_mod, q.shape[0], None, n, n, device=q.device)
        flex = torch.compile(flex_attention, dynamic=False)
        return lambda q, k, v: flex(q, k, v, block_mask=block_mask)
    raise ValueError(impl)


def _cases() -> list[tuple[int, str, str, str, str]]:
    """(n, pack, impl, pass, id) of every case."""
    cases = []
    for n in SEQ_LENS:
        for pack in PACKS:
            for impl in IMPLS:
                if impl == "sdpa_causal" and pack != "text":
                    continue
                for pas in PASSES:
                    cases.append((n, pack, impl, pas, f"{pas}-{impl}-{pack}-N{n}"))
    return cases


def _setup(n: int, pack: str, impl: str, pas: str):
    """(step, info): ``step()`` runs one timed iteration and synchronises; ``info`` holds
    what the TFLOP/s need (useful pairs, FLOPs) and the machine."""
    import triton

    dev = DEVICE
    batch = max(1, TOKENS_PER_STEP // n)
    doc, span = (t.to(dev) for t in make_pack(pack, n, batch))
    if impl == "sdpa_causal":
        doc, span = torch.zeros_like(doc), torch.full_like(span, -1)  # what it computes
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(batch, HEADS, n, HEAD_DIM, device=dev, dtype=DTYPE, generator=gen) for _ in range(3))
    dout = torch.randn_like(q)
    run = _build(impl, q, k, v, doc, span)
    if pas == "fwd":

        def step():
            with torch.no_grad():
                run(q, k, v)
            torch.cuda.synchronize()
    else:
        q, k, v = (t.requires_grad_() for t in (q, k, v))

        def step():
            out = run(q, k, v)
            torch.autograd.grad(out, (q, k, v), dout)
            torch.cuda.synchronize()

    pairs = visible_pairs(doc, span)
    info = dict(
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, batch=batch,
        useful_pairs=pairs, flops=4.0 * pairs * HEAD_DIM * HEADS * (3.5 if pas == "fwd_bwd" else 1.0),
    )
    peak = device_peak_flops()
    if peak:
        info["peak_tflops"] = peak / 1e12
    return step, info


def device_peak_flops() -> float | None:
    """Documented dense bf16 peak of this GPU (None on a CPU or an unknown GPU)."""
    if not torch.cuda.is_available():
        return None
    from megafusion.scaling.flops import peak_flops

    return peak_flops(torch.cuda.get_device_name(), "bf16")


def finish_info(info: dict, median_s: float) -> dict:
    """The measured fields of a case: TFLOP/s over visible pairs and the fraction of peak."""
    info["tflops"] = info["flops"] / median_s / 1e12
    if info.get("peak_tflops"):
        info["fraction_of_peak"] = info["tflops"] / info["peak_tflops"]
    return info


if pytest is not None:
    pytestmark = pytest.mark.skipif(
        not torch.cuda.is_available(), reason="GPU benchmark: needs a CUDA device (the Triton interpreter is not a speed test)"
    )

    @pytest.mark.parametrize("n,pack,impl,pas", [pytest.param(*c[:4], id=c[4]) for c in _cases()])
    def test_hybrid_attention(benchmark, n, pack, impl, pas):
        step, info = _setup(n, pack, impl, pas)
        benchmark.pedantic(step, rounds=20, warmup_rounds=3, iterations=1)
        benchmark.extra_info.update(finish_info(info, benchmark.stats.stats.median))


def run_standalone(json_path: str, select: str = "", rounds: int = 20, warmup: int = 3) -> None:
    """The same cases without pytest-benchmark (for machines that lack it); writes a JSON
    with the fields ``table`` reads (``params``, ``stats.median`` in s, ``extra_info``)."""
    from bench_timing import time_step

    results = []
    for n, pack, impl, pas, case_id in _cases():
        if select not in case_id:
            continue
        step, info = _setup(n, pack, impl, pas)
        median, times = time_step(step, warmup, rounds)
        finish_info(info, median)
        results.append(dict(name=case_id, params=dict(n=n, pack=pack, impl=impl, pas=pas),
                            stats=dict(median=median, min=min(times), max=max(times), rounds=rounds), extra_info=info))
        print(f"{case_id:40s} {median * 1e3:9.3f} ms {info['tflops']:7.1f} TFLOP/s", flush=True)
        with open(json_path, "w") as f:  # after every case: a run cut short keeps what it measured
            json.dump(dict(benchmarks=results), f, indent=1)


def table(*json_paths: str) -> str:
    """Markdown table from --benchmark-json (or ``run``) files, merged: TFLOP/s per case,
    triton/flex and triton/causal-flash ratios (both per useful FLOP)."""
    benches = []
    for path in json_paths:
        with open(path) as f:
            benches += json.load(f)["benchmarks"]
    rows = {}
    gpu = "?"
    for bench in benches:
        p = bench["params"]
        gpu = bench["extra_info"].get("gpu", gpu)
        rows[(p["pas"], p["n"], p["pack"], p["impl"])] = bench["extra_info"]["tflops"]
    out = [f"GPU: {gpu}; bf16, H={HEADS}, D={HEAD_DIM}, {TOKENS_PER_STEP} tokens per step; TFLOP/s over visible pairs", ""]
    out.append("| pass | N | pack | triton | flex | sdpa+mask | causal flash | triton/flex | triton/causal |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for pas in PASSES:
        for n in SEQ_LENS:
            ceiling = rows.get((pas, n, "text", "sdpa_causal"), math.nan)
            for pack in PACKS:
                t, fx, sm = (rows.get((pas, n, pack, i), math.nan) for i in ("triton", "flex", "sdpa_mask"))
                out.append(
                    f"| {pas} | {n} | {pack} | {t:.0f} | {fx:.0f} | {sm:.0f} | {ceiling:.0f} | {t / fx:.2f}x | {t / ceiling:.2f}x |"
                )
    return "\n".join(out)


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="time the cases without pytest-benchmark and write JSON")
    p_run.add_argument("json")
    p_run.add_argument("-k", default="", help="only cases whose id contains this, e.g. N2048 or fwd_bwd-triton")
    p_table = sub.add_parser("table", help="print the markdown table of one or more JSON files")
    p_table.add_argument("json", nargs="+")
    args = parser.parse_args(argv)
    if args.cmd == "run":
        run_standalone(args.json, args.k)
        print(table(args.json))
    else:
        print(table(*args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
