"""The modality of each position, for the FFN modules, and MoE routing statistics.

:class:`ModalityContext` carries the modality of every position of the running micro-batch
beside the hidden states (megatron calls ``mlp(hidden_states)`` with hidden states only), one
per model chunk; :class:`megafusion.model.modality_ffn.ModalityFFN` and
:class:`megafusion.model.moe.ModalityMoELayer` read it, and MoE layers add their routing
counts to it. The statistics computed from those counts (metric keys: see
:mod:`megafusion.model.moe`) live here too, so that both FFN modules import this module and
neither imports the other for them.

    ctx = ModalityContext()
    ...
    ctx.set(modality)                                 # [b, s] int64 (sample.TEXT/IMAGE/VIDEO)
    decoder(hidden_states, ...)
    stats = collect_routing_stats(model_contexts(model_chunks))   # a collective over all ranks
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from megafusion.data.sample import IMAGE, TEXT, VIDEO

__all__ = [
    "MAX_PENDING",
    "ModalityContext",
    "NUM_MODALITIES",
    "TokenSplit",
    "collect_routing_stats",
    "model_contexts",
    "reduce_routing_counts",
    "routing_counts",
    "routing_stats_from_counts",
    "take_routing_counts",
    "tp_rank_size",
]


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
    (``recompute`` - set by :func:`megafusion.model.ffn.ffn_spec` from the TransformerConfig), every :meth:`set`
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
        """Adds [3, E + 1] counts (see :func:`routing_counts`) for a layer."""
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
        return take_routing_counts(self)

    def routing_stats(self, group=None) -> dict[str, float]:
        """Reduces the routing counts over ``group`` (default: all ranks) and turns them into metrics.

        A collective: every rank of ``group`` must call it. See :func:`collect_routing_stats`.
        """
        return collect_routing_stats([self], group=group)


def model_contexts(model) -> list[ModalityContext]:
    """The ModalityContexts the FFN modules of ``model`` read (a module or a list of model chunks,
    DDP-wrapped or not), each once, in module order - what the trainer passes to
    :func:`collect_routing_stats`."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    found: dict[int, ModalityContext] = {}
    for chunk in chunks:
        for module in chunk.modules():
            ctx = getattr(module, "ctx", None)
            if isinstance(ctx, ModalityContext):
                found.setdefault(id(ctx), ctx)
    return list(found.values())


def tp_rank_size(tp_group) -> tuple[int, int]:
    """(rank, size) of this process in ``tp_group`` (default: megatron's tensor-parallel group)."""
    if tp_group is None:
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    return torch.distributed.get_rank(tp_group), torch.distributed.get_world_size(tp_group)


# --------------------------------------------------------------------------- MoE routing statistics


NUM_MODALITIES = 3  # TEXT, IMAGE, VIDEO


def routing_counts(modality: torch.Tensor, routing_map: torch.Tensor) -> torch.Tensor:
    """Per-modality routing counts of one forward.

    Args:
        modality: [T] int64 modality of each routed token.
        routing_map: [T, E] bool, the router's token -> expert assignments.

    Returns:
        [3, E + 1] int64: ``[m, e]`` assignments of modality-m tokens to expert e, ``[m, E]``
        number of modality-m tokens.
    """
    num_tokens, num_experts = routing_map.shape
    if modality.numel() != num_tokens:
        raise ValueError(f"routing map covers {num_tokens} tokens but the modality {modality.numel()}")
    counts = torch.zeros(NUM_MODALITIES, num_experts + 1, dtype=torch.int64, device=routing_map.device)
    counts[:, :num_experts].index_add_(0, modality, routing_map.to(torch.int64))
    counts[:, num_experts] = torch.bincount(modality, minlength=NUM_MODALITIES)[:NUM_MODALITIES]
    return counts


def take_routing_counts(ctx: ModalityContext) -> torch.Tensor:
    """[num_layers, 3, E + 1] int64 counts of this rank since the last take; resets the context.

    Under tensor parallelism without sequence parallelism every TP rank routes the same
    tokens, so only TP rank 0 contributes (the others return zeros) and a plain sum over
    all ranks counts each token once.
    """
    counts = ctx._counts
    ctx._counts = {}
    device = next(iter(counts.values())).device if counts else torch.device("cpu")
    if torch.cuda.is_available() and device.type == "cpu" and _backend_needs_cuda():
        device = torch.device("cuda", torch.cuda.current_device())
    out = torch.zeros(ctx.num_layers, NUM_MODALITIES, ctx.num_experts + 1, dtype=torch.int64, device=device)
    for layer, c in counts.items():
        out[layer] = c.to(device)
    if not ctx.sequence_parallel and _tp_rank() != 0:
        out.zero_()
    return out


def _backend_needs_cuda() -> bool:
    return torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl"


def _tp_rank() -> int:
    if not torch.distributed.is_initialized():
        return 0
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0
    return parallel_state.get_tensor_model_parallel_rank()


def reduce_routing_counts(counts: torch.Tensor, group=None) -> torch.Tensor:
    """Sums counts over ``group`` (default: all ranks) in place; a no-op without torch.distributed."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(counts, group=group)
    return counts


def collect_routing_stats(contexts: Iterable[ModalityContext], group=None) -> dict[str, float]:
    """Takes the counts of all this rank's model chunks, sums them over ``group``, returns metrics.

    A collective over ``group`` (default: every rank): call it on every rank at the same
    step. Returns {} for a model without MoE layers.
    """
    contexts = list(contexts)
    if not contexts or not contexts[0].num_experts:
        return {}
    counts = sum(take_routing_counts(ctx) for ctx in contexts)
    return routing_stats_from_counts(reduce_routing_counts(counts, group).cpu())


def _specialization(vision_share: float, overall: float) -> float:
    """Signed specialization in [-1, 1] of an expert whose assignments are ``vision_share`` vision."""
    if vision_share >= overall:
        return (vision_share - overall) / (1.0 - overall)
    return (vision_share - overall) / overall


def _entropy(p: Iterable[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def routing_stats_from_counts(counts: torch.Tensor) -> dict[str, float]:
    """Metrics from (reduced) counts [num_layers, 3, E + 1]; key definitions in the module docstring."""
    counts = counts.to(torch.float64)
    num_experts = counts.shape[2] - 1
    stats: dict[str, float] = {}
    spec_layers, nmi_layers = [], []
    for layer in range(counts.shape[0]):
        c = counts[layer]
        if c[:, num_experts].sum() == 0:
            continue  # not a MoE layer, or nothing routed
        assign = {"text": c[TEXT, :num_experts], "image": c[IMAGE, :num_experts], "video": c[VIDEO, :num_experts]}
        tokens = {"text": c[TEXT, num_experts], "image": c[IMAGE, num_experts], "video": c[VIDEO, num_experts]}
        assign["vision"] = assign["image"] + assign["video"]
        tokens["vision"] = tokens["image"] + tokens["video"]
        key = f"moe/layer{layer}"
        for m in ("text", "image", "video", "vision"):
            n = float(tokens[m])
            stats[f"{key}/tokens_{m}"] = n
            if n > 0:
                for e in range(num_experts):
                    stats[f"{key}/frac_{m}_tokens_expert{e}"] = float(assign[m][e]) / n
        text_a, vision_a = assign["text"], assign["vision"]
        load = text_a + vision_a
        total = float(load.sum())
        overall = float(vision_a.sum()) / total if total else 0.0
        if not 0.0 < overall < 1.0:
            continue  # specialization needs both modalities
        weighted = 0.0
        for e in range(num_experts):
            if load[e] > 0:
                s = _specialization(float(vision_a[e] / load[e]), overall)
                stats[f"{key}/specialization_expert{e}"] = s
                weighted += float(load[e]) * abs(s)
        stats[f"{key}/specialization"] = weighted / total
        joint = torch.stack([text_a, vision_a]) / total  # [modality, expert]
        h_modality = _entropy([1.0 - overall, overall])
        mutual = sum(float(joint[m, e]) * math.log(float(joint[m, e]) / (float(joint[m].sum()) * float(load[e]) / total))
                     for m in range(2) for e in range(num_experts) if joint[m, e] > 0)
        stats[f"{key}/modality_nmi"] = mutual / h_modality
        spec_layers.append(stats[f"{key}/specialization"])
        nmi_layers.append(stats[f"{key}/modality_nmi"])
    if spec_layers:
        stats["moe/specialization"] = sum(spec_layers) / len(spec_layers)
        stats["moe/modality_nmi"] = sum(nmi_layers) / len(nmi_layers)
    return stats
