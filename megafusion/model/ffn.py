"""Which feed-forward module a Transfusion layer gets, by config (``model.ffn``, ``model.moe``).

* ``ffn: dense`` (no MoE): megatron-core's ``MLP``;
* ``ffn: modality``: :class:`megafusion.model.modality_ffn.ModalityFFN`;
* ``moe.num_experts > 0``: :class:`megafusion.model.moe.ModalityMoELayer` (via :func:`megafusion.model.moe.moe_spec`).

It sits above both ``modality_ffn`` and ``moe`` (the MoE layer uses ModalityFFN for its
per-modality shared experts), so neither of them imports the other's chooser.
"""

from __future__ import annotations

import functools

from megatron.core.transformer.mlp import MLP

from megafusion.model.modality_ffn import ModalityFFN, mlp_submodules
from megafusion.model.moe import moe_spec
from megafusion.model.routing import ModalityContext

__all__ = ["ffn_spec", "recomputes_ffn"]


def recomputes_ffn(transformer_config) -> bool:
    """Whether megatron reruns the layer's mlp inside backward (activation recompute)."""
    granularity = transformer_config.recompute_granularity
    modules = set(transformer_config.recompute_modules or ())
    return granularity == "full" or (granularity == "selective" and bool(modules & {"mlp", "moe", "shared_experts"}))


def ffn_spec(cfg, transformer_config, ctx: ModalityContext):
    """The ``mlp`` submodule builder of the Transfusion TransformerLayer, by config.

    Args:
        cfg: the run's Config (``model.ffn``, ``model.moe``, ``model.spec``).
        transformer_config: megatron's TransformerConfig of the run.
        ctx: the model chunk's ModalityContext (configured here for the run).

    Returns:
        A builder for TransformerLayerSubmodules.mlp, called by megatron as
        ``builder(config=, pg_collection=, is_mtp_layer=, name=)``. Every variant expects a
        normalised input: the layer spec must keep a real ``pre_mlp_layernorm`` (the ``te``
        spec's fused norm+fc1 is not used here).
    """
    m, moe = cfg.model, cfg.model.moe
    ctx.num_layers = transformer_config.num_layers
    ctx.num_experts = moe.num_experts
    ctx.sequence_parallel = bool(transformer_config.sequence_parallel)
    ctx.recompute = recomputes_ffn(transformer_config)
    submodules = mlp_submodules(m.spec)
    if moe.num_experts:
        if m.ffn == "modality":
            raise ValueError("model.ffn = modality cannot be combined with model.moe.num_experts > 0; for "
                             "modality-specific weights in a MoE model set model.ffn = dense and "
                             "model.moe.per_modality_shared_experts = true")
        return moe_spec(cfg, transformer_config, ctx, submodules)
    if m.ffn == "modality":
        return functools.partial(ModalityFFN, submodules=submodules, ctx=ctx)
    if m.ffn == "dense":
        return functools.partial(MLP.as_mlp_submodule, submodules=submodules,
                                 ffn_hidden_size=transformer_config.ffn_hidden_size)
    raise ValueError(f"model.ffn = {m.ffn!r} is not one of ('dense', 'modality')")
