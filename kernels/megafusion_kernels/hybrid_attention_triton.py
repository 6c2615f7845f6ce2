"""Triton kernels of hybrid causal + bidirectional attention (flash-attention style).

Forward: one program per (batch*head, query tile). It walks the key tiles listed for its
query tile (``hybrid_attention_tiles.build_tile_lists``): first the FULL tiles with no mask
arithmetic at all, then the PARTIAL tiles where the rule is evaluated per pair from the
doc/span ids; SKIP tiles are never read. Online softmax in the log2 domain; it stores the
output and the row log-sum-exp (log2, +inf for a row that sees nothing).

Backward (FlashAttention-2 split, no atomics):
- dk/dv: one program per (batch*kv-head, key tile); it loops over the q heads of its GQA
  group and over the query tiles listed for its key tile, accumulating dk, dv in fp32.
- dq: one program per (batch*head, query tile) over its listed key tiles.
Tile sizes are fixed per head dim (``select_tiles``; the lists depend on them), warps and
pipeline stages are autotuned on the GPU.
``delta = rowsum(dO * O)`` comes from a small kernel beforehand.

Interpreter (``TRITON_INTERPRET=1``, CPU): bf16 ``tl.dot`` is wrong there, so operands are
upcast to fp32 (``UPCAST``), and only one autotune config is offered.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from megafusion_kernels.hybrid_attention_tiles import build_tile_lists

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes (positions): forward (block_m queries x block_n keys), dk/dv
    (bwd_kv_n keys per program x bwd_kv_m queries per step), dq (bwd_q_m queries per
    program x bwd_q_n keys per step)."""

    block_m: int
    block_n: int
    bwd_kv_m: int
    bwd_kv_n: int
    bwd_q_m: int
    bwd_q_n: int


def select_tiles(head_dim: int, dtype: torch.dtype = torch.bfloat16) -> TileConfig:
    """Fixed tile sizes per head dim (the tile lists depend on them, so they are not
    autotuned; warps/stages are). GPU sizes follow Triton's fused-attention tutorial
    (FA2 split: small query steps under large key tiles for dk/dv, and the converse),
    halved where the fp32 accumulators would spill registers on sm_90 (checked with
    ptxas: D = 256 bf16, or fp32 inputs with D > 64)."""
    if interpreting():
        return TileConfig(64, 64, 64, 64, 64, 64)
    width = head_dim * (2 if dtype == torch.float32 else 1)
    if width <= 128:
        return TileConfig(128, 64, 32, 128, 128, 32)
    return TileConfig(64, 32, 32, 32, 64, 32)


def _autotune_configs() -> list[triton.Config]:
    if interpreting():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)]


def _prune_configs(configs, named_args, **kwargs):
    """4 warps spill from 64 bytes of head width on (ptxas -v, sm_90, the tiles of
    ``select_tiles``): bf16 D = 64 spills 168 bytes in the dk/dv kernel (255 registers, the
    forward at 244), fp32 D = 32 spills in all three attention kernels; at 8 warps neither
    spills. bf16 D = 32 and fp32 D = 16 do not spill at 4 warps. So 4 warps only for
    narrower heads (bf16/fp16 D < 64, fp32 D < 32)."""
    d = kwargs.get("D", named_args.get("D", 0))
    q = named_args.get("Q")
    width = d * (2 if getattr(q, "dtype", None) == torch.float32 else 1)
    keep = [c for c in configs if width < 64 or c.num_warps >= 8]
    return keep or configs


# ----------------------------------------------------------------------------- forward


@triton.jit
def _load_rows(base, offs, stride, offs_d, N, D: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_N: tl.constexpr):
    """Load a [len(offs), BLOCK_D] tile of rows; masks only what may be out of range
    (none at all for a complete tile with a power-of-two head dim)."""
    ptrs = base + offs[:, None] * stride + offs_d[None, :]
    if CHECK_N:
        if BLOCK_D == D:
            x = tl.load(ptrs, mask=offs[:, None] < N, other=0.0)
        else:
            x = tl.load(ptrs, mask=(offs[:, None] < N) & (offs_d[None, :] < D), other=0.0)
    else:
        if BLOCK_D == D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
    return x


@triton.jit
def _load_ids(DOC, SPAN, offs, N):
    """doc and span ids at positions ``offs``; past N they read as (0, -1), which the
    callers mask out anyway."""
    ok = offs < N
    return tl.load(DOC + offs, mask=ok, other=0), tl.load(SPAN + offs, mask=ok, other=-1)


@triton.jit
def _visible(pos_q, doc_q, span_q, pos_k, doc_k, span_k):
    """The hybrid rule, elementwise on broadcastable query / key operands: same document,
    and causal or inside the query's own image span."""
    return (doc_q == doc_k) & ((pos_k <= pos_q) | ((span_q >= 0) & (span_q == span_k)))


@triton.jit
def _load_kv(k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, N,
             D: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr):
    """A key tile and its value tile; FULL tiles are complete (no position past N), so
    only PARTIAL ones (``MASKED``) check N."""
    k = _load_rows(k_base, offs_n, stride_kn, offs_d, N, D, BLOCK_D, MASKED)
    v = _load_rows(v_base, offs_n, stride_vn, offs_d, N, D, BLOCK_D, MASKED)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _query_program(H, N, GROUP, n_tiles_m, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """(pid_bh, pid_m, b, h, hk, offs_m, offs_d, row_ok) of a per-query-tile program.

    Heads on the fast grid axis and the last query tiles first: under a causal mask
    those have the most key tiles to visit, so the long programs start early."""
    pid_bh = tl.program_id(0)
    pid_m = n_tiles_m - 1 - tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return pid_bh, pid_m, b, h, h // GROUP, offs_m, tl.arange(0, BLOCK_D), offs_m < N


@triton.jit
def _fwd_tile(
    acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, DOC, SPAN,
    start_n, offs_m, offs_d, doc_q, span_q, N, qk_scale,
    MASKED: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k, v = _load_kv(k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, N, D, BLOCK_D, MASKED, UPCAST)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if MASKED:
        doc_k, span_k = _load_ids(DOC, SPAN, offs_n, N)
        vis = _visible(offs_m[:, None], doc_q[:, None], span_q[:, None], offs_n[None, :], doc_k[None, :], span_k[None, :])
        vis = vis & (offs_n[None, :] < N)
        s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing visible yet keeps m = -inf; shift by 0 there to avoid inf - inf.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_new, l_i


@triton.autotune(
    configs=_autotune_configs(), key=["D", "BLOCK_M", "BLOCK_N", "N"], prune_configs_by={"early_config_prune": _prune_configs}
)
@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, DOC, SPAN, FULL_CNT, FULL_IDX, PART_CNT, PART_IDX,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    stride_ib, stride_it,
    H, N, GROUP, qk_scale, n_tiles_m,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    pid_bh, pid_m, b, h, hk, offs_m, offs_d, row_ok = _query_program(H, N, GROUP, n_tiles_m, BLOCK_M, BLOCK_D)
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    DOC = DOC + b * N
    SPAN = SPAN + b * N
    doc_q, span_q = _load_ids(DOC, SPAN, offs_m, N)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    tile = b * n_tiles_m + pid_m
    full_idx = FULL_IDX + b * stride_ib + pid_m * stride_it
    for i in range(0, tl.load(FULL_CNT + tile)):
        start_n = tl.load(full_idx + i) * BLOCK_N
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, DOC, SPAN,
            start_n, offs_m, offs_d, doc_q, span_q, N, qk_scale,
            False, D, BLOCK_D, BLOCK_N, UPCAST, PREC,
        )
    part_idx = PART_IDX + b * stride_ib + pid_m * stride_it
    for i in range(0, tl.load(PART_CNT + tile)):
        start_n = tl.load(part_idx + i) * BLOCK_N
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, DOC, SPAN,
            start_n, offs_m, offs_d, doc_q, span_q, N, qk_scale,
            True, D, BLOCK_D, BLOCK_N, UPCAST, PREC,
        )

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(
        O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
        out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D),
    )
    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, lse, mask=row_ok)


# ---------------------------------------------------------------------------- backward


@triton.jit
def _delta_kernel(
    O, DO, DELTA, stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don, H, N,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """DELTA [B, H, N] fp32 = rowsum(dO * O), the softmax-backward correction.

    Grid ``delta_grid``: batch x heads on axis 0 (up to 2^31 - 1 programs; axes 1 and 2
    stop at 65,535, which B*H passes at e.g. 4096 sequences x 16 heads), row tiles on axis 1."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b * stride_ob + h * stride_oh, offs_m, stride_on, offs_d, N, D, BLOCK_D, True)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, stride_don, offs_d, N, D, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def _bwd_kv_tile(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don, DOC, SPAN,
    start_m, offs_n, offs_d, doc_k, span_k, N, qk_scale,
    MASKED: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    # Rows past N load as zeros (q = dO = 0, lse = delta = 0): they add exactly nothing.
    q = _load_rows(q_base, offs_m, stride_qn, offs_d, N, D, BLOCK_D, MASKED)
    do = _load_rows(do_base, offs_m, stride_don, offs_d, N, D, BLOCK_D, MASKED)
    if MASKED:
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    else:
        lse = tl.load(lse_base + offs_m)
        delta = tl.load(delta_base + offs_m)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
    p_t = tl.math.exp2(s_t - lse[None, :])
    if MASKED:
        doc_q, span_q = _load_ids(DOC, SPAN, offs_m, N)
        vis = _visible(offs_m[None, :], doc_q[None, :], span_q[None, :], offs_n[:, None], doc_k[:, None], span_k[:, None])
        vis = vis & row_ok[None, :]
        p_t = tl.where(vis, p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.autotune(
    configs=_autotune_configs(), key=["D", "BLOCK_M", "BLOCK_N", "N"], prune_configs_by={"early_config_prune": _prune_configs}
)
@triton.jit
def _bwd_kv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DOC, SPAN, FULL_CNT, FULL_IDX, PART_CNT, PART_IDX,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_ib, stride_it,
    H, HKV, N, GROUP, qk_scale, sm_scale, n_tiles_n,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    # Heads on the fast grid axis; first key tiles (the most query tiles to visit) first.
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = (pid_bh % HKV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < N
    ld_mask = col_ok[:, None] & (offs_d[None, :] < D)
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=ld_mask, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=ld_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    DOC = DOC + b * N
    SPAN = SPAN + b * N
    doc_k, span_k = _load_ids(DOC, SPAN, offs_n, N)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    tile = b * n_tiles_n + pid_n
    n_full = tl.load(FULL_CNT + tile)
    n_part = tl.load(PART_CNT + tile)
    full_idx = FULL_IDX + b * stride_ib + pid_n * stride_it
    part_idx = PART_IDX + b * stride_ib + pid_n * stride_it
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + (b * H + h) * N
        delta_base = DELTA + (b * H + h) * N
        for i in range(0, n_full):
            start_m = tl.load(full_idx + i) * BLOCK_M
            dk, dv = _bwd_kv_tile(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don, DOC, SPAN,
                start_m, offs_n, offs_d, doc_k, span_k, N, qk_scale,
                False, D, BLOCK_D, BLOCK_M, UPCAST, PREC,
            )
        for i in range(0, n_part):
            start_m = tl.load(part_idx + i) * BLOCK_M
            dk, dv = _bwd_kv_tile(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_don, DOC, SPAN,
                start_m, offs_n, offs_d, doc_k, span_k, N, qk_scale,
                True, D, BLOCK_D, BLOCK_M, UPCAST, PREC,
            )
    dk = dk * sm_scale
    tl.store(
        DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
        dk.to(DK.dtype.element_ty), mask=ld_mask,
    )
    tl.store(
        DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
        dv.to(DV.dtype.element_ty), mask=ld_mask,
    )


@triton.jit
def _bwd_q_tile(
    dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, DOC, SPAN,
    start_n, offs_m, offs_d, doc_q, span_q, N, qk_scale,
    MASKED: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k, v = _load_kv(k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, N, D, BLOCK_D, MASKED, UPCAST)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        doc_k, span_k = _load_ids(DOC, SPAN, offs_n, N)
        vis = _visible(offs_m[:, None], doc_q[:, None], span_q[:, None], offs_n[None, :], doc_k[None, :], span_k[None, :])
        vis = vis & (offs_n[None, :] < N)
        p = tl.where(vis, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.autotune(
    configs=_autotune_configs(), key=["D", "BLOCK_M", "BLOCK_N", "N"], prune_configs_by={"early_config_prune": _prune_configs}
)
@triton.jit
def _bwd_q_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DOC, SPAN, FULL_CNT, FULL_IDX, PART_CNT, PART_IDX,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_ib, stride_it,
    H, N, GROUP, qk_scale, sm_scale, n_tiles_m,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    pid_bh, pid_m, b, h, hk, offs_m, offs_d, row_ok = _query_program(H, N, GROUP, n_tiles_m, BLOCK_M, BLOCK_D)
    ld_mask = row_ok[:, None] & (offs_d[None, :] < D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :], mask=ld_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :], mask=ld_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)
    DOC = DOC + b * N
    SPAN = SPAN + b * N
    doc_q, span_q = _load_ids(DOC, SPAN, offs_m, N)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    tile = b * n_tiles_m + pid_m
    full_idx = FULL_IDX + b * stride_ib + pid_m * stride_it
    for i in range(0, tl.load(FULL_CNT + tile)):
        start_n = tl.load(full_idx + i) * BLOCK_N
        dq = _bwd_q_tile(
            dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, DOC, SPAN,
            start_n, offs_m, offs_d, doc_q, span_q, N, qk_scale,
            False, D, BLOCK_D, BLOCK_N, UPCAST, PREC,
        )
    part_idx = PART_IDX + b * stride_ib + pid_m * stride_it
    for i in range(0, tl.load(PART_CNT + tile)):
        start_n = tl.load(part_idx + i) * BLOCK_N
        dq = _bwd_q_tile(
            dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, DOC, SPAN,
            start_n, offs_m, offs_d, doc_q, span_q, N, qk_scale,
            True, D, BLOCK_D, BLOCK_N, UPCAST, PREC,
        )
    dq = dq * sm_scale
    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :],
        dq.to(DQ.dtype.element_ty), mask=ld_mask,
    )


# ----------------------------------------------------------------------------- launchers


def _kernel_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, input precision): the interpreter cannot dot bf16, and fp32 stays exact
    (no tf32) so fp32 results match torch's fp32 attention."""
    upcast = interpreting() and dtype != torch.float32
    prec = "ieee" if (dtype == torch.float32 or upcast) else "tf32"
    return upcast, prec


def hybrid_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor, span_ids: torch.Tensor, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``out`` [B, H, N, D] (dtype of q) and ``lse`` [B, H, N] fp32 (log2 domain).

    Expects last-dim-contiguous q/k/v and int32 contiguous ids (``hybrid_attention``
    prepares them)."""
    bsz, heads, n, d = q.shape
    cfg = select_tiles(d, q.dtype)
    out = torch.empty_like(q)
    lse = torch.empty((bsz, heads, n), device=q.device, dtype=torch.float32)
    lists = build_tile_lists(doc_ids, span_ids, cfg.block_m, cfg.block_n, rows_are_queries=True)
    n_tiles_m = lists.full_count.shape[1]
    upcast, prec = _kernel_flags(q.dtype)
    _fwd_kernel[(bsz * heads, n_tiles_m)](
        q, k, v, out, lse, doc_ids, span_ids,
        lists.full_count, lists.full_index, lists.part_count, lists.part_index,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lists.full_index.stride(0), lists.full_index.stride(1),
        heads, n, heads // k.shape[1], sm_scale * LOG2E, n_tiles_m,
        D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        UPCAST=upcast, PREC=prec,
    )
    return out, lse


DELTA_BLOCK_M = 64


def delta_grid(bsz: int, heads: int, n: int) -> tuple[int, int]:
    """Launch grid of ``_delta_kernel``: (batch x heads, row tiles). Like every kernel here,
    the product that grows with the batch goes on axis 0, the only one past 65,535."""
    return bsz * heads, triton.cdiv(n, DELTA_BLOCK_M)


def hybrid_attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    doc_ids: torch.Tensor, span_ids: torch.Tensor, sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``dq, dk, dv`` (shapes and dtypes of q, k, v)."""
    bsz, heads, n, d = q.shape
    hkv = k.shape[1]
    cfg = select_tiles(d, q.dtype)
    upcast, prec = _kernel_flags(q.dtype)
    delta = torch.empty((bsz, heads, n), device=q.device, dtype=torch.float32)
    _delta_kernel[delta_grid(bsz, heads, n)](
        out, dout, delta, out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2), heads, n,
        D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_M=DELTA_BLOCK_M,
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(D=d, BLOCK_D=triton.next_power_of_2(d), UPCAST=upcast, PREC=prec)

    kv_lists = build_tile_lists(doc_ids, span_ids, cfg.bwd_kv_n, cfg.bwd_kv_m, rows_are_queries=False)
    n_tiles_n = kv_lists.full_count.shape[1]
    _bwd_kv_kernel[(bsz * hkv, n_tiles_n)](
        q, k, v, dout, lse, delta, dk, dv, doc_ids, span_ids,
        kv_lists.full_count, kv_lists.full_index, kv_lists.part_count, kv_lists.part_index,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        kv_lists.full_index.stride(0), kv_lists.full_index.stride(1),
        heads, hkv, n, heads // hkv, sm_scale * LOG2E, sm_scale, n_tiles_n,
        BLOCK_M=cfg.bwd_kv_m, BLOCK_N=cfg.bwd_kv_n, **common,
    )

    q_lists = build_tile_lists(doc_ids, span_ids, cfg.bwd_q_m, cfg.bwd_q_n, rows_are_queries=True)
    n_tiles_m = q_lists.full_count.shape[1]
    _bwd_q_kernel[(bsz * heads, n_tiles_m)](
        q, k, v, dout, lse, delta, dq, doc_ids, span_ids,
        q_lists.full_count, q_lists.full_index, q_lists.part_count, q_lists.part_index,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        q_lists.full_index.stride(0), q_lists.full_index.stride(1),
        heads, n, heads // hkv, sm_scale * LOG2E, sm_scale, n_tiles_m,
        BLOCK_M=cfg.bwd_q_m, BLOCK_N=cfg.bwd_q_n, **common,
    )
    return dq, dk, dv
