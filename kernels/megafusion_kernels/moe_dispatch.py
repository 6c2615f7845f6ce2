"""Fused MoE token dispatch: permute tokens to experts and unpermute with routing weights.

    x_perm, tokens_per_expert, state = moe_permute(x, topk_idx, num_experts)
    y_perm = experts(x_perm, tokens_per_expert)          # any per-row expert computation
    y = moe_unpermute(y_perm, state, topk_probs)          # y[t] = sum_s p[t,s] * y_perm[row(t,s)]

Layout. ``x_perm`` holds one row per *kept* (token, slot) pair, grouped by expert in
ascending expert order and, inside an expert, by ascending token (then slot). An expert
id of ``-1`` drops that slot (capacity dropping / padding): it gets no row, contributes
nothing to ``y`` and gets a zero gradient. So ``x_perm`` has ``N = (topk_idx >= 0).sum()``
rows, which is ``T*k`` when nothing is dropped. Knowing N on the host costs one device
sync; callers that already know it (megatron does) pass ``num_out_rows`` to skip it.

How. The (token, slot) -> row map is a stable sort of the expert ids (torch: a few
microseconds for 10^5 ids). All data movement is Triton, and every kernel runs one
program per token over a [slots, hidden-block] tile, so nothing needs atomics:
  permute fwd      : scatter  x[t]             -> x_perm[row(t, s)] for all s
  unpermute fwd    : gather   y[t] = sum_s p[t, s] * y_perm[row(t, s)]
  permute bwd      : the unpermute gather with p = 1
  unpermute bwd    : scatter  p[t, s] * dy[t]  -> dy_perm[row(t, s)] and, in the same
                     pass, dp[t, s] = <dy[t], y_perm[row(t, s)]>
Every destination row has exactly one writer, so results are deterministic, and the
sums accumulate in fp32 whatever the storage dtype (fp32, fp16, bf16). The kernels are
torch custom ops (``megafusion::moe_*``) with fake implementations, so torch.compile
treats them as opaque nodes.

Triton interpreter (CPU): the copies never convert dtypes, so permute is bit exact in
every dtype; sums are exact in fp32 and fp16, while bf16 results may differ by one unit
in the last place because the interpreter's fp32->bf16 cast truncates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["MoEPermState", "moe_permute", "moe_unpermute", "permute_probs"]


@dataclass(frozen=True)
class MoEPermState:
    """What ``moe_unpermute`` needs to undo ``moe_permute``.

    row_of:            [T, k] int32, row of x_perm holding (token t, slot s); -1 if dropped.
    src_index:         [N] int64, flat index t*k + s of each x_perm row (its source slot).
    tokens_per_expert: [E] int64, rows per expert (sums to N).
    """

    row_of: torch.Tensor
    src_index: torch.Tensor
    tokens_per_expert: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.row_of.shape[0]

    @property
    def topk(self) -> int:
        return self.row_of.shape[1]

    @property
    def num_rows(self) -> int:
        return self.src_index.shape[0]

    @property
    def src_token(self) -> torch.Tensor:
        """[N] int64: the token each x_perm row came from."""
        return torch.div(self.src_index, self.topk, rounding_mode="floor")


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _scatter_rows_kernel(x_ptr, row_of_ptr, out_ptr, H, num_rows,
                         K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[row_of[t, s]] = x[t] for every kept slot s; grid (T, cdiv(H, BLOCK_H))."""
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    offs_k = tl.arange(0, BLOCK_K)
    rows = tl.load(row_of_ptr + t * K + offs_k, mask=offs_k < K, other=-1).to(tl.int64)
    # rows < num_rows guards memory if a caller passed a wrong num_out_rows
    keep = (rows >= 0) & (rows < num_rows)
    v = tl.load(x_ptr + t * H + offs_h, mask=h_mask)
    tile = tl.broadcast_to(v[None, :], (BLOCK_K, BLOCK_H))
    tl.store(out_ptr + rows[:, None] * H + offs_h[None, :], tile, mask=keep[:, None] & h_mask[None, :])


@triton.jit
def _gather_sum_kernel(y_ptr, row_of_ptr, w_ptr, out_ptr, H,
                       K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
                       HAS_W: tl.constexpr, ACC: tl.constexpr):
    """out[t] = sum_s w[t, s] * y[row_of[t, s]] (w = 1 without HAS_W); grid (T, cdiv(H, BLOCK_H))."""
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    offs_k = tl.arange(0, BLOCK_K)
    rows = tl.load(row_of_ptr + t * K + offs_k, mask=offs_k < K, other=-1).to(tl.int64)
    keep = rows >= 0
    tile = tl.load(y_ptr + rows[:, None] * H + offs_h[None, :],
                   mask=keep[:, None] & h_mask[None, :], other=0.0).to(ACC)
    if HAS_W:
        w = tl.load(w_ptr + t * K + offs_k, mask=keep, other=0.0).to(ACC)
        tile = tile * w[:, None]
    acc = tl.sum(tile, axis=0)
    tl.store(out_ptr + t * H + offs_h, acc.to(out_ptr.dtype.element_ty), mask=h_mask)


@triton.jit
def _unpermute_bwd_kernel(dy_ptr, y_ptr, row_of_ptr, w_ptr, dy_perm_ptr, dw_ptr, H,
                          K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
                          ACC: tl.constexpr):
    """dy_perm[row_of[t, s]] = w[t, s] * dy[t];  dw[t, s] = <dy[t], y[row_of[t, s]]>; grid (T,)."""
    t = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    rows = tl.load(row_of_ptr + t * K + offs_k, mask=k_mask, other=-1).to(tl.int64)
    keep = rows >= 0
    w = tl.load(w_ptr + t * K + offs_k, mask=keep, other=0.0).to(ACC)
    dot = tl.zeros([BLOCK_K], dtype=ACC)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        mask = keep[:, None] & h_mask[None, :]
        g = tl.load(dy_ptr + t * H + offs_h, mask=h_mask, other=0.0).to(ACC)
        ptrs = rows[:, None] * H + offs_h[None, :]
        yp = tl.load(y_ptr + ptrs, mask=mask, other=0.0).to(ACC)
        dot += tl.sum(yp * g[None, :], axis=1)
        tl.store(dy_perm_ptr + ptrs, (w[:, None] * g[None, :]).to(dy_perm_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + t * K + offs_k, dot.to(dw_ptr.dtype.element_ty), mask=k_mask)


def _acc_dtype(*tensors: Optional[torch.Tensor]):
    """fp64 sums when any operand is fp64 (exact references, gradcheck), fp32 otherwise."""
    return tl.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else tl.float32


def _launch_config(k: int, hidden: int) -> dict:
    """BLOCK_K covers all slots; the [BLOCK_K, BLOCK_H] tile holds up to 8k elements with
    BLOCK_H >= 512 so a warp moves >= 16-byte vectors of a row (not tuned on a GPU yet)."""
    block_k = triton.next_power_of_2(k)
    block_h = min(triton.next_power_of_2(max(hidden, 1)), max(512, 8192 // block_k))
    return dict(K=k, BLOCK_K=block_k, BLOCK_H=block_h, num_warps=8 if block_k * block_h >= 8192 else 4)


# ------------------------------------------------------------------------- custom ops


@torch.library.custom_op("megafusion::moe_scatter_rows", mutates_args=())
def _scatter_rows(x: torch.Tensor, row_of: torch.Tensor, num_rows: int) -> torch.Tensor:
    T, k = row_of.shape
    H = x.shape[1]
    out = x.new_empty(num_rows, H)
    if T and H and num_rows:
        cfg = _launch_config(k, H)
        _scatter_rows_kernel[(T, triton.cdiv(H, cfg["BLOCK_H"]))](x, row_of, out, H, num_rows, **cfg)
    return out


@_scatter_rows.register_fake
def _(x, row_of, num_rows):
    return x.new_empty(num_rows, x.shape[1])


@torch.library.custom_op("megafusion::moe_gather_sum", mutates_args=())
def _gather_sum(y_perm: torch.Tensor, row_of: torch.Tensor, probs: Optional[torch.Tensor]) -> torch.Tensor:
    T, k = row_of.shape
    H = y_perm.shape[1]
    out = y_perm.new_empty(T, H)
    if T and H:
        cfg = _launch_config(k, H)
        _gather_sum_kernel[(T, triton.cdiv(H, cfg["BLOCK_H"]))](
            y_perm, row_of, probs if probs is not None else row_of, out, H,
            HAS_W=probs is not None, ACC=_acc_dtype(y_perm, probs), **cfg)
    return out


@_gather_sum.register_fake
def _(y_perm, row_of, probs):
    return y_perm.new_empty(row_of.shape[0], y_perm.shape[1])


@torch.library.custom_op("megafusion::moe_unpermute_bwd", mutates_args=())
def _unpermute_bwd(dy: torch.Tensor, y_perm: torch.Tensor, row_of: torch.Tensor,
                   probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    T, k = row_of.shape
    H = y_perm.shape[1]
    # dropped slots and rows no slot maps to stay zero
    dy_perm = torch.zeros_like(y_perm) if y_perm.shape[0] else y_perm.new_empty(0, H)
    dprobs = torch.zeros_like(probs)
    if T and H:
        _unpermute_bwd_kernel[(T,)](dy, y_perm, row_of, probs, dy_perm, dprobs, H,
                                    ACC=_acc_dtype(dy, y_perm, probs), **_launch_config(k, H))
    return dy_perm, dprobs


@_unpermute_bwd.register_fake
def _(dy, y_perm, row_of, probs):
    return torch.empty_like(y_perm), torch.empty_like(probs)


def _scatter_rows_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _scatter_rows_backward(ctx, grad):
    (row_of,) = ctx.saved_tensors
    return _gather_sum(grad.contiguous(), row_of, None), None, None


_scatter_rows.register_autograd(_scatter_rows_backward, setup_context=_scatter_rows_setup)


def _gather_sum_setup(ctx, inputs, output):
    y_perm, row_of, probs = inputs
    ctx.has_probs = probs is not None
    ctx.save_for_backward(y_perm if ctx.has_probs else None, row_of, probs)
    ctx.num_rows = y_perm.shape[0]


def _gather_sum_backward(ctx, grad):
    y_perm, row_of, probs = ctx.saved_tensors
    grad = grad.contiguous()
    if not ctx.has_probs:
        return _scatter_rows(grad, row_of, ctx.num_rows), None, None
    dy_perm, dprobs = _unpermute_bwd(grad, y_perm, row_of, probs)
    return dy_perm, None, dprobs


_gather_sum.register_autograd(_gather_sum_backward, setup_context=_gather_sum_setup)


# ------------------------------------------------------------------------- public API


def _require_runnable(t: torch.Tensor, fn: str) -> None:
    """Triton runs CPU tensors only in its interpreter (chosen when the kernels are defined)."""
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError(f"{fn}: the tensors are on the CPU but Triton is not in interpreter mode; set "
                           "TRITON_INTERPRET=1 before anything imports triton (slow, for tests), or use "
                           "model.moe.dispatch = megatron on CPU")


def moe_permute(x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int,
                num_out_rows: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, MoEPermState]:
    """Group token rows by expert.

    Args:
        x: [T, Hd] tokens (fp32, fp16 or bf16; any float dtype works).
        topk_idx: [T, k] integer expert id per token and slot, in [0, num_experts) or -1 to drop.
        num_experts: E.
        num_out_rows: the number of ids >= 0, if the caller knows it; saves one device sync
            (and skips the id range check). A wrong value loses rows, never memory.

    Returns:
        x_perm: [N, Hd] in x's dtype; rows grouped by ascending expert, then ascending token.
        tokens_per_expert: [E] int64 rows per expert, on x's device.
        state: MoEPermState for ``moe_unpermute`` / ``permute_probs``.
    """
    if x.dim() != 2 or topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
        raise ValueError(f"moe_permute: expected x [T, Hd] and topk_idx [T, k] with the same T, "
                         f"got x {tuple(x.shape)} and topk_idx {tuple(topk_idx.shape)}")
    if topk_idx.dtype.is_floating_point or topk_idx.dtype == torch.bool:
        raise TypeError(f"moe_permute: topk_idx must be an integer tensor, got {topk_idx.dtype}")
    _require_runnable(x, "moe_permute")
    T, k = topk_idx.shape
    flat = topk_idx.reshape(-1).to(device=x.device, dtype=torch.int64)
    # dropped slots (and, unchecked, ids >= E) get key E: they sort after every expert and
    # are cut off below; the clamp also keeps a bad id from counting out of bounds
    key = torch.where(flat >= 0, flat, num_experts).clamp_(max=num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=x.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    tokens_per_expert = counts[:num_experts]
    if num_out_rows is None:
        n_kept, n_bad = torch.stack([tokens_per_expert.sum(),
                                     ((flat < -1) | (flat >= num_experts)).sum()]).tolist()
        if n_bad:
            raise ValueError(f"moe_permute: {n_bad} expert ids in topk_idx lie outside "
                             f"[0, {num_experts}) and are not -1 (dropped); check num_experts")
        num_out_rows = n_kept
    # stable: ascending (token, slot) inside an expert; int32 keys halve the radix-sort passes
    order = torch.argsort(key.to(torch.int32), stable=True)
    src_index = order[:num_out_rows]
    row_of = torch.full((T * k,), -1, dtype=torch.int32, device=x.device)
    row_of[src_index] = torch.arange(num_out_rows, dtype=torch.int32, device=x.device)
    row_of = row_of.view(T, k)
    x_perm = _scatter_rows(x.contiguous(), row_of, num_out_rows)
    return x_perm, tokens_per_expert, MoEPermState(row_of, src_index, tokens_per_expert)


def moe_unpermute(y_perm: torch.Tensor, perm_state: MoEPermState,
                  topk_probs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Combine expert outputs back into token order.

    Args:
        y_perm: [N, Hd] expert outputs in the row order of ``moe_permute``.
        perm_state: from ``moe_permute``.
        topk_probs: [T, k] routing weights (any float dtype; differentiable), or None to sum
            the rows unweighted (for callers that applied the weights inside the experts).

    Returns:
        y: [T, Hd] in y_perm's dtype, y[t] = sum over kept s of topk_probs[t, s] * y_perm[row(t, s)],
        accumulated in fp32 (fp64 if an operand is fp64).
    """
    if y_perm.dim() != 2 or y_perm.shape[0] != perm_state.num_rows:
        raise ValueError(f"moe_unpermute: y_perm must be [{perm_state.num_rows}, Hd] (the rows "
                         f"moe_permute produced), got {tuple(y_perm.shape)}")
    if topk_probs is not None and tuple(topk_probs.shape) != tuple(perm_state.row_of.shape):
        raise ValueError(f"moe_unpermute: topk_probs must be [T, k] = {tuple(perm_state.row_of.shape)}, "
                         f"got {tuple(topk_probs.shape)}")
    _require_runnable(y_perm, "moe_unpermute")
    probs = topk_probs.contiguous() if topk_probs is not None else None
    return _gather_sum(y_perm.contiguous(), perm_state.row_of, probs)


def permute_probs(topk_probs: torch.Tensor, perm_state: MoEPermState) -> torch.Tensor:
    """[T, k] per-slot values -> [N] in x_perm row order (differentiable gather)."""
    return topk_probs.reshape(-1)[perm_state.src_index]
