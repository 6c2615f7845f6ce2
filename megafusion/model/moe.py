"""megatron-core's MoE layer for Transfusion: per-modality shared experts and routing statistics.

:class:`ModalityMoELayer` is megatron-core's ``MoELayer`` (router, top-k, capacity, load
balancing and z-loss, token dispatchers, expert parallelism: all unchanged) with two additions:

* **Per-modality shared experts** (``model.moe.per_modality_shared_experts``): instead of one
  shared expert for every token, ``modality_shared_experts.text_mlp`` runs on text tokens and
  ``modality_shared_experts.vision_mlp`` on image/frame tokens (a
  :class:`~megafusion.model.modality_ffn.ModalityFFN` of width
  ``model.moe.shared_expert_ffn_hidden_size``); its output is added to the routed output.
  Without the flag, ``shared_expert_ffn_hidden_size`` gives megatron's one global shared expert.
* **Routing counts**: each forward adds, per layer, how many (modality, expert) assignments
  the router's ``routing_map`` made (after capacity dropping) and how many tokens of each
  modality it routed, to the model chunk's ModalityContext. Recomputation inside backward
  (activation checkpointing) does not count twice; set ``ctx.recording = False`` to leave
  e.g. evaluation forwards out.

Statistics (:func:`routing_stats_from_counts`), per layer ``L`` (0-based, the index of
``decoder.layers.L``), with vision = image + video:

* ``moe/layer{L}/frac_{m}_tokens_expert{E}``, m in text/image/video/vision: the fraction of
  modality m's tokens routed to expert E (sums to top-k over experts when dropless);
* ``moe/layer{L}/tokens_{m}``: tokens of modality m routed (summed over the reduced ranks);
* ``moe/layer{L}/specialization_expert{E}`` in [-1, 1]: with v_E the vision share of expert
  E's assignments and V the vision share of all the layer's assignments,
  ``(v_E - V) / (1 - V)`` if v_E >= V else ``(v_E - V) / V``: +1 = the expert takes only
  vision tokens, -1 = only text, 0 = the same mix as the layer;
* ``moe/layer{L}/specialization`` in [0, 1]: the assignment-weighted mean of
  ``|specialization_expert|``;
* ``moe/layer{L}/modality_nmi`` in [0, 1]: mutual information between modality (text/vision)
  and expert over the assignments, divided by the modality entropy (1 = the expert tells the
  modality);
* ``moe/specialization``, ``moe/modality_nmi``: means over the layers that have them.
Specialization needs both modalities in the layer's tokens; absent keys mean undefined.

Collecting (the trainer, every ``logging.every`` steps, on every rank, after the step's
micro-batches)::

    from megafusion.model.modality_ffn import model_contexts
    stats = collect_routing_stats(model_contexts(model_chunks))   # a collective over all ranks

It sums the counts over all ranks (data-, expert-, context- and pipeline-parallel ranks
see different tokens or different layers; tensor-parallel ranks count only under sequence
parallelism, otherwise only TP rank 0 contributes), resets them, and returns the floats
for metrics.jsonl / TensorBoard (identical on every rank). The pieces are public for other
reductions: ``take_routing_counts(ctx)`` -> ``reduce_routing_counts(counts, group)`` ->
``routing_stats_from_counts(counts)``.
"""

from __future__ import annotations

import copy
import functools
from typing import Optional

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer

from megafusion.model.modality_ffn import ModalityFFN, spec_backend
from megafusion.model.routing import (  # noqa: F401 (the routing statistics are public here too)
    NUM_MODALITIES, ModalityContext, collect_routing_stats, reduce_routing_counts, routing_counts,
    routing_stats_from_counts, take_routing_counts, tp_rank_size)

__all__ = [
    "ModalityMoELayer",
    "collect_routing_stats",
    "moe_spec",
    "reduce_routing_counts",
    "routing_counts",
    "routing_stats_from_counts",
    "take_routing_counts",
]

class ModalityMoELayer(MoELayer):
    """megatron-core's MoELayer + per-modality shared experts + routing counts (module docstring).

    Same constructor as MoELayer plus keyword-only ``ctx`` (the chunk's ModalityContext),
    ``shared_expert_submodules`` (MLPSubmodules of the shared experts),
    ``per_modality_shared_experts`` and ``dispatch`` ("megatron" | "triton": the permute
    implementation of :mod:`megafusion.model.moe_dispatch`). The routed experts module comes
    with ``submodules.experts`` (``model.moe.experts``: megatron's SequentialMLP / TE grouped
    MLP, or :class:`~megafusion.model.grouped_experts.GroupedExperts`, see :func:`moe_spec`).
    Token dispatch and combine run inside the profiler range ``megafusion.moe_dispatch``.

    Forward: hidden [s_local, b, h] -> (routed + shared output [s_local, b, h], None).
    """

    def __init__(self, config, submodules=None, layer_number: Optional[int] = None, pg_collection=None,
                 is_mtp_layer: bool = False, name: Optional[str] = None, *, ctx: ModalityContext,
                 shared_expert_submodules=None, per_modality_shared_experts: bool = False,
                 dispatch: str = "megatron"):
        if pg_collection is None:
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            pg_collection = get_default_pg_collection()
        shared_width = config.moe_shared_expert_intermediate_size
        moe_config = config
        if per_modality_shared_experts:
            if not shared_width:
                raise ValueError("model.moe.per_modality_shared_experts = true needs "
                                 "model.moe.shared_expert_ffn_hidden_size (the width of each shared expert)")
            if config.moe_shared_expert_overlap:
                raise ValueError("per-modality shared experts do not support moe_shared_expert_overlap")
            # megatron's MoELayer must not build its own global shared expert
            moe_config = copy.copy(config)
            moe_config.moe_shared_expert_intermediate_size = None
        super().__init__(moe_config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection,
                         is_mtp_layer=is_mtp_layer, name=name)
        self.ctx = ctx
        self.modality_shared_experts = None
        if per_modality_shared_experts:
            self.modality_shared_experts = ModalityFFN(
                config, shared_expert_submodules, ctx, pg_collection=pg_collection,
                name=f"{name}.modality_shared_experts" if name else None, ffn_hidden_size=shared_width)
        from megafusion.model.moe_dispatch import install_triton_dispatcher, profile_dispatch

        if dispatch == "triton":
            install_triton_dispatcher(self, pg_collection)
        elif dispatch != "megatron":
            raise ValueError(f"model.moe.dispatch = {dispatch!r} is not one of ('megatron', 'triton')")
        profile_dispatch(self.token_dispatcher)  # profiler range "megafusion.moe_dispatch"

    def route(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        probs, routing_map = super().route(hidden_states, padding_mask)
        # _current_graph_task_id() != -1 inside backward: an activation-checkpoint recompute
        if self.ctx.recording and not self.is_mtp_layer and torch._C._current_graph_task_id() == -1:
            tp_rank, tp_size = tp_rank_size(self.attn_tp_group)
            modality = self.ctx.local_modality(hidden_states.shape, tp_rank, tp_size)
            self.ctx.add_routing_counts(self.layer_number - 1, routing_counts(modality, routing_map.detach()))
        return probs, routing_map

    def forward(self, hidden_states: torch.Tensor, intermediate_tensors=None, padding_mask=None):
        if intermediate_tensors is not None:
            raise NotImplementedError("ModalityMoELayer does not support partial CUDA-graph capture "
                                      "(intermediate_tensors)")
        output, bias = super().forward(hidden_states, padding_mask=padding_mask)
        if self.modality_shared_experts is not None:
            shared, _ = self.modality_shared_experts(hidden_states)
            output = output + shared
        return output, bias


def moe_spec(cfg, transformer_config, ctx: ModalityContext, shared_expert_submodules):
    """The ``mlp`` builder of a MoE Transfusion layer (called by ``megafusion.model.ffn.ffn_spec``)."""
    from megatron.core.transformer.moe.moe_layer import MoESubmodules
    from megatron.core.transformer.moe.shared_experts import SharedExpertMLP

    from megafusion.model.grouped_experts import EXPERTS_CHOICES, GroupedExperts

    moe = cfg.model.moe
    if moe.experts not in EXPERTS_CHOICES:
        raise ValueError(f"model.moe.experts = {moe.experts!r} is not one of {EXPERTS_CHOICES}")
    if moe.experts == "grouped":
        experts = GroupedExperts
    else:
        experts = spec_backend(cfg.model.spec).grouped_mlp_modules(cfg.model.spec == "te")
    submodules = MoESubmodules(
        experts=experts,
        shared_experts=functools.partial(SharedExpertMLP, submodules=shared_expert_submodules))
    return functools.partial(
        ModalityMoELayer, submodules=submodules, ctx=ctx, shared_expert_submodules=shared_expert_submodules,
        per_modality_shared_experts=moe.per_modality_shared_experts, dispatch=moe.dispatch)
