"""Hybrid causal + bidirectional attention for packed multimodal sequences.

    out = hybrid_attention(q, k, v, doc_ids, span_ids)          # differentiable

Token i attends to token j iff ``doc_ids[i] == doc_ids[j]`` and (``j <= i`` or
(``span_ids[i] >= 0`` and ``span_ids[i] == span_ids[j]``)): causal text, bidirectional
inside each image/frame span, and packed documents never see each other. A row that sees
nothing returns 0 and gets zero gradients (under this rule every row sees at least
itself, so this only matters for N = 0).

The work is done by Triton kernels (``hybrid_attention_triton``) that skip fully masked
tiles and drop the mask arithmetic on fully visible ones, from per-tile min/max of the ids
(``hybrid_attention_tiles``). Forward and backward are torch custom ops
(``megafusion::hybrid_attention_fwd`` / ``_bwd``) with fake implementations, so the op is
an opaque node under ``torch.compile`` (fullgraph works, on CPU too with the Triton
interpreter).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from megafusion_kernels.hybrid_attention_triton import hybrid_attention_backward, hybrid_attention_forward, interpreting

__all__ = ["hybrid_attention", "hybrid_attention_reference", "visibility_mask"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.custom_op("megafusion::hybrid_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor, span_ids: torch.Tensor, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if q.shape[2] == 0:
        return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)
    return hybrid_attention_forward(q, k, v, doc_ids, span_ids, sm_scale)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, doc_ids, span_ids, sm_scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("megafusion::hybrid_attention_bwd", mutates_args=())
def _bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    doc_ids: torch.Tensor, span_ids: torch.Tensor, sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if q.shape[2] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    return hybrid_attention_backward(dout, q, k, v, out, lse, doc_ids, span_ids, sm_scale)


@_bwd_op.register_fake
def _bwd_fake(dout, q, k, v, out, lse, doc_ids, span_ids, sm_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, doc_ids, span_ids, sm_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, doc_ids, span_ids)
    ctx.sm_scale = sm_scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, doc_ids, span_ids = ctx.saved_tensors
    dq, dk, dv = _bwd_op(dout, q, k, v, out, lse, doc_ids, span_ids, ctx.sm_scale)
    return dq, dk, dv, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor, span_ids: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"hybrid_attention: q, k, v must be [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    bsz, heads, n, d = q.shape
    if k.shape != v.shape or k.shape[0] != bsz or k.shape[2] != n or k.shape[3] != d:
        raise ValueError(f"hybrid_attention: k and v must be [B, Hkv, N, D] = [{bsz}, Hkv, {n}, {d}]; got {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[1] == 0 or heads % k.shape[1] != 0:
        raise ValueError(f"hybrid_attention: q heads ({heads}) must be a multiple of k/v heads ({k.shape[1]})")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"hybrid_attention: q, k, v must share one dtype of {_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if d % 16 != 0 or not 16 <= d <= 256:
        raise ValueError(f"hybrid_attention: head dim must be a multiple of 16 in [16, 256]; got {d}")
    for name, ids in (("doc_ids", doc_ids), ("span_ids", span_ids)):
        if tuple(ids.shape) != (bsz, n) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"hybrid_attention: {name} must be an integer tensor [B, N] = [{bsz}, {n}]; got {ids.dtype} {tuple(ids.shape)}")
    if q.device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "hybrid_attention: q is on the CPU but Triton is not in interpreter mode; set TRITON_INTERPRET=1 "
            "before anything imports triton (slow, for tests), or use another attention backend on CPU"
        )


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor,
    span_ids: torch.Tensor,
    softmax_scale: Optional[float] = None,
) -> torch.Tensor:
    """Attention of q [B, H, N, D] over k, v [B, Hkv, N, D] (H a multiple of Hkv) under
    the hybrid rule given by ``doc_ids``/``span_ids`` [B, N] (ints, span -1 for text).

    ``softmax_scale`` defaults to 1/sqrt(D). Returns [B, H, N, D] in q's dtype (fp32,
    fp16 or bf16; D a multiple of 16 up to 256; any N). Ids must fit in int32.
    """
    _check(q, k, v, doc_ids, span_ids)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    doc = doc_ids.to(device=q.device, dtype=torch.int32).contiguous()
    span = span_ids.to(device=q.device, dtype=torch.int32).contiguous()
    out, _ = _fwd_op(q, k, v, doc, span, scale)
    return out


def visibility_mask(doc_ids: torch.Tensor, span_ids: torch.Tensor) -> torch.Tensor:
    """Dense [B, N, N] bool mask of the rule (``mask[b, i, j]``: i sees j)."""
    n = doc_ids.shape[-1]
    pos = torch.arange(n, device=doc_ids.device)
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = pos[None, :] <= pos[:, None]
    same_span = (span_ids[:, :, None] >= 0) & (span_ids[:, :, None] == span_ids[:, None, :])
    return same_doc & (causal[None] | same_span)


def hybrid_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor,
    span_ids: torch.Tensor,
    softmax_scale: Optional[float] = None,
) -> torch.Tensor:
    """Dense reference (O(N^2) memory) in the inputs' dtype; rows that see nothing give 0.

    Use it in float64 to check the kernel, or as a slow fallback."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    mask = visibility_mask(doc_ids, span_ids)[:, None]
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(mask.any(-1, keepdim=True), probs, torch.zeros_like(probs))
    return probs @ v
