"""hybrid_attention vs a float64 reference written directly from the rule.

On CPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), so
sizes stay small (N <= 192, B*H <= 4). Interpreter tile sizes are 64 x 64 unless a test
shrinks them to get many tiles of every class (SKIP / PARTIAL / FULL).

Tolerances (max abs error vs float64, inputs ~N(0, 1)):
  fp32: 2e-5 (observed ~1e-6)
  fp16: 4e-3 (outputs and grads are stored in fp16: one rounding ~5e-4 at |x| ~ 1)
  bf16: 4e-2 (bf16 storage, and the interpreter's fp32->bf16 cast truncates)

Empty rows: under the rule every row sees itself (j == i is causal and in its own
document), so no ids can make a row of a non-empty sequence see nothing. The public API
reaches "no rows" only through N = 0 (tested); the kernels' empty-row path (out = 0,
lse = +inf, zero gradients) is tested by withholding a query tile from the tile lists.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import megafusion_kernels.hybrid_attention_triton as hat
from megafusion_kernels.hybrid_attention import hybrid_attention, visibility_mask
from megafusion_kernels.hybrid_attention_tiles import (
    FULL,
    PARTIAL,
    SKIP,
    build_tile_lists,
    classify_tiles,
    summarize_tiles,
    tile_lists,
)

# Kernels run where they would in production: the GPU when there is one, else the
# interpreter on CPU. References are float64 on the CPU.
DEV = "cuda" if torch.cuda.is_available() else "cpu"

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 4e-2}


def reference(q, k, v, doc_ids, span_ids, scale, blind_rows=None):
    """Float64 attention from the rule: dense mask, softmax, fully masked rows -> 0.
    ``blind_rows`` (a slice) see nothing at all, whatever the rule says."""
    n = q.shape[2]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    doc_i, doc_j = doc_ids[:, :, None], doc_ids[:, None, :]
    span_i, span_j = span_ids[:, :, None], span_ids[:, None, :]
    mask = (doc_i == doc_j) & ((j <= i) | ((span_i >= 0) & (span_i == span_j)))
    if blind_rows is not None:
        mask[:, blind_rows] = False
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v


def make_pack(n: int, docs=(), spans=(), batch: int = 1):
    """ids [batch, n]: documents are consecutive runs of the given lengths (the rest of
    the sequence is one more document); spans are (start, end) ranges, numbered 0.."""
    doc = torch.zeros(n, dtype=torch.long)
    pos = 0
    for d, length in enumerate(docs):
        doc[pos : pos + length] = d
        pos += length
    doc[pos:] = len(docs)
    span = torch.full((n,), -1, dtype=torch.long)
    for s, (a, b) in enumerate(spans):
        span[a:b] = s
    return doc.expand(batch, n).clone(), span.expand(batch, n).clone()


def random_pack(n: int, batch: int, gen: torch.Generator):
    """Random packs: documents of random length, each with random text/image runs."""
    docs, spans = torch.zeros(batch, n, dtype=torch.long), torch.full((batch, n), -1, dtype=torch.long)
    for b in range(batch):
        pos, d, s = 0, 0, 0
        while pos < n:
            doc_len = int(torch.randint(8, n + 1, (1,), generator=gen))
            end = min(n, pos + doc_len)
            docs[b, pos:end] = d
            p = pos
            while p < end:
                run = int(torch.randint(1, 40, (1,), generator=gen))
                if torch.rand(1, generator=gen) < 0.5:
                    spans[b, p : min(end, p + run)] = s
                    s += 1
                p += run
            pos, d = end, d + 1
    return docs, spans


def check(doc_ids, span_ids, heads=2, kv_heads=1, dim=32, dtype=torch.float32, seed=0, scale=None, blind_rows=None):
    gen = torch.Generator().manual_seed(seed)
    bsz, n = doc_ids.shape
    q = torch.randn(bsz, heads, n, dim, generator=gen).to(DEV, dtype).requires_grad_()
    k = torch.randn(bsz, kv_heads, n, dim, generator=gen).to(DEV, dtype).requires_grad_()
    v = torch.randn(bsz, kv_heads, n, dim, generator=gen).to(DEV, dtype).requires_grad_()
    dout = torch.randn(bsz, heads, n, dim, generator=gen).to(DEV, dtype)

    out = hybrid_attention(q, k, v, doc_ids.to(DEV), span_ids.to(DEV), softmax_scale=scale)
    out.backward(dout)

    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, doc_ids, span_ids, scale if scale is not None else 1 / math.sqrt(dim), blind_rows)
    ref.backward(dout.cpu().double())
    tol = TOL[dtype]
    for name, got, want in (("out", out, ref), ("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        assert got.dtype == dtype and got.shape == want.shape
        err = (got.detach().cpu().double() - want).abs().max().item()
        assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:g} ({dtype})"


PACKS = {
    "all_text_causal": dict(n=128),
    "single_image": dict(n=128, spans=[(37, 101)]),
    "image_at_0": dict(n=128, spans=[(0, 70)]),
    "spans_crossing_tiles": dict(n=192, spans=[(50, 80), (100, 140), (150, 192)]),
    "several_documents": dict(n=192, docs=[30, 70, 50], spans=[(5, 20), (40, 90), (140, 160)]),
    "n_not_tile_multiple": dict(n=77, docs=[40], spans=[(10, 30), (60, 77)]),
    "tile_aligned_docs_and_spans": dict(n=128, docs=[64], spans=[(0, 64), (64, 128)]),
}


@pytest.mark.parametrize("pack", list(PACKS))
def test_packs_fp32(pack):
    doc, span = make_pack(**PACKS[pack])
    check(doc, span)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    doc, span = make_pack(**PACKS["several_documents"])
    check(doc, span, dtype=dtype)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (3, 1), (2, 2)])
def test_gqa_mqa_mha(heads, kv_heads):
    doc, span = make_pack(n=96, docs=[50], spans=[(20, 45), (60, 90)])
    check(doc, span, heads=heads, kv_heads=kv_heads)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_packs(seed):
    gen = torch.Generator().manual_seed(seed)
    doc, span = random_pack(160, batch=2, gen=gen)
    check(doc, span, seed=seed)


def test_head_dim_not_power_of_two_and_custom_scale():
    doc, span = make_pack(n=80, spans=[(10, 50)])
    check(doc, span, dim=48, scale=0.3)


@pytest.mark.parametrize("tiles", [hat.TileConfig(16, 16, 16, 16, 16, 16), hat.TileConfig(32, 16, 16, 32, 16, 32)])
def test_small_tiles_every_class(monkeypatch, tiles):
    """Small (and unequal) tiles: many tiles of each class; dk/dv and dq tiles unlike
    the forward's."""
    monkeypatch.setattr(hat, "select_tiles", lambda *args: tiles)
    doc, span = make_pack(n=100, docs=[64], spans=[(5, 20), (40, 60), (70, 99)])
    q_sum, k_sum = summarize_tiles(doc, span, tiles.block_m), summarize_tiles(doc, span, tiles.block_n)
    classes = set(classify_tiles(q_sum, k_sum).unique().tolist())
    assert classes == {SKIP, PARTIAL, FULL}
    check(doc, span, dim=16)


def test_strided_inputs():
    """q/k/v as transposed views of a [B, N, H, D] layout (what Megatron hands over): no
    copies, the output keeps that layout, and values and grads match."""
    gen = torch.Generator().manual_seed(0)
    doc, span = make_pack(n=70, spans=[(5, 40)])
    base = [torch.randn(1, 70, h, 32, generator=gen).to(DEV).requires_grad_() for h in (2, 1, 1)]
    q, k, v = (t.transpose(1, 2) for t in base)
    assert not q.is_contiguous()
    out = hybrid_attention(q, k, v, doc.to(DEV), span.to(DEV))
    assert out.transpose(1, 2).is_contiguous()  # [B, N, H, D] again, ready to reshape
    dout = torch.randn(out.shape, generator=gen).to(DEV)
    out.backward(dout)
    leaves = [t.detach().cpu().double().transpose(1, 2).requires_grad_() for t in base]
    ref = reference(*leaves, doc, span, 1 / math.sqrt(32))
    ref.backward(dout.cpu().double())
    assert (out.detach().cpu().double() - ref).abs().max() < TOL[torch.float32]
    for got, want in zip(base, leaves):
        assert (got.grad.cpu().double() - want.grad.transpose(1, 2)).abs().max() < TOL[torch.float32]


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the second document's own rows are NaN
def test_skipped_tiles_are_never_read():
    """Keys/values of the second document are NaN; the first document's tiles never
    meet them (tile-aligned documents), so its rows must come out finite and exact."""
    doc, span = make_pack(n=128, docs=[64], spans=[(10, 40), (70, 100)])
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 128, 32, generator=gen) for _ in range(3))
    k[:, :, 64:] = float("nan")
    v[:, :, 64:] = float("nan")
    out = hybrid_attention(q.to(DEV), k.to(DEV), v.to(DEV), doc.to(DEV), span.to(DEV)).cpu()
    ref = reference(q[:, :, :64].double(), k[:, :, :64].double(), v[:, :, :64].double(), doc[:, :64], span[:, :64], 1 / math.sqrt(32))
    assert torch.isfinite(out[:, :, :64]).all()
    assert (out[:, :, :64].double() - ref).abs().max() < TOL[torch.float32]


def test_zero_length_and_single_token():
    """N = 0 (the only way to get rows that see nothing is to have no rows) and N = 1."""
    for n in (0, 1):
        q = torch.randn(1, 2, n, 16, device=DEV, requires_grad=True)
        k = torch.randn(1, 1, n, 16, device=DEV, requires_grad=True)
        v = torch.randn(1, 1, n, 16, device=DEV, requires_grad=True)
        doc = torch.zeros(1, n, dtype=torch.long, device=DEV)
        span = torch.full((1, n), -1, dtype=torch.long, device=DEV)
        out = hybrid_attention(q, k, v, doc, span)
        out.sum().backward()
        assert out.shape == q.shape
        if n == 1:  # one token sees only itself: out = v, dv = sum of the heads' grads
            torch.testing.assert_close(out, v.expand(1, 2, 1, 16), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(v.grad, torch.full_like(v, 2.0))
            torch.testing.assert_close(q.grad, torch.zeros_like(q))


def test_rows_that_see_nothing_give_zero_and_zero_grads(monkeypatch):
    """The kernels' empty-row path, reached by withholding query tile 0 from every tile
    list (no ids can do it under the rule): those rows must give out = 0, dq = 0 and
    contribute nothing to dk/dv, with no NaN anywhere."""
    real_build = hat.build_tile_lists

    def without_query_tile_0(doc, span, row_block, col_block, rows_are_queries):
        lists = real_build(doc, span, row_block, col_block, rows_are_queries)
        for count, index in ((lists.full_count, lists.full_index), (lists.part_count, lists.part_index)):
            if rows_are_queries:
                count[:, 0] = 0
            else:  # lists are ascending: query tile 0, if listed, comes first
                first = (count > 0) & (index[:, :, 0] == 0)
                index[first] = torch.roll(index[first], -1, dims=-1)
                count[first] -= 1
        return lists

    monkeypatch.setattr(hat, "build_tile_lists", without_query_tile_0)
    monkeypatch.setattr(hat, "select_tiles", lambda *args: hat.TileConfig(64, 64, 64, 64, 64, 64))
    rows = slice(0, 64)  # query tile 0 in the forward, dk/dv and dq alike
    doc, span = make_pack(n=150, docs=[100], spans=[(20, 90), (110, 140)])
    check(doc, span, blind_rows=rows)


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(1, 2, 8, 16)
    kv = torch.randn(1, 1, 8, 16)
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="head dim"):
        hybrid_attention(torch.randn(1, 2, 8, 24), torch.randn(1, 1, 8, 24), torch.randn(1, 1, 8, 24), ids, ids)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        hybrid_attention(torch.randn(1, 3, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), ids, ids)
    with pytest.raises(TypeError, match="dtype"):
        hybrid_attention(q, kv.half(), kv.half(), ids, ids)
    with pytest.raises(ValueError, match="span_ids"):
        hybrid_attention(q, kv, kv, ids, ids[:, :4])


# ---------------------------------------------------------------- tile metadata


def _dense_blocks(mask, bm, bn):
    """[B, Tq, Tk] (any visible, all visible) of a dense [B, N, N] mask; padding = masked."""
    bsz, n, _ = mask.shape
    tq, tk = -(-n // bm), -(-n // bn)
    padded = torch.zeros(bsz, tq * bm, tk * bn, dtype=torch.bool)
    padded[:, :n, :n] = mask
    blocks = padded.view(bsz, tq, bm, tk, bn)
    return blocks.any(4).any(2), blocks.all(4).all(2)


@pytest.mark.parametrize("seed", range(6))
def test_tile_classes_are_sound(seed):
    """SKIP only where the block is fully masked, FULL only where fully visible - for
    packs and for arbitrary (unsorted) ids."""
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 150, (1,), generator=gen))
    if seed % 2:
        doc, span = random_pack(n, batch=2, gen=gen)
    else:
        doc = torch.randint(0, 3, (2, n), generator=gen)
        span = torch.randint(-1, 3, (2, n), generator=gen)
    mask = visibility_mask(doc, span)
    for bm, bn in [(16, 16), (32, 16), (16, 64)]:
        cls = classify_tiles(summarize_tiles(doc, span, bm), summarize_tiles(doc, span, bn))
        any_vis, all_vis = _dense_blocks(mask, bm, bn)
        assert not (any_vis & (cls == SKIP)).any()
        assert (all_vis | (cls != FULL)).all()


def test_tile_classes_exact_on_causal_and_docs():
    """For plain causal text in tile-aligned documents the classes are exact."""
    doc, span = make_pack(n=256, docs=[64, 96])  # docs [0,64), [64,160), [160,256)
    mask = visibility_mask(doc, span)
    for bm, bn in [(32, 32), (32, 16)]:
        cls = classify_tiles(summarize_tiles(doc, span, bm), summarize_tiles(doc, span, bn))
        any_vis, all_vis = _dense_blocks(mask, bm, bn)
        assert torch.equal(cls == SKIP, ~any_vis)
        assert torch.equal(cls == FULL, all_vis)


def test_tile_classes_image_tiles_are_full():
    """A tile pair inside one image span is FULL even above the diagonal."""
    doc, span = make_pack(n=128, spans=[(32, 96)])
    cls = classify_tiles(summarize_tiles(doc, span, 32), summarize_tiles(doc, span, 32))[0]
    assert cls[1, 2] == FULL and cls[2, 1] == FULL  # both tiles inside the span
    assert cls[0, 1] == SKIP  # text queries never see later image keys
    assert cls[1, 3] == SKIP  # image queries never see later text keys


def test_tile_lists_match_classes():
    gen = torch.Generator().manual_seed(0)
    cls = torch.randint(0, 3, (2, 5, 7), generator=gen).to(torch.int8)
    lists = tile_lists(cls)
    for b in range(2):
        for r in range(5):
            for kind, count, index in ((FULL, lists.full_count, lists.full_index), (PARTIAL, lists.part_count, lists.part_index)):
                want = (cls[b, r] == kind).nonzero().flatten().tolist()
                c = int(count[b, r])
                assert index[b, r, :c].tolist() == want


@pytest.mark.parametrize("seed", range(4))
def test_triton_tile_lists_match_torch(seed):
    """The Triton metadata kernels (what the attention uses) against the torch definition,
    for query rows and for key rows, equal and unequal tile sizes."""
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 200, (1,), generator=gen))
    if seed % 2:
        doc, span = random_pack(n, batch=2, gen=gen)
    else:
        doc, span = torch.randint(0, 3, (2, n), generator=gen), torch.randint(-1, 3, (2, n), generator=gen)
    for row_block, col_block, rows_are_queries in [(16, 16, True), (32, 16, True), (16, 64, False), (64, 32, False)]:
        q_block, k_block = (row_block, col_block) if rows_are_queries else (col_block, row_block)
        cls = classify_tiles(summarize_tiles(doc, span, q_block), summarize_tiles(doc, span, k_block))
        want = tile_lists(cls if rows_are_queries else cls.transpose(1, 2))
        got = build_tile_lists(doc.to(DEV, torch.int32), span.to(DEV, torch.int32), row_block, col_block, rows_are_queries)
        got = type(got)(*(t.cpu() for t in (got.full_count, got.full_index, got.part_count, got.part_index)))
        assert torch.equal(got.full_count, want.full_count) and torch.equal(got.part_count, want.part_count)
        for count, g_idx, w_idx in ((want.full_count, got.full_index, want.full_index), (want.part_count, got.part_index, want.part_index)):
            for b, t in zip(*torch.nonzero(count >= 0, as_tuple=True)):
                c = int(count[b, t])
                assert torch.equal(g_idx[b, t, :c], w_idx[b, t, :c])


# ---------------------------------------------------------------- custom op / compile


def test_opcheck():
    doc, span = make_pack(n=40, spans=[(5, 20)])
    doc, span = doc.to(DEV, torch.int32), span.to(DEV, torch.int32)
    q = torch.randn(1, 2, 40, 16, device=DEV, requires_grad=True)
    k = torch.randn(1, 1, 40, 16, device=DEV, requires_grad=True)
    v = torch.randn(1, 1, 40, 16, device=DEV, requires_grad=True)
    torch.library.opcheck(torch.ops.megafusion.hybrid_attention_fwd.default, (q, k, v, doc, span, 0.25))


def test_torch_compile_fullgraph_matches_eager():
    doc, span = (t.to(DEV) for t in make_pack(n=64, docs=[20], spans=[(25, 50)]))
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 32, generator=gen).to(DEV)
    x = torch.randn(1, 64, 32, generator=gen).to(DEV)

    def layer(x, w):
        h = (x @ w).view(1, 64, 2, 16).transpose(1, 2)  # [B, H, N, D]
        out = hybrid_attention(h, h[:, :1], h[:, 1:], doc, span)
        return out.square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager = layer(x1, w)
    eager.backward()
    comp = compiled(x2, w)
    comp.backward()
    torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- GPU codegen without a GPU


def aot_compile_report(dtype_name: str, head_dim: int, num_warps: int = 8, num_stages: int = 2) -> dict:
    """Compile every kernel for sm_90 (H100) with Triton's ahead-of-time path and return
    {kernel: ptxas -v summary}. Must run with TRITON_INTERPRET unset (a subprocess)."""
    import inspect
    import os
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import megafusion_kernels.hybrid_attention_tiles as tiles_mod

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    cfg = hat.select_tiles(head_dim, dtype)
    t, i32, f32 = f"*{dtype_name}", "*i32", "*fp32"
    ptrs = dict(Q=t, K=t, V=t, O=t, DO=t, DK=t, DV=t, DQ=t, LSE=f32, DELTA=f32, DOC=i32, SPAN=i32, OUT=i32,
                FULL_CNT=i32, FULL_IDX=i32, PART_CNT=i32, PART_IDX=i32, ROW_SUM=i32, COL_SUM=i32)
    attn = dict(D=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), UPCAST=False,
                PREC="ieee" if dtype == torch.float32 else "tf32")
    jobs = {
        "fwd": (hat._fwd_kernel, dict(attn, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)),
        "bwd_kv": (hat._bwd_kv_kernel, dict(attn, BLOCK_M=cfg.bwd_kv_m, BLOCK_N=cfg.bwd_kv_n)),
        "bwd_q": (hat._bwd_q_kernel, dict(attn, BLOCK_M=cfg.bwd_q_m, BLOCK_N=cfg.bwd_q_n)),
        "delta": (hat._delta_kernel, dict(D=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=64)),
        "summarize": (tiles_mod._summarize_kernel, dict(BLOCK=64)),
        "lists": (tiles_mod._lists_kernel, dict(ROW_BLOCK=128, COL_BLOCK=64, BLOCK_T=256, ROWS_ARE_QUERIES=False)),
    }
    report = {}
    for name, (kernel, consts) in jobs.items():
        fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        names = list(inspect.signature(fn.fn).parameters)
        sig = {a: "constexpr" if a in consts else ptrs.get(a, "fp32" if a in ("qk_scale", "sm_scale") else "i32") for a in names}
        # What the launcher specialises for real tensors: 16-aligned pointers, strides, N.
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names)
                 if sig[a].startswith("*") or (a.startswith("stride_") and a not in ("stride_ib", "stride_it")) or a == "N"}
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True, check=True)
        os.unlink(f.name)
        report[name] = " ".join(line.split(":", 1)[-1].strip() for line in out.stderr.splitlines() if "spill" in line or "registers" in line)
    return report


def test_delta_kernel_puts_batch_times_heads_on_grid_axis_0(monkeypatch):
    """Grid axes 1 and 2 stop at 65,535 programs: B*H (e.g. 4096 sequences x 16 heads)
    must go on axis 0, row tiles on axis 1 (checked on the real launch, then the sizes)."""
    grids = []
    real = hat._delta_kernel

    class Recorder:
        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return real[grid]

    monkeypatch.setattr(hat, "_delta_kernel", Recorder())
    doc, span = make_pack(n=70, spans=[(10, 30)], batch=2)
    check(doc, span, heads=3, kv_heads=1, dim=16)
    assert grids == [(2 * 3, 2)]  # (B*H, cdiv(70, 64))
    assert hat.delta_grid(4096, 16, 8192) == (65536, 128)


def test_autotune_drops_4_warps_where_they_spill():
    """ptxas: bf16 D = 64 at 4 warps spills in the dk/dv kernel; narrower heads keep 4 warps."""
    import triton

    configs = [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)]

    def kept(d, dtype):
        return sorted({c.num_warps for c in hat._prune_configs(configs, {"Q": torch.empty(0, dtype=dtype), "D": d})})

    assert kept(64, torch.bfloat16) == kept(128, torch.bfloat16) == kept(32, torch.float32) == [8]
    assert kept(32, torch.bfloat16) == kept(16, torch.float32) == [4, 8]


def test_kernels_compile_for_h100_without_spills():
    """GPU code generation checked on CPU: every kernel compiles for sm_90 (the
    interpreter does not catch codegen errors) and the attention kernels do not spill
    registers in the configuration the autotuner keeps for D = 128 (8 warps)."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("triton's bundled ptxas is missing from this install")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = pathlib.Path(__file__).parent
    code = ("import json, sys; sys.path.insert(0, %r); from test_hybrid_attention import aot_compile_report; "
            "print(json.dumps(aot_compile_report('bf16', 128)))" % str(here))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(report) == {"fwd", "bwd_kv", "bwd_q", "delta", "summarize", "lists"}
    for name, info in report.items():
        assert re.search(r"(?<!\d)0 bytes spill stores", info), f"{name}: {info}"


# ---------------------------------------------------------------- GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 at long N); none is visible")
@pytest.mark.parametrize("n", [1000, 4096, 16384])
def test_gpu_bf16_long(n):
    """bf16 on the GPU vs float64; the bar is 3x the error of the same dense math in
    bf16 (plus 1e-3), the usual flash-attention criterion."""
    torch.manual_seed(0)
    dev = "cuda"
    gen = torch.Generator().manual_seed(n)
    doc, span = random_pack(n, batch=1, gen=gen) if n < 4096 else _image_heavy_pack(n)
    doc, span = doc.to(dev), span.to(dev)
    heads, kv_heads, dim = 2, 1, 128
    q = torch.randn(1, heads, n, dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, kv_heads, n, dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, kv_heads, n, dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn_like(q)
    out = hybrid_attention(q, k, v, doc, span)
    out.backward(dout)
    got = (out, q.grad, k.grad, v.grad)

    from megafusion_kernels.hybrid_attention import hybrid_attention_reference

    def dense(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        o = hybrid_attention_reference(*leaves, doc, span)
        o.backward(dout.to(dtype))
        return [o.detach()] + [t.grad for t in leaves]

    want = dense(torch.float64)
    lowp = dense(torch.bfloat16)
    for name, g, w, l in zip(("out", "dq", "dk", "dv"), got, want, lowp):
        err = (g.double() - w).abs().max().item()
        base = (l.double() - w).abs().max().item()
        assert err <= 3 * base + 1e-3, f"{name}: error {err:.3g} vs bf16 dense {base:.3g}"


def _image_heavy_pack(n):
    """Documents of 4096 tokens, each text then 1024-token images alternating."""
    doc = torch.arange(n) // 4096
    span = torch.full((n,), -1, dtype=torch.long)
    s = 0
    for start in range(0, n, 2048):
        span[start + 512 : min(n, start + 1536)] = s
        s += 1
    return doc[None], span[None]
