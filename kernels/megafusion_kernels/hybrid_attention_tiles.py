"""Per-tile metadata of the hybrid causal + bidirectional mask, and the tile lists the
attention kernels walk.

The rule (see ``megafusion/data/sample.py``)::

    i sees j  iff  doc[i] == doc[j]  and  (j <= i  or  (span[i] >= 0 and span[i] == span[j]))

A sequence of N positions is cut into tiles of ``block`` positions. For each tile we keep
the min/max of its document ids and of its span ids; from two tiles' summaries alone we
can tell, without looking at any pair, that

- the whole (query tile, key tile) block is masked (``SKIP``): the documents cannot
  meet, or every key lies after every query and the image spans cannot meet; or
- the whole block is visible (``FULL``): one document throughout and either every key at
  or before every query, or one image span throughout both tiles;

and otherwise it is ``PARTIAL`` (the kernel evaluates the rule per pair). The test is
sound for any ids (not only sorted packs): it only ever errs towards ``PARTIAL``.

``summarize_tiles``/``classify_tiles``/``tile_lists`` are the plain-torch definition;
``build_tile_lists`` does the same in two small Triton kernels (what the attention calls,
since a dozen torch launches would cost more than the attention itself at short N).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

SKIP, PARTIAL, FULL = 0, 1, 2

_BIG = 2**31 - 1


@dataclass(frozen=True)
class TileSummary:
    """Min/max of the ids in each tile of ``block`` positions; tensors are [B, T] int32.

    ``span_pos_min`` is the smallest non-negative span id in the tile (``_BIG`` when the
    tile is all text); ``span_max`` is -1 then. ``start``/``last`` [T] are the first and
    last valid positions; ``complete`` [T] says the tile has ``block`` valid positions.
    """

    block: int
    doc_min: torch.Tensor
    doc_max: torch.Tensor
    span_min: torch.Tensor
    span_max: torch.Tensor
    span_pos_min: torch.Tensor
    start: torch.Tensor
    last: torch.Tensor
    complete: torch.Tensor


def summarize_tiles(doc_ids: torch.Tensor, span_ids: torch.Tensor, block: int) -> TileSummary:
    """Tile summaries of ``doc_ids``/``span_ids`` [B, N] for tiles of ``block`` positions."""
    bsz, n = doc_ids.shape
    tiles = max(1, -(-n // block))
    pad = tiles * block - n
    doc = doc_ids.to(torch.int64)
    span = span_ids.to(torch.int64)

    def _fold(x: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, pad), value=fill).view(bsz, tiles, block)

    span_pos = torch.where(span >= 0, span, torch.full_like(span, _BIG))
    pos = torch.arange(tiles, device=doc_ids.device) * block
    return TileSummary(
        block=block,
        doc_min=_fold(doc, _BIG).amin(-1),
        doc_max=_fold(doc, -_BIG).amax(-1),
        span_min=_fold(span, _BIG).amin(-1),
        span_max=_fold(span, -_BIG).amax(-1),
        span_pos_min=_fold(span_pos, _BIG).amin(-1),
        start=pos,
        last=torch.clamp(pos + block, max=n) - 1,
        complete=pos + block <= n,
    )


def classify_tiles(q: TileSummary, k: TileSummary) -> torch.Tensor:
    """[B, Tq, Tk] int8: ``SKIP``, ``PARTIAL`` or ``FULL`` per (query tile, key tile)."""
    qd_lo, qd_hi = q.doc_min[:, :, None], q.doc_max[:, :, None]
    kd_lo, kd_hi = k.doc_min[:, None, :], k.doc_max[:, None, :]
    docs_apart = (qd_hi < kd_lo) | (kd_hi < qd_lo)
    keys_after = k.start[None, None, :] > q.last[None, :, None]
    # Spans can meet only where the ranges of non-negative span ids overlap.
    spans_meet = torch.maximum(q.span_pos_min[:, :, None], k.span_pos_min[:, None, :]) <= torch.minimum(
        q.span_max[:, :, None], k.span_max[:, None, :]
    )
    skip = docs_apart | (keys_after & ~spans_meet)

    one_doc = (qd_lo == qd_hi) & (kd_lo == kd_hi) & (qd_lo == kd_lo)
    keys_before = k.last[None, None, :] <= q.start[None, :, None]
    one_span = (
        (q.span_min[:, :, None] == q.span_max[:, :, None])
        & (k.span_min[:, None, :] == k.span_max[:, None, :])
        & (q.span_min[:, :, None] == k.span_min[:, None, :])
        & (q.span_min[:, :, None] >= 0)
    )
    complete = q.complete[None, :, None] & k.complete[None, None, :]
    full = one_doc & (keys_before | one_span) & complete
    cls = torch.full(skip.shape, PARTIAL, dtype=torch.int8, device=skip.device)
    cls[full] = FULL
    cls[skip] = SKIP
    return cls


@dataclass(frozen=True)
class TileLists:
    """For each row tile, the column tiles to visit, FULL ones and PARTIAL ones apart.

    ``full_count``/``part_count`` [B, T] int32; ``full_index``/``part_index`` [B, T, S]
    int32 hold the column-tile indices in ascending order in their first ``count``
    entries (the rest is unused).
    """

    full_count: torch.Tensor
    full_index: torch.Tensor
    part_count: torch.Tensor
    part_index: torch.Tensor


def tile_lists(cls: torch.Tensor) -> TileLists:
    """Tile lists of a [B, R, C] classification, one list per row tile ``R``."""

    def _select(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        count = sel.sum(-1, dtype=torch.int32)
        # A stable sort puts the selected columns first, in ascending order.
        index = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return count.contiguous(), index.contiguous()

    full_count, full_index = _select(cls == FULL)
    part_count, part_index = _select(cls == PARTIAL)
    return TileLists(full_count, full_index, part_count, part_index)


# ------------------------------------------------------------------ Triton version
#
# The same summaries, classes and lists in two small kernels; the torch functions above
# are the reference they are tested against.

@triton.jit
def _summarize_kernel(DOC, SPAN, OUT, N, T, BLOCK: tl.constexpr):
    """OUT [B, 5, T] int32: doc_min, doc_max, span_min, span_max, span_pos_min per tile."""
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = t * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    doc = tl.load(DOC + b * N + offs, mask=ok, other=0)
    span = tl.load(SPAN + b * N + offs, mask=ok, other=-1)
    big = 2147483647
    out = OUT + b * 5 * T + t
    tl.store(out, tl.min(tl.where(ok, doc, big), 0))
    tl.store(out + T, tl.max(tl.where(ok, doc, -big), 0))
    tl.store(out + 2 * T, tl.min(tl.where(ok, span, big), 0))
    tl.store(out + 3 * T, tl.max(tl.where(ok, span, -big), 0))
    tl.store(out + 4 * T, tl.min(tl.where(ok & (span >= 0), span, big), 0))


@triton.jit
def _lists_kernel(
    ROW_SUM, COL_SUM, FULL_CNT, FULL_IDX, PART_CNT, PART_IDX, N, TR, TC,
    ROW_BLOCK: tl.constexpr, COL_BLOCK: tl.constexpr, BLOCK_T: tl.constexpr, ROWS_ARE_QUERIES: tl.constexpr,
):
    """For row tile ``r`` of batch ``b``: classify every column tile, write the FULL and
    PARTIAL column indices (ascending) and their counts. Same rule as ``classify_tiles``."""
    r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    c = tl.arange(0, BLOCK_T)
    c_ok = c < TC
    zero = tl.zeros([BLOCK_T], dtype=tl.int32)
    rs = ROW_SUM + b * 5 * TR + r
    cs = COL_SUM + b * 5 * TC + c
    r_vals = (
        tl.load(rs) + zero, tl.load(rs + TR) + zero, tl.load(rs + 2 * TR) + zero,
        tl.load(rs + 3 * TR) + zero, tl.load(rs + 4 * TR) + zero,
    )
    c_vals = (
        tl.load(cs, mask=c_ok, other=0), tl.load(cs + TC, mask=c_ok, other=0), tl.load(cs + 2 * TC, mask=c_ok, other=0),
        tl.load(cs + 3 * TC, mask=c_ok, other=0), tl.load(cs + 4 * TC, mask=c_ok, other=0),
    )
    r_start = r * ROW_BLOCK + zero
    r_last = tl.minimum(r_start + ROW_BLOCK, N) - 1
    c_start = c * COL_BLOCK
    c_last = tl.minimum(c_start + COL_BLOCK, N) - 1
    complete = (r_start + ROW_BLOCK <= N) & (c_start + COL_BLOCK <= N)
    if ROWS_ARE_QUERIES:
        q_vals, k_vals = r_vals, c_vals
        q_start, q_last, k_start, k_last = r_start, r_last, c_start, c_last
    else:
        q_vals, k_vals = c_vals, r_vals
        q_start, q_last, k_start, k_last = c_start, c_last, r_start, r_last
    q_dmin, q_dmax, q_smin, q_smax, q_spmin = q_vals
    k_dmin, k_dmax, k_smin, k_smax, k_spmin = k_vals

    docs_apart = (q_dmax < k_dmin) | (k_dmax < q_dmin)
    keys_after = k_start > q_last
    spans_meet = tl.maximum(q_spmin, k_spmin) <= tl.minimum(q_smax, k_smax)
    skip = docs_apart | (keys_after & (spans_meet == 0))
    one_doc = (q_dmin == q_dmax) & (k_dmin == k_dmax) & (q_dmin == k_dmin)
    keys_before = k_last <= q_start
    one_span = (q_smin == q_smax) & (k_smin == k_smax) & (q_smin == k_smin) & (q_smin >= 0)
    full = one_doc & (keys_before | one_span) & complete & c_ok
    part = (skip == 0) & (full == 0) & c_ok

    row = b * TR + r
    full_i = full.to(tl.int32)
    part_i = part.to(tl.int32)
    tl.store(FULL_IDX + row * TC + tl.cumsum(full_i, 0) - 1, c, mask=full)
    tl.store(PART_IDX + row * TC + tl.cumsum(part_i, 0) - 1, c, mask=part)
    tl.store(FULL_CNT + row, tl.sum(full_i, 0))
    tl.store(PART_CNT + row, tl.sum(part_i, 0))


def _summaries(doc_ids: torch.Tensor, span_ids: torch.Tensor, block: int) -> torch.Tensor:
    bsz, n = doc_ids.shape
    tiles = triton.cdiv(n, block)
    out = torch.empty((bsz, 5, tiles), dtype=torch.int32, device=doc_ids.device)
    _summarize_kernel[(tiles, bsz)](doc_ids, span_ids, out, n, tiles, BLOCK=block)
    return out


def build_tile_lists(
    doc_ids: torch.Tensor, span_ids: torch.Tensor, row_block: int, col_block: int, rows_are_queries: bool
) -> TileLists:
    """``tile_lists`` of the classification for rows of ``row_block`` positions (query
    tiles if ``rows_are_queries`` else key tiles) against columns of ``col_block``.

    ``doc_ids``/``span_ids``: contiguous int32 [B, N], N > 0."""
    bsz, n = doc_ids.shape
    row_sum = _summaries(doc_ids, span_ids, row_block)
    col_sum = row_sum if col_block == row_block else _summaries(doc_ids, span_ids, col_block)
    tr, tc = row_sum.shape[2], col_sum.shape[2]
    dev = doc_ids.device
    lists = TileLists(
        full_count=torch.empty((bsz, tr), dtype=torch.int32, device=dev),
        full_index=torch.empty((bsz, tr, tc), dtype=torch.int32, device=dev),
        part_count=torch.empty((bsz, tr), dtype=torch.int32, device=dev),
        part_index=torch.empty((bsz, tr, tc), dtype=torch.int32, device=dev),
    )
    _lists_kernel[(tr, bsz)](
        row_sum, col_sum, lists.full_count, lists.full_index, lists.part_count, lists.part_index,
        n, tr, tc, ROW_BLOCK=row_block, COL_BLOCK=col_block, BLOCK_T=triton.next_power_of_2(tc),
        ROWS_ARE_QUERIES=rows_are_queries,
    )
    return lists
