"""Normalisation layers for the local (pure torch) megatron-core spec.

megatron-core's own torch wrapper refuses sequence parallelism. Under SP each TP rank
normalises a different slice of the sequence with the *same* weights, so those weights'
gradients must be all-reduced across TP ranks; megatron does that for every parameter
marked ``sequence_parallel=True``. This module marks them.
"""

from __future__ import annotations

import torch
from torch import nn


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the last dimension, chosen by ``config.normalization``.

    Built by megatron's ``build_module(spec, config=..., hidden_size=..., eps=...)``.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused) -> None:
        super().__init__()
        if config.normalization == "RMSNorm":
            self.norm: nn.Module = nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            self.norm = nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization {config.normalization!r} is not supported (RMSNorm or LayerNorm)")
        for param in self.norm.parameters():
            setattr(param, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)
