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

Everything here is plain torch on small [B, T] / [B, Tq, Tk] tensors, run once per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
