"""AdaLN time conditioning on image/frame tokens only (``model.time_conditioning: adaln``).

Each layer's two pre-norms become ``AdaLNNorm``: text positions are normalised as usual;
at latent positions the normalised activations are modulated by the flow time t of their
span, ``norm(x) * (1 + scale(t)) + shift(t)`` (DiT's adaptive layer norm, without the
residual gates, so the text path is exactly the plain transformer).

Megatron calls a norm with the hidden states only, so the timesteps travel beside them in
a ``TimeContext`` (one per model chunk, set by the model before each decoder forward, on
every pipeline stage). Each norm owns its modulation (``Linear(freq_dim -> 2 * hidden)``
on sinusoidal features of t): the parameters live inside the layers, so every pipeline
layout holds the same model.
"""

from __future__ import annotations

import torch
from torch import nn

from megafusion.data.sample import TEXT
from megafusion.model.embeddings import sinusoidal_embedding
from megafusion.model.norm import Norm


class TimeContext:
    """The timesteps of the micro-batch being run, for the AdaLN norms of one model chunk."""

    def __init__(self, frequency_dim: int = 256) -> None:
        self.frequency_dim = frequency_dim
        self._features: torch.Tensor | None = None  # [s, b, F]
        self._latent: torch.Tensor | None = None  # [s, b, 1] bool
        self.sequence_parallel = False

    def set(self, timesteps: torch.Tensor, modality: torch.Tensor) -> None:
        """timesteps [b, s] float, modality [b, s] int64: the whole sequence of this forward."""
        self._features = sinusoidal_embedding(timesteps.t(), self.frequency_dim)
        self._latent = (modality != TEXT).t().unsqueeze(-1)

    def local(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [s_local, b, F], latent mask [s_local, b, 1]) for norm input ``hidden``."""
        if self._features is None:
            raise RuntimeError("an AdaLN norm ran before TimeContext.set(timesteps, modality)")
        s_local, s = hidden.shape[0], self._features.shape[0]
        if s_local == s:
            return self._features, self._latent
        from megatron.core import parallel_state

        if not self.sequence_parallel or s % s_local:
            raise ValueError(f"TimeContext holds {s} positions but the norm got {s_local}")
        rank = parallel_state.get_tensor_model_parallel_rank()
        chunk = slice(rank * s_local, (rank + 1) * s_local)
        return self._features[chunk], self._latent[chunk]


class AdaLNNorm(nn.Module):
    """``Norm`` with time modulation at latent positions; built by megatron's
    ``build_module(spec, config=, hidden_size=, eps=)`` with ``context`` from the spec params."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, context: TimeContext | None = None,
                 **_unused) -> None:
        super().__init__()
        if context is None:
            raise ValueError("AdaLNNorm needs the model chunk's TimeContext (spec params={'context': ctx})")
        self.context = context
        context.sequence_parallel = bool(config.sequence_parallel)
        self.norm = Norm(config, hidden_size, eps)
        self.modulation = nn.Linear(context.frequency_dim, 2 * hidden_size, bias=False)
        for param in self.modulation.parameters():
            # Under sequence parallelism each TP rank sees other positions: all-reduce the grads.
            setattr(param, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [s, b, h] -> [s, b, h]."""
        y = self.norm(x)
        features, latent = self.context.local(x)
        shift, scale = self.modulation(features.to(y.dtype)).chunk(2, dim=-1)
        # contiguous: where() keeps its inputs' strides, and megatron's MoE router views its input
        return torch.where(latent, y * (1 + scale) + shift, y).contiguous()
