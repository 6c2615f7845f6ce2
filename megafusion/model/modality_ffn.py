"""Feed-forward variants of the Transfusion layer, chosen by config, and the modality they read.

``model.ffn`` and ``model.moe`` pick what a TransformerLayer's ``mlp`` submodule is:

* ``ffn: dense`` (no MoE) - megatron-core's ``MLP``: one FFN for every token.
* ``ffn: modality`` - :class:`ModalityFFN`: a text FFN (``text_mlp``) and a vision FFN
  (``vision_mlp``, image and video-frame positions), both megatron ``MLP``\\ s sharded over
  tensor parallelism like the dense one; each token goes through the FFN of its modality.
* ``moe.num_experts > 0`` - :class:`megafusion.model.moe.ModalityMoELayer`: megatron-core's
  ``MoELayer`` (router, top-k, load balancing, z-loss, token dispatch: all megatron's),
  optionally with per-modality shared experts, and per-layer, per-modality routing statistics.

Megatron calls ``mlp(hidden_states)`` with hidden states only, so the modality of every
position travels beside it in a :class:`ModalityContext` (:mod:`megafusion.model.routing`),
one per model chunk, set by the model before each decoder forward::

    ctx = ModalityContext()
    mlp = ffn_spec(cfg, transformer_config, ctx)      # the layer spec's `mlp` (megafusion.model.ffn)
    ...
    ctx.set(modality)                                 # [b, s] int64 (sample.TEXT/IMAGE/VIDEO)
    decoder(hidden_states, ...)
    stats = ctx.routing_stats()                       # MoE only; a collective, see moe.py

Each module takes its rank's part of the modality itself: the whole sequence without
sequence parallelism, the TP rank's contiguous chunk ``s / tp`` with it.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule

from megafusion.model.routing import MAX_PENDING, ModalityContext, TokenSplit, model_contexts, tp_rank_size  # noqa: F401

# ModalityContext, TokenSplit and model_contexts live in megafusion.model.routing (importable here too);
# ffn_spec, which picks dense / modality / MoE, lives in megafusion.model.ffn.
__all__ = ["ModalityContext", "ModalityFFN", "TokenSplit", "build_mlp", "fp8_row_multiple", "mlp_submodules",
           "model_contexts", "spec_backend", "tp_rank_size"]


def fp8_row_multiple(config) -> int:
    """The multiple the row count of a Transformer Engine linear's input must be under FP8
    (1 without FP8): TE's FP8 GEMMs reject leading dimensions that are not multiples of 16,
    and of 32 with MXFP8's 32-element block scales."""
    if getattr(config, "fp8", None) is None:
        return 1
    return 32 if getattr(config, "fp8_recipe", None) == "mxfp8" else 16


def build_mlp(config, submodules: MLPSubmodules, ffn_hidden_size: int, tp_group, name: Optional[str]) -> MLP:
    """A megatron MLP of width ``ffn_hidden_size`` (its fc2 reads the width from the config)."""
    if ffn_hidden_size != config.ffn_hidden_size:
        config = copy.deepcopy(config)
        config.ffn_hidden_size = ffn_hidden_size
    return MLP(config=config, submodules=submodules, ffn_hidden_size=ffn_hidden_size, tp_group=tp_group, name=name)


class ModalityFFN(MegatronModule):
    """Separate text and vision FFNs; each token runs through the FFN of its modality.

    Built by megatron's TransformerLayer as ``mlp(config=..., pg_collection=..., is_mtp_layer=...,
    name=...)`` with ``submodules`` and ``ctx`` bound by :func:`ffn_spec`. Parameters live in
    ``text_mlp`` and ``vision_mlp`` (megatron ``MLP``\\ s: column/row-parallel over TP with the
    usual ``tensor_model_parallel`` attributes and sharded_state_dict keys
    ``<prefix>text_mlp.linear_fc1.weight`` etc.).

    Forward: hidden [s_local, b, h] -> (output [s_local, b, h], None). Each FFN receives its
    modality's tokens as [rows, 1, h] (zero rows appended up to :class:`TokenSplit` ``*_rows``
    so that sequence parallelism's gather/scatter sees equal shapes on all TP ranks); its
    outputs are scattered back into place. Biases are added per token (the two FFNs have
    different ones), so the returned bias is always None.

    Under FP8 the rows are further padded with zeros to ``row_multiple`` (16; 32 for MXFP8,
    :func:`fp8_row_multiple`; ``row_multiple`` overrides it), which TE's FP8 linears need
    (with sequence parallelism they see ``rows * tp``, a multiple as well); the padding is
    dropped from the output.
    """

    def __init__(self, config, submodules: MLPSubmodules, ctx: ModalityContext, pg_collection=None,
                 is_mtp_layer: bool = False, name: Optional[str] = None, ffn_hidden_size: Optional[int] = None,
                 row_multiple: Optional[int] = None):
        super().__init__(config=config)
        self.ctx = ctx
        self.row_multiple = row_multiple or fp8_row_multiple(config)
        if pg_collection is not None:
            self.tp_group = pg_collection.tp
        else:
            from megatron.core import parallel_state

            self.tp_group = parallel_state.get_tensor_model_parallel_group()
        width = ffn_hidden_size or config.ffn_hidden_size
        prefix = f"{name}." if name else ""
        self.text_mlp = build_mlp(config, submodules, width, self.tp_group, prefix + "text_mlp")
        self.vision_mlp = build_mlp(config, submodules, width, self.tp_group, prefix + "vision_mlp")

    def forward(self, hidden_states: torch.Tensor, padding_mask=None, **_unused):
        s_local, b, h = hidden_states.shape
        tp_rank, tp_size = tp_rank_size(self.tp_group)
        split = self.ctx.split(hidden_states.shape, tp_rank, tp_size)
        flat = hidden_states.reshape(s_local * b, h)
        out = torch.zeros_like(flat)
        for mlp, idx, rows in ((self.text_mlp, split.text_idx, split.text_rows),
                               (self.vision_mlp, split.vision_idx, split.vision_rows)):
            x = flat.index_select(0, idx)
            rows = -(-rows // self.row_multiple) * self.row_multiple  # FP8: a multiple of 16 (32 for MXFP8)
            x = F.pad(x, (0, 0, 0, rows - idx.numel()))  # zero rows: equal shapes across TP ranks
            y, bias = mlp(x.unsqueeze(1))
            y = y.squeeze(1)[: idx.numel()]
            if bias is not None:
                y = y + bias
            out = out.index_copy(0, idx, y)
        return out.view(s_local, b, h), None


# --------------------------------------------------------------------------- spec


def spec_backend(spec: str):
    """megatron's module provider of ``model.spec``: TE's (``te``) or the local one."""
    if spec == "te":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    from megatron.core.models.backends import LocalSpecProvider

    return LocalSpecProvider()


def mlp_submodules(spec: str) -> MLPSubmodules:
    """Unfused column/row-parallel linears (the layer's pre_mlp_layernorm does the norm)."""
    backend = spec_backend(spec)
    return MLPSubmodules(linear_fc1=backend.column_parallel_linear(), linear_fc2=backend.row_parallel_linear())
