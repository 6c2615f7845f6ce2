"""Grouped expert MLP over rows already grouped by expert (the output of ``moe_permute``).

    y_perm = grouped_mlp(x_perm, tokens_per_expert, w_in, w_out, activation="swiglu")

Every expert e owns a contiguous block of ``tokens_per_expert[e]`` rows. On a GPU that
supports it (bf16 on compute capability >= 9.0), each projection is a single
``torch._grouped_mm`` launch for all experts; elsewhere (CPU, older GPUs, fp32/fp16)
it falls back to one matmul per expert, which needs the counts on the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["grouped_mm", "grouped_mlp", "ACTIVATIONS"]

ACTIVATIONS = ("swiglu", "silu", "gelu", "relu")


def _grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == w.dtype == torch.bfloat16):
        return False
    # cuBLASLt/CUTLASS grouped GEMM: Hopper or newer, 16-byte aligned rows
    return torch.cuda.get_device_capability(x.device) >= (9, 0) and x.shape[1] % 8 == 0 and w.shape[2] % 8 == 0


def grouped_mm(x: torch.Tensor, w: torch.Tensor, tokens_per_expert: torch.Tensor,
               use_torch_grouped_mm: bool | None = None) -> torch.Tensor:
    """Per-expert matmul: rows of expert e are multiplied by w[e].

    Args:
        x: [N, D_in] rows grouped by expert (ascending expert, as moe_permute emits them).
        w: [E, D_in, D_out].
        tokens_per_expert: [E] integer counts summing to N.
        use_torch_grouped_mm: force (True) or forbid (False) torch._grouped_mm; None picks.

    Returns:
        [N, D_out] in x's dtype.
    """
    if w.dim() != 3 or x.dim() != 2 or w.shape[1] != x.shape[1] or w.shape[0] != tokens_per_expert.numel():
        raise ValueError(f"grouped_mm: expected x [N, D_in], w [E, D_in, D_out], tokens_per_expert [E]; got "
                         f"x {tuple(x.shape)}, w {tuple(w.shape)}, tokens_per_expert {tuple(tokens_per_expert.shape)}")
    if use_torch_grouped_mm is None:
        use_torch_grouped_mm = _grouped_mm_supported(x, w)
    if use_torch_grouped_mm:
        offs = tokens_per_expert.cumsum(0).to(device=x.device, dtype=torch.int32)
        # torch._grouped_mm leaves the output rows past the last offset uninitialised (and
        # drops input rows past it): the counts must cover every row. No host sync on a GPU:
        # the assert runs on the device (synchronously on a CPU tensor).
        total = offs[-1] if offs.numel() else offs.new_zeros(())
        torch._assert_async(total == x.shape[0], f"grouped_mm: tokens_per_expert must sum to the {x.shape[0]} rows of x")
        return torch._grouped_mm(x, w, offs=offs)
    counts = tokens_per_expert.tolist()
    if sum(counts) != x.shape[0]:
        raise ValueError(f"grouped_mm: tokens_per_expert sums to {sum(counts)} but x has {x.shape[0]} rows")
    outs = [chunk @ w[e] for e, chunk in enumerate(torch.split(x, counts, dim=0))]
    return torch.cat(outs, dim=0) if outs else x.new_empty(0, w.shape[2])


def grouped_mlp(x_perm: torch.Tensor, tokens_per_expert: torch.Tensor, w_in: torch.Tensor,
                w_out: torch.Tensor, activation: str = "swiglu",
                use_torch_grouped_mm: bool | None = None, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Expert MLP ``(act(x @ w_in[e]) * row_scale) @ w_out[e]`` for every row, one launch per projection.

    Args:
        x_perm: [N, Hd] rows grouped by expert.
        tokens_per_expert: [E] int counts.
        w_in: [E, Hd, F] ([E, Hd, 2F] for swiglu: gate half first, then the up half). Weights
            stored per expert as [out, in] (nn.Linear layout) are passed as ``w.transpose(1, 2)``.
        w_out: [E, F, Hd].
        activation: one of ACTIVATIONS.
        row_scale: optional [N] per-row factor (the routing weight of each row) applied after
            the activation, the product cast back to the activation's dtype (megatron's
            ``per_token_scale``); differentiable.

    Returns:
        [N, Hd] in x_perm's dtype.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"grouped_mlp: activation {activation!r} is not one of {ACTIVATIONS}")
    h = grouped_mm(x_perm, w_in, tokens_per_expert, use_torch_grouped_mm)
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
    elif activation == "silu":
        h = F.silu(h)
    elif activation == "gelu":
        h = F.gelu(h)
    else:
        h = F.relu(h)
    if row_scale is not None:
        if row_scale.shape != (h.shape[0],):
            raise ValueError(f"grouped_mlp: row_scale must be [N] = [{h.shape[0]}], got {tuple(row_scale.shape)}")
        h = (h * row_scale.unsqueeze(-1)).to(h.dtype)
    return grouped_mm(h, w_out, tokens_per_expert, use_torch_grouped_mm)
