"""``model.moe.dispatch: triton | megatron`` - who permutes tokens inside megatron-core's MoE layer.

megatron-core's token dispatchers (``MoEAllGatherTokenDispatcher``, ``MoEAlltoAllTokenDispatcher``)
group tokens by expert with ``moe_utils.permute`` / ``unpermute`` (argsort + index_select +
scatter_add, or Transformer Engine when ``moe_permute_fusion``). ``dispatch: triton`` swaps in
``megafusion_kernels.moe_dispatch`` for exactly those two calls and keeps everything else of the
dispatcher: communication (all-gather / all-to-all, EP and TP), the sort of chunks between local
experts after the all-to-all, capacity dropping, shared-expert overlap, where the routing weights
are applied (megatron multiplies them inside the experts, so our unpermute sums unweighted).

How it is selected - through the layer spec, in one place:

    from megafusion.model.moe_dispatch import with_moe_dispatch
    moe = cfg.model.moe
    layer_spec = with_moe_dispatch(layer_spec, moe.dispatch, moe.experts)  # triton|megatron, grouped|megatron

With dispatch triton, ``with_moe_dispatch`` replaces the layer's ``MoELayer`` builder by
``TritonDispatchMoELayer``, an ``MoELayer`` whose token dispatcher is the Triton subclass of the
dispatcher megatron would have built (``TransformerConfig.moe_token_dispatcher_type``: allgather
or alltoall); with dispatch megatron by ``ProfiledMoELayer`` (megatron's dispatcher, profiled).
Why this way:

* no global patch: megatron's modules stay untouched, a model can mix both paths, tests can
  build both side by side in one process;
* megatron picks the dispatcher class inside ``MoELayer.__init__`` (no spec hook), so the layer
  subclass re-creates it after ``__init__``; the dispatcher subclasses override only the
  methods that call permute/unpermute. Those overrides mirror megatron-core 0.19.2 line by line,
  so they refuse other versions (``SUPPORTED_MEGATRON_CORE``);
* a model with its own ``MoELayer`` subclass calls ``install_triton_dispatcher(layer)`` instead.

Profiling: :func:`profile_dispatch` wraps every token dispatch and combine step of a
dispatcher (permute, all-to-all / all-gather, unpermute, and megatron's own versions of them)
in ``torch.profiler.record_function("megafusion.moe_dispatch")`` (:data:`DISPATCH_RANGE`);
``TritonDispatchMoELayer`` and ``megafusion.model.moe.ModalityMoELayer`` apply it to their
dispatcher, whichever ``dispatch`` they use. The ranges cover the forward calls; autograd
links the backward ops to them through their sequence numbers.

``with_moe_dispatch(layer_spec, dispatch, experts)`` also picks the routed experts module
(``model.moe.experts``: megatron's, or ``grouped`` = :class:`megafusion.model.grouped_experts.GroupedExperts`).

Supported: dropless routing and capacity dropping without padding. Not supported (clear error):
``moe_pad_expert_input_to_capacity``, ``moe_router_padding_for_quantization`` (a token may then
hold more rows than top-k), ``moe_permute_fusion`` (that is Transformer Engine's fused path) and
the ``flex`` dispatcher.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Optional

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher,
)
from megatron.core.transformer.spec_utils import ModuleSpec

from megafusion_kernels.moe_dispatch import moe_permute, moe_unpermute, permute_probs

__all__ = [
    "DISPATCH_CHOICES",
    "DISPATCH_RANGE",
    "ProfiledMoELayer",
    "SUPPORTED_MEGATRON_CORE",
    "TritonAllGatherTokenDispatcher",
    "TritonAlltoAllTokenDispatcher",
    "TritonDispatchMoELayer",
    "grouped_experts_submodules",
    "install_triton_dispatcher",
    "profile_dispatch",
    "routing_map_to_topk",
    "with_moe_dispatch",
]

DISPATCH_CHOICES = ("megatron", "triton")
SUPPORTED_MEGATRON_CORE = "0.19.2"
DISPATCH_RANGE = "megafusion.moe_dispatch"
# the token dispatcher's steps between the router and the experts, and back
_DISPATCH_STEPS = ("dispatch_preprocess", "token_dispatch", "dispatch_postprocess",
                   "combine_preprocess", "token_combine", "combine_postprocess")


def profile_dispatch(dispatcher) -> None:
    """Runs each dispatch / combine step of a token dispatcher inside the profiler range DISPATCH_RANGE.

    Works on any megatron ``MoETokenDispatcher`` (ours or megatron's): the instance's step
    methods are wrapped, the class is untouched; applying it twice wraps once.
    """
    for step in _DISPATCH_STEPS:
        method = getattr(dispatcher, step)
        if getattr(method, "_megafusion_profiled", False):
            continue

        @functools.wraps(method)
        def ranged(*args, _method=method, **kwargs):
            with torch.profiler.record_function(DISPATCH_RANGE):
                return _method(*args, **kwargs)

        ranged._megafusion_profiled = True
        setattr(dispatcher, step, ranged)


def routing_map_to_topk(routing_map: torch.Tensor, probs: torch.Tensor, topk: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """megatron's dense routing -> per-slot routing.

    Args:
        routing_map: [T, E] bool, at most ``topk`` True per row.
        probs: [T, E] routing weights (differentiable).
        topk: slots per token.

    Returns:
        topk_idx [T, topk] int64: a token's experts in ascending order, then -1 for empty slots;
        topk_probs [T, topk]: probs at those experts (0 for empty slots), differentiable.
    """
    num_experts = routing_map.shape[1]
    topk = min(topk, num_experts)
    expert_ids = torch.arange(num_experts, device=routing_map.device)
    # smallest ids first; unselected experts carry the sentinel E and sort last
    keyed = torch.where(routing_map, expert_ids, num_experts)
    topk_idx = torch.topk(keyed, topk, dim=1, largest=False, sorted=True).values
    topk_idx = torch.where(topk_idx < num_experts, topk_idx, -1)
    topk_probs = probs.gather(1, topk_idx.clamp(min=0)) * (topk_idx >= 0)
    return topk_idx, topk_probs


def installed_megatron_version() -> str:
    """``megatron.core.__version__`` (e.g. '0.19.2+f6a5b40'), as the CPU layer reads it: a
    megatron-core on ``PYTHONPATH`` without its dist-info has no ``importlib.metadata``
    version, so that lookup would fail where the package itself imports fine."""
    import megatron.core

    return str(megatron.core.__version__)


def _check_supported(config) -> None:
    installed = installed_megatron_version()
    if installed.split("+", 1)[0] != SUPPORTED_MEGATRON_CORE:  # a local build suffix is ignored
        raise RuntimeError(
            f"model.moe.dispatch = triton mirrors megatron-core {SUPPORTED_MEGATRON_CORE}'s token dispatchers "
            f"but megatron-core {installed} is installed; install megatron-core=={SUPPORTED_MEGATRON_CORE} "
            f"or use model.moe.dispatch = megatron")
    unsupported = {
        "moe_pad_expert_input_to_capacity": "padding to capacity",
        "moe_router_padding_for_quantization": "router padding for quantization",
        "moe_permute_fusion": "Transformer Engine's fused permute",
    }
    for field, what in unsupported.items():
        if getattr(config, field, False):
            raise ValueError(f"model.moe.dispatch = triton does not support {what} "
                             f"(TransformerConfig.{field} = True); set it False or use model.moe.dispatch = megatron")


class TritonAllGatherTokenDispatcher(MoEAllGatherTokenDispatcher):
    """All-gather dispatcher whose local permute/unpermute run the Triton kernels."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _check_supported(self.config)
        self._perm_state = None

    def dispatch_postprocess(self, hidden_states, probs):
        """Keep the gathered tokens routed to this rank's experts, grouped by local expert."""
        self.hidden_shape_before_permute = hidden_states.shape
        first, last = self.local_expert_indices[0], self.local_expert_indices[-1] + 1
        topk_idx, topk_probs = routing_map_to_topk(self.routing_map[:, first:last], probs[:, first:last],
                                                   self.router_topk)
        permuted, tokens_per_expert, self._perm_state = moe_permute(hidden_states, topk_idx, last - first)
        # same order as megatron's masked_select over the transposed local map
        self.local_probs = permute_probs(topk_probs, self._perm_state)
        self.routing_map = None
        return permuted, tokens_per_expert.cpu(), self.local_probs

    def combine_preprocess(self, hidden_states):
        """Sum each token's expert rows (weights were applied inside the experts)."""
        out = moe_unpermute(hidden_states, self._perm_state)
        self._perm_state = None
        return out


class TritonAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """All-to-all dispatcher whose permutation 1 (tokens -> all-to-all order) runs the Triton kernels.

    Permutation 2 (chunks of the received tokens sorted by local expert) stays megatron's
    ``sort_chunks_by_idxs``: it moves whole contiguous chunks, not token rows.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _check_supported(self.config)
        self._perm_state = None

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        """megatron-core 0.19.2's dispatch_preprocess with its ``permute`` replaced by ``moe_permute``."""
        self.hidden_shape = hidden_states.shape
        self.probs = probs
        self.routing_map = routing_map
        assert probs.dim() == 2, "Expected 2D tensor for probs"
        assert routing_map.dim() == 2 and routing_map.dtype == torch.bool, "Expected a 2D bool routing map"
        hidden_states = hidden_states.view(-1, self.hidden_shape[-1])
        self.tokens_per_expert = self.preprocess(self.routing_map)
        if self.shared_experts is not None:
            self.shared_experts.pre_forward_comm(hidden_states.view(self.hidden_shape))
        self.tokens_per_expert = self._maybe_dtoh_and_synchronize("before_permutation_1", self.tokens_per_expert)
        self.hidden_shape_before_permute = hidden_states.shape
        topk_idx, topk_probs = routing_map_to_topk(routing_map, probs, self.config.moe_router_topk)
        # num_out_tokens is host-side here (an int when dropless, synced above when dropping)
        permuted, _, self._perm_state = moe_permute(hidden_states, topk_idx, self.num_experts,
                                                    num_out_rows=int(self.num_out_tokens))
        return permuted, permute_probs(topk_probs, self._perm_state)

    def combine_postprocess(self, permutated_local_input_tokens):
        """megatron-core 0.19.2's combine_postprocess with ``unpermute`` replaced by ``moe_unpermute``."""
        output = moe_unpermute(permutated_local_input_tokens, self._perm_state)
        self._perm_state = None
        output = output.view(self.hidden_shape)
        if self.shared_experts is not None:
            output += self.shared_experts.get_output()
        return output


_TRITON_DISPATCHERS = {
    "allgather": TritonAllGatherTokenDispatcher,
    "alltoall": TritonAlltoAllTokenDispatcher,
}


def install_triton_dispatcher(layer: MoELayer, pg_collection=None) -> None:
    """Give a built MoELayer (or subclass) the Triton version of its token dispatcher.

    Args:
        layer: an ``MoELayer`` after its ``__init__``.
        pg_collection: the process groups the layer was built with (None: megatron's defaults).
    """
    kind = layer.config.moe_token_dispatcher_type
    if kind not in _TRITON_DISPATCHERS:
        raise ValueError(f"model.moe.dispatch = triton supports the dispatchers {sorted(_TRITON_DISPATCHERS)}, "
                         f"not moe_token_dispatcher_type = {kind!r}; use model.moe.dispatch = megatron")
    if pg_collection is None:
        from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

        pg_collection = get_default_pg_collection()
    layer.token_dispatcher = _TRITON_DISPATCHERS[kind](
        layer.num_local_experts, layer.local_expert_indices, config=layer.config, pg_collection=pg_collection)
    if layer.use_shared_expert and layer.shared_expert_overlap:
        layer.token_dispatcher.set_shared_experts(layer.shared_experts)
    profile_dispatch(layer.token_dispatcher)


class ProfiledMoELayer(MoELayer):
    """megatron-core's MoELayer whose token dispatch runs in the profiler range DISPATCH_RANGE."""

    def __init__(self, config, submodules=None, layer_number: Optional[int] = None, pg_collection=None,
                 is_mtp_layer: bool = False, name: Optional[str] = None):
        super().__init__(config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection,
                         is_mtp_layer=is_mtp_layer, name=name)
        self.set_up_dispatcher(pg_collection)

    def set_up_dispatcher(self, pg_collection) -> None:
        profile_dispatch(self.token_dispatcher)


class TritonDispatchMoELayer(ProfiledMoELayer):
    """megatron-core's MoELayer with ``install_triton_dispatcher`` applied (same arguments)."""

    def set_up_dispatcher(self, pg_collection) -> None:
        install_triton_dispatcher(self, pg_collection)  # profiles the dispatcher it installs


def grouped_experts_submodules(submodules):
    """MoESubmodules with the routed experts built as GroupedExperts (``model.moe.experts = grouped``)."""
    from megafusion.model.grouped_experts import GroupedExperts

    return replace(submodules, experts=GroupedExperts)


def _swap_moe_builder(mlp, dispatch: str, experts: str):
    """partial(MoELayer, ...) or ModuleSpec(module=MoELayer, ...) -> the same with our choices."""
    layer_cls = TritonDispatchMoELayer if dispatch == "triton" else ProfiledMoELayer
    if isinstance(mlp, functools.partial) and mlp.func is MoELayer:
        keywords = dict(mlp.keywords)
        if experts == "grouped":
            keywords["submodules"] = grouped_experts_submodules(keywords["submodules"])
        return functools.partial(layer_cls, *mlp.args, **keywords)
    if isinstance(mlp, ModuleSpec) and mlp.module is MoELayer:
        sub = grouped_experts_submodules(mlp.submodules) if experts == "grouped" else mlp.submodules
        return replace(mlp, module=layer_cls, submodules=sub)
    raise ValueError(f"model.moe.dispatch = {dispatch} / model.moe.experts = {experts} need the layer spec's mlp to "
                     f"build megatron's MoELayer, got {mlp!r}; a custom MoELayer subclass should call "
                     "megafusion.model.moe_dispatch.install_triton_dispatcher / grouped_experts_submodules")


def with_moe_dispatch(layer_spec, dispatch: str, experts: str = "megatron"):
    """The layer spec with its MoE token dispatch and routed experts chosen by the config.

    Args:
        layer_spec: a ``ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules)``
            or the ``TransformerLayerSubmodules`` themselves (returned as the same kind).
        dispatch: ``model.moe.dispatch``, "megatron" or "triton".
        experts: ``model.moe.experts``, "megatron" or "grouped".

    The MoE layer becomes ``TritonDispatchMoELayer`` (dispatch triton) or ``ProfiledMoELayer``
    (megatron's dispatch); both run their token dispatch in the profiler range DISPATCH_RANGE.
    """
    from megafusion.model.grouped_experts import EXPERTS_CHOICES

    if dispatch not in DISPATCH_CHOICES:
        raise ValueError(f"model.moe.dispatch = {dispatch!r} is not one of {DISPATCH_CHOICES}")
    if experts not in EXPERTS_CHOICES:
        raise ValueError(f"model.moe.experts = {experts!r} is not one of {EXPERTS_CHOICES}")
    if isinstance(layer_spec, ModuleSpec):
        return replace(layer_spec, submodules=with_moe_dispatch(layer_spec.submodules, dispatch, experts))
    return replace(layer_spec, mlp=_swap_moe_builder(layer_spec.mlp, dispatch, experts))
