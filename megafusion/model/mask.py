"""The Transfusion attention rule, from per-position document and span ids.

    i sees j  iff  doc_ids[i] == doc_ids[j]
                   and (j <= i or (span_ids[i] >= 0 and span_ids[i] == span_ids[j]))

(packed documents are isolated; text is causal; the patches of one image or video frame
see each other bidirectionally; later text sees earlier images.) ``HybridMaskInfo`` is what
the model hands to every layer's core attention: the ids plus lazily built, cached forms
of the mask (a dense boolean mask for ``sdpa``, a FlexAttention ``BlockMask`` for
``flex``), so each form is built once per forward, not once per layer.

No megatron imports here: inference and kernels' tests use this module on its own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch


def hybrid_mask(doc_ids: torch.Tensor, span_ids: torch.Tensor) -> torch.Tensor:
    """[B, N, N] bool, True where query i may attend to key j (see module docstring).

    ``doc_ids`` and ``span_ids`` are [B, N] integer tensors (span -1 = text).
    """
    if doc_ids.shape != span_ids.shape or doc_ids.dim() != 2:
        raise ValueError(f"hybrid_mask: doc_ids {tuple(doc_ids.shape)} and span_ids {tuple(span_ids.shape)} "
                         "must both be [B, N]")
    n = doc_ids.shape[1]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(n, n, dtype=torch.bool, device=doc_ids.device).tril()
    same_span = (span_ids[:, :, None] >= 0) & (span_ids[:, :, None] == span_ids[:, None, :])
    return same_doc & (causal | same_span)


def hybrid_mask_mod(doc_ids: torch.Tensor, span_ids: torch.Tensor, q_offset: int = 0):
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for the rule; query ``q_idx`` is
    sequence position ``q_idx + q_offset`` (``q_offset > 0`` when the queries are the last
    positions of a longer key sequence, as with a KV cache)."""

    def mask_mod(b, h, q_idx, kv_idx):
        qi = q_idx + q_offset
        q_span = span_ids[b, qi]
        same_doc = doc_ids[b, qi] == doc_ids[b, kv_idx]
        same_span = (q_span >= 0) & (q_span == span_ids[b, kv_idx])
        return same_doc & ((kv_idx <= qi) | same_span)

    return mask_mod


@dataclass(eq=False)
class HybridMaskInfo:
    """The ids an attention backend needs, and caches of the masks built from them.

    - ``doc_ids`` [B, S] int64: packed-document id per position (``Sample.doc_ids``).
    - ``span_ids`` [B, S] int64: image/frame span id, -1 for text (``Sample.span_ids``).

    S is the full (key) sequence length. When the queries are fewer than the keys (decoding
    with a KV cache) they are taken to be the *last* ``q_len`` positions.

    megatron's activation recomputation (``recompute_granularity``) saves the attention
    mask with ``save_for_backward``, which only takes tensors: pass ``info.as_tensor()``
    ([2, B, S] int64) then; the backends accept both forms (``HybridMaskInfo.coerce``).
    """

    doc_ids: torch.Tensor
    span_ids: torch.Tensor
    _dense: dict = field(default_factory=dict, init=False, repr=False)
    _block: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.doc_ids.dim() != 2 or self.doc_ids.shape != self.span_ids.shape:
            raise ValueError(f"HybridMaskInfo: doc_ids {tuple(self.doc_ids.shape)} and span_ids "
                             f"{tuple(self.span_ids.shape)} must both be [B, S]")
        if self.doc_ids.is_floating_point() or self.span_ids.is_floating_point():
            raise TypeError("HybridMaskInfo: doc_ids and span_ids must be integer tensors")

    @property
    def batch_size(self) -> int:
        return self.doc_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.doc_ids.shape[1]

    def as_tensor(self) -> torch.Tensor:
        """[2, B, S] int64: doc_ids stacked on span_ids (survives megatron's checkpointing)."""
        return torch.stack([self.doc_ids.long(), self.span_ids.long()])

    @classmethod
    def coerce(cls, mask: "HybridMaskInfo | torch.Tensor | None") -> "HybridMaskInfo":
        """The ``attention_mask`` argument of a core attention, as a ``HybridMaskInfo``."""
        if isinstance(mask, HybridMaskInfo):
            return mask
        if isinstance(mask, torch.Tensor) and mask.dim() == 3 and mask.shape[0] == 2 and not mask.is_floating_point():
            return _from_packed_tensor(mask)
        got = "None" if mask is None else f"{type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}"
        raise TypeError(
            f"the hybrid attention backends need attention_mask = HybridMaskInfo(doc_ids, span_ids) (or its "
            f"as_tensor() form [2, B, S] int64); got {got}. Build it from the Sample in the model's forward.")

    def _ids_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.doc_ids.to(device), self.span_ids.to(device)

    def dense_mask(self, q_len: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """[B, 1, q_len, S] bool (True = may attend), cached per (q_len, device)."""
        q_len = self.seq_len if q_len is None else q_len
        device = torch.device(device) if device is not None else self.doc_ids.device
        key = (q_len, device)
        if key not in self._dense:
            self._check_q_len(q_len)
            doc, span = self._ids_on(device)
            self._dense[key] = hybrid_mask(doc, span)[:, None, self.seq_len - q_len:, :]
        return self._dense[key]

    def block_mask(self, q_len: int | None = None, device: torch.device | str | None = None,
                   compile: bool = False, block_size: int = 128):
        """The FlexAttention ``BlockMask`` for (q_len, S), cached per (q_len, device, block_size).

        ``compile=True`` builds it with a compiled ``create_block_mask`` (GPU, long sequences);
        the eager build materialises a [B, q_len, S] mask once, fine for CPU sizes.
        """
        from torch.nn.attention.flex_attention import create_block_mask

        q_len = self.seq_len if q_len is None else q_len
        device = torch.device(device) if device is not None else self.doc_ids.device
        key = (q_len, device, block_size)
        if key not in self._block:
            self._check_q_len(q_len)
            doc, span = self._ids_on(device)
            mask_mod = hybrid_mask_mod(doc, span, q_offset=self.seq_len - q_len)
            self._block[key] = create_block_mask(mask_mod, self.batch_size, None, q_len, self.seq_len,
                                                 device=device, BLOCK_SIZE=block_size, _compile=compile)
        return self._block[key]

    def _check_q_len(self, q_len: int) -> None:
        if not 0 < q_len <= self.seq_len:
            raise ValueError(f"HybridMaskInfo: {q_len} queries against {self.seq_len} keys; queries must be "
                             "the last q_len <= S positions")


class _PackedIds:
    """The tensor form ``[2, B, S]`` as a cache key. Holding the tensor keeps its storage
    alive, so (storage pointer, offset, shape, stride, version counter, device) identifies its
    content without a device sync: an in-place write bumps the version, and the storage
    cannot be freed and its address reused while the key holds it."""

    __slots__ = ("packed", "key")

    def __init__(self, packed: torch.Tensor) -> None:
        self.packed = packed
        self.key = (packed.untyped_storage().data_ptr(), packed.storage_offset(), tuple(packed.shape),
                    packed.stride(), packed._version, packed.device)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _PackedIds) and self.key == other.key


# One entry, so the 2 * num_layers core-attention calls of a step share one HybridMaskInfo
# (and the masks it caches); the next step's tensor evicts it.
@functools.lru_cache(maxsize=1)
def _info_of(ids: _PackedIds) -> HybridMaskInfo:
    return HybridMaskInfo(ids.packed[0], ids.packed[1])


def _from_packed_tensor(packed: torch.Tensor) -> HybridMaskInfo:
    return _info_of(_PackedIds(packed))
