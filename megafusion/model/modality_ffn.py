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
position travels beside it in a :class:`ModalityContext`, one per model chunk, set by the
model before each decoder forward::

    ctx = ModalityContext()
    mlp = ffn_spec(cfg, transformer_config, ctx)      # the layer spec's `mlp`
    ...
    ctx.set(modality)                                 # [b, s] int64 (sample.TEXT/IMAGE/VIDEO)
    decoder(hidden_states, ...)
    stats = ctx.routing_stats()                       # MoE only; a collective, see moe.py

Each module takes its rank's part of the modality itself: the whole sequence without
sequence parallelism, the TP rank's contiguous chunk ``s / tp`` with it.
"""

from __future__ import annotations

import collections
import copy
import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule

from megafusion.data.sample import TEXT

__all__ = ["ModalityContext", "ModalityFFN", "TokenSplit", "ffn_spec", "mlp_submodules", "model_contexts"]


MAX_PENDING = 1024  # micro-batches in flight between forward and backward; more means a leak


@dataclass
class TokenSplit:
    """Which of this rank's tokens are text and which vision, for one micro-batch.

    Token index = ``s_local_index * b + batch_index`` (the order of ``hidden.view(-1, h)``).

    - ``modality`` [s_local * b] int64: the modality of each local token.
    - ``text_idx`` / ``vision_idx`` [n] int64: indices of the local text / vision tokens.
    - ``text_rows`` / ``vision_rows``: rows each FFN runs on: the most tokens of that modality
      on any TP rank of the sequence-parallel group (at least 1), so that the FFN's sequence
      all-gather / reduce-scatter sees equal shapes on every rank. Extra rows are zeros.
    """

    modality: torch.Tensor
    text_idx: torch.Tensor
    vision_idx: torch.Tensor
    text_rows: int
    vision_rows: int


class ModalityContext:
    """The modality of each position of the micro-batch being run, for the FFN modules.

    One per model chunk (virtual pipeline stage). The model calls :meth:`set` before each
    decoder forward; the FFN modules of every layer read it. MoE layers also accumulate
    their routing counts here (see :mod:`megafusion.model.moe`).

    Activation recompute: a layer recomputed inside backward must see the modality of the
    micro-batch being back-propagated, not of the last one set (under pipeline parallelism
    1F1B runs later forwards before earlier backwards). When the run recomputes the FFN
    (``recompute`` - set by :func:`ffn_spec` from the TransformerConfig), every :meth:`set`
    made with gradients enabled queues its modality; each backward (one autograd graph task
    per micro-batch and model chunk, in forward order - megatron's schedules) takes the next
    one for all recomputes inside it.
    """

    def __init__(self) -> None:
        self._modality: Optional[torch.Tensor] = None
        self._splits: dict[tuple, TokenSplit] = {}
        self.recompute: bool = False  # whether layers recompute the FFN in backward (ffn_spec sets it)
        self._pending: collections.deque[torch.Tensor] = collections.deque()  # awaiting their backward
        self._backward_task: Optional[int] = None
        self._backward_modality: Optional[torch.Tensor] = None
        self._backward_splits: dict[tuple, TokenSplit] = {}
        self.recording: bool = True  # whether MoE layers add to the routing counts
        self.num_layers: int = 0  # set by ffn_spec (global layer count)
        self.num_experts: int = 0
        self.sequence_parallel: bool = False
        self._counts: dict[int, torch.Tensor] = {}  # layer index (0-based) -> [3, E + 1] int64

    def set(self, modality: torch.Tensor, will_backward: Optional[bool] = None) -> None:
        """Sets the modality of the next forward.

        Args:
            modality: [b, s] int64, ``TEXT``/``IMAGE``/``VIDEO`` per position, for the whole
                sequence this rank's decoder runs (before any sequence-parallel split), on the
                model's device.
            will_backward: whether a backward of this forward follows (default: whether
                gradients are enabled). Only read when the FFN is recomputed; pass False for a
                forward-only pass run with gradients enabled.
        """
        if modality.dim() != 2:
            raise ValueError(f"ModalityContext.set expects modality [b, s], got shape {tuple(modality.shape)}")
        self._modality = modality.long()
        self._splits = {}
        if self.recompute and (torch.is_grad_enabled() if will_backward is None else will_backward):
            if len(self._pending) >= MAX_PENDING:
                raise RuntimeError(f"{MAX_PENDING} modalities are queued for recompute but no backward took them: "
                                   "call ctx.set(modality, will_backward=False) (or run under torch.no_grad()) "
                                   "for forwards that are not back-propagated")
            self._pending.append(self._modality)

    def clear(self) -> None:
        """Forgets the modality and any queued for recompute (e.g. after an interrupted step)."""
        self._modality = None
        self._splits = {}
        self._pending.clear()
        self._backward_task = self._backward_modality = None
        self._backward_splits = {}

    def local_modality(self, hidden_shape: torch.Size, tp_rank: int, tp_size: int) -> torch.Tensor:
        """[s_local * b] int64: the modality of the rows of ``hidden.view(-1, h)``."""
        return self.split(hidden_shape, tp_rank, tp_size).modality

    def split(self, hidden_shape: torch.Size, tp_rank: int, tp_size: int) -> TokenSplit:
        """The text/vision split of this rank's tokens (cached until the next :meth:`set`).

        Args:
            hidden_shape: the FFN input's shape [s_local, b, h].
            tp_rank, tp_size: this rank's place in the tensor-parallel group (its sequence
                chunk under sequence parallelism).
        """
        modality, cache = self._active()
        key = (tuple(hidden_shape[:2]), tp_rank, tp_size)
        if key not in cache:
            cache[key] = self._build_split(modality, hidden_shape, tp_rank, tp_size)
        return cache[key]

    def _active(self) -> tuple[torch.Tensor, dict]:
        """The modality of the running forward (or recompute) and its split cache."""
        task = torch._C._current_graph_task_id()
        if task == -1 or not self.recompute:  # an ordinary forward
            if self._modality is None:
                raise RuntimeError("a modality-aware FFN ran before ModalityContext.set(modality): the model must "
                                   "call ctx.set(modality [b, s]) before each decoder forward")
            return self._modality, self._splits
        if task != self._backward_task:  # the first recompute of a new micro-batch's backward
            if not self._pending:
                raise RuntimeError("an FFN recompute in backward found no queued modality: ctx.set(modality) must run "
                                   "with gradients enabled (or will_backward=True) before each forward that is "
                                   "back-propagated")
            self._backward_task = task
            self._backward_modality = self._pending.popleft()
            self._backward_splits = {}
        return self._backward_modality, self._backward_splits

    def _build_split(self, modality: torch.Tensor, hidden_shape, tp_rank: int, tp_size: int) -> TokenSplit:
        s_local, b = hidden_shape[0], hidden_shape[1]
        mod = modality.t()  # [s, b], the hidden states' order
        s = mod.shape[0]
        if mod.shape[1] != b:
            raise ValueError(f"ModalityContext holds modality for batch {mod.shape[1]} but the FFN got batch {b}")
        if s == s_local:
            chunks = mod.unsqueeze(0)  # no sequence split: every TP rank holds the same tokens
            mine = 0
        elif self.sequence_parallel and s == s_local * tp_size:
            chunks = mod.reshape(tp_size, s_local, b)
            mine = tp_rank
        else:
            raise ValueError(f"ModalityContext holds a sequence of {s} positions but the FFN got {s_local} "
                             f"(tp={tp_size}, sequence_parallel={self.sequence_parallel}); set the modality of "
                             "the whole sequence this rank's decoder runs")
        is_vision = (chunks != TEXT).reshape(chunks.shape[0], -1)  # [chunks, s_local * b]
        # one host sync per micro-batch (cached): the row counts fix the FFN input shapes
        vision_per_chunk = is_vision.sum(1).tolist()
        tokens = s_local * b
        vision = is_vision[mine]
        return TokenSplit(
            modality=chunks[mine].reshape(-1),
            text_idx=(~vision).nonzero().squeeze(1),
            vision_idx=vision.nonzero().squeeze(1),
            text_rows=max(1, max(tokens - n for n in vision_per_chunk)),
            vision_rows=max(1, max(vision_per_chunk)),
        )

    # ---- MoE routing counts (filled by megafusion.model.moe.ModalityMoELayer)

    def add_routing_counts(self, layer_index: int, counts: torch.Tensor) -> None:
        """Adds [3, E + 1] counts (see :func:`megafusion.model.moe.routing_counts`) for a layer."""
        if layer_index in self._counts:
            self._counts[layer_index] += counts
        else:
            self._counts[layer_index] = counts.clone()

    def take_routing_counts(self) -> torch.Tensor:
        """[num_layers, 3, E + 1] int64 routing counts of this rank since the last take (then reset).

        ``[l, m, e]`` for e < E: assignments of modality-m tokens to expert e in layer l;
        ``[l, m, E]``: modality-m tokens routed in layer l. Layers this chunk does not hold
        are zeros, so the tensors of all ranks and chunks can simply be summed.
        """
        from megafusion.model.moe import take_routing_counts

        return take_routing_counts(self)

    def routing_stats(self, group=None) -> dict[str, float]:
        """Reduces the routing counts over ``group`` (default: all ranks) and turns them into metrics.

        A collective: every rank of ``group`` must call it. See :func:`megafusion.model.moe.collect_routing_stats`.
        """
        from megafusion.model.moe import collect_routing_stats

        return collect_routing_stats([self], group=group)


def model_contexts(model) -> list[ModalityContext]:
    """The ModalityContexts the FFN modules of ``model`` read (a module or a list of model chunks,
    DDP-wrapped or not), each once, in module order - what the trainer passes to
    :func:`megafusion.model.moe.collect_routing_stats`."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    found: dict[int, ModalityContext] = {}
    for chunk in chunks:
        for module in chunk.modules():
            ctx = getattr(module, "ctx", None)
            if isinstance(ctx, ModalityContext):
                found.setdefault(id(ctx), ctx)
    return list(found.values())


def _tp_rank_size(tp_group) -> tuple[int, int]:
    if tp_group is None:
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    return torch.distributed.get_rank(tp_group), torch.distributed.get_world_size(tp_group)


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
    """

    def __init__(self, config, submodules: MLPSubmodules, ctx: ModalityContext, pg_collection=None,
                 is_mtp_layer: bool = False, name: Optional[str] = None, ffn_hidden_size: Optional[int] = None):
        super().__init__(config=config)
        self.ctx = ctx
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
        tp_rank, tp_size = _tp_rank_size(self.tp_group)
        split = self.ctx.split(hidden_states.shape, tp_rank, tp_size)
        flat = hidden_states.reshape(s_local * b, h)
        out = torch.zeros_like(flat)
        for mlp, idx, rows in ((self.text_mlp, split.text_idx, split.text_rows),
                               (self.vision_mlp, split.vision_idx, split.vision_rows)):
            x = flat.index_select(0, idx)
            x = F.pad(x, (0, 0, 0, rows - idx.numel()))  # zero rows: equal shapes across TP ranks
            y, bias = mlp(x.unsqueeze(1))
            y = y.squeeze(1)[: idx.numel()]
            if bias is not None:
                y = y + bias
            out = out.index_copy(0, idx, y)
        return out.view(s_local, b, h), None


# --------------------------------------------------------------------------- spec


def _backend(spec: str):
    if spec == "te":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    from megatron.core.models.backends import LocalSpecProvider

    return LocalSpecProvider()


def mlp_submodules(spec: str) -> MLPSubmodules:
    """Unfused column/row-parallel linears (the layer's pre_mlp_layernorm does the norm)."""
    backend = _backend(spec)
    return MLPSubmodules(linear_fc1=backend.column_parallel_linear(), linear_fc2=backend.row_parallel_linear())


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
        from megafusion.model.moe import moe_spec

        return moe_spec(cfg, transformer_config, ctx, submodules)
    if m.ffn == "modality":
        return functools.partial(ModalityFFN, submodules=submodules, ctx=ctx)
    if m.ffn == "dense":
        return functools.partial(MLP.as_mlp_submodule, submodules=submodules,
                                 ffn_hidden_size=transformer_config.ffn_hidden_size)
    raise ValueError(f"model.ffn = {m.ffn!r} is not one of ('dense', 'modality')")
