"""Core-attention backends for the Transfusion layers, as megatron-core modules.

Each backend implements the hybrid rule of ``megafusion.model.mask`` (documents isolated,
text causal, image/frame spans bidirectional) from the ``doc_ids``/``span_ids`` carried by
a ``HybridMaskInfo``:

- ``sdpa``: ``F.scaled_dot_product_attention`` with a dense boolean mask; the reference.
- ``flex``: ``torch.nn.attention.flex_attention`` with a ``BlockMask`` (fully masked blocks
  are skipped); compiled on GPU by default, eager (unfused, fine for tiny sizes) on CPU.
- ``triton``: ``megafusion.ops.hybrid_attention`` (the span-masked flash kernel).

They plug into megatron-core through the layer spec::

    self_attention=ModuleSpec(module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.arbitrary},
        submodules=SelfAttentionSubmodules(..., core_attention=ATTENTION_BACKENDS["flex"]))

megatron builds them as ``Cls(config, layer_number, attn_mask_type, attention_type,
cp_comm_type=None, softmax_scale=None, pg_collection=None)`` and calls
``forward(query, key, value, attention_mask, ...)`` with q [sq, b, heads_local, d] and
k/v [sk, b, groups_local, d] (grouped-query attention when groups < heads), expecting
[sq, b, heads_local * d]. Tensor parallelism has already split the heads, and sequence
parallelism gathers the sequence before core attention, so a backend always sees whole
sequences and needs no process group. Context parallelism is not supported.
The ``attention_mask`` the model passes reaches the backend unchanged: a
``HybridMaskInfo`` (or its ``as_tensor()`` form when megatron recomputes activations).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megafusion.model.mask import HybridMaskInfo, hybrid_mask

__all__ = ["ATTENTION_BACKENDS", "FlexCoreAttention", "HybridMaskInfo", "SdpaCoreAttention",
           "TritonCoreAttention", "core_attention_class", "hybrid_mask"]


class HybridCoreAttention(MegatronModule):
    """Shared megatron plumbing; subclasses implement ``attend`` on [b, heads, s, d]."""

    #: whether the backend can apply ``config.attention_dropout``
    supports_dropout = False

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type=None,
                 attention_type: str = "self", cp_comm_type: str | None = None,
                 softmax_scale: float | None = None, pg_collection=None,
                 attention_dropout: float | None = None, **unused):
        super().__init__(config=config)
        name = type(self).__name__
        if config.context_parallel_size > 1:
            raise ValueError(f"{name}: context_parallel_size={config.context_parallel_size} is not supported; "
                             "the hybrid backends need the whole sequence (set parallel context parallelism to 1)")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"{name}: softmax_type={config.softmax_type!r} is not supported; use 'vanilla'")
        if getattr(config, "window_size", None) is not None:
            raise ValueError(f"{name}: sliding-window attention (window_size={config.window_size}) is not "
                             "supported by the hybrid mask")
        self.layer_number = layer_number
        self.attention_type = attention_type
        # None: 1/sqrt(head dim), read from the query at call time.
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        if self.dropout_p > 0 and not self.supports_dropout:
            raise ValueError(f"{name}: attention_dropout={self.dropout_p} is not supported by this backend; "
                             "set the transformer config's attention_dropout to 0.0 or use the sdpa backend")

    def scale_for(self, head_dim: int) -> float:
        return self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                attn_mask_type=None, attention_bias=None, packed_seq_params=None, **unused) -> torch.Tensor:
        """q [sq, b, h, d], k/v [sk, b, g, d] (h % g == 0) -> [sq, b, h * d]."""
        if attention_bias is not None:
            raise ValueError(f"{type(self).__name__}: attention_bias is not supported")
        if packed_seq_params is not None:
            raise ValueError(f"{type(self).__name__}: packed_seq_params is not supported; packing is expressed "
                             "by doc_ids in the HybridMaskInfo")
        info = HybridMaskInfo.coerce(attention_mask)
        sq, b, h, d = query.shape
        sk, g = key.shape[0], key.shape[2]
        if h % g:
            raise ValueError(f"{type(self).__name__}: {h} query heads are not a multiple of {g} key/value groups")
        if info.batch_size != b or info.seq_len != sk:
            raise ValueError(f"{type(self).__name__}: mask ids are [B={info.batch_size}, S={info.seq_len}] but "
                             f"keys are [s={sk}, b={b}]; build HybridMaskInfo from the same batch")
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        # Named so that `megafusion bench` can split step time by profiler range.
        with torch.profiler.record_function("megafusion.attention"):
            out = self.attend(q, k, v, info, self.scale_for(d))
        return out.permute(2, 0, 1, 3).reshape(sq, b, h * d)

    def attend(self, q, k, v, info: HybridMaskInfo, scale: float) -> torch.Tensor:
        raise NotImplementedError


class SdpaCoreAttention(HybridCoreAttention):
    """Dense boolean mask + ``F.scaled_dot_product_attention``: the reference backend.
    Materialises a [B, 1, sq, sk] mask (once per forward, shared by all layers)."""

    supports_dropout = True

    def attend(self, q, k, v, info, scale):
        mask = info.dense_mask(q.shape[2], q.device)
        groups = q.shape[1] // k.shape[1]
        if groups > 1 and q.is_cuda:
            # CUDA's masked fused kernel (memory-efficient) has no GQA; repeated heads keep
            # sdpa off its O(N^2)-memory math fallback.
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        dropout_p = self.dropout_p if self.training else 0.0

        def run():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p,
                                                  enable_gqa=q.shape[1] != k.shape[1])

        if dropout_p == 0.0 or self.config.sequence_parallel:
            return run()
        # As megatron's DotProductAttention: without sequence parallelism, dropout draws
        # from the model-parallel RNG stream, since each tensor-parallel rank holds other heads.
        from megatron.core import tensor_parallel

        with tensor_parallel.get_cuda_rng_tracker().fork():
            return run()


@functools.cache
def _compiled_flex_attention():
    """``torch.compile(flex_attention)``, compiled once per process and shared by every layer."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_attention(compile: bool):
    if compile:
        return _compiled_flex_attention()
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


class FlexCoreAttention(HybridCoreAttention):
    """FlexAttention with a ``BlockMask`` built from the ids (shared by all layers).

    ``compile``: None (default) compiles on CUDA and runs eager elsewhere; True/False force
    it (compiled flex on CPU works and matched a float64 reference, but the first call
    compiles for tens of seconds). Pass it through the spec: ``params={"compile": True}``.
    """

    def __init__(self, *args, compile: bool | None = None, block_size: int = 128, **kwargs):
        super().__init__(*args, **kwargs)
        self.compile = compile
        self.block_size = block_size

    def attend(self, q, k, v, info, scale):
        compile = q.is_cuda if self.compile is None else self.compile
        block_mask = info.block_mask(q.shape[2], q.device, compile=compile, block_size=self.block_size)
        # torch's public entry point rejects CPU inputs that require grad, even under no_grad.
        if q.device.type == "cpu" and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _flex_cpu_with_grad(q, k, v, block_mask, scale)
        return _flex_attention(compile)(q, k, v, block_mask=block_mask, scale=scale,
                                        enable_gqa=q.shape[1] != k.shape[1])


def _flex_cpu_with_grad(q, k, v, block_mask, scale):
    """FlexAttention's own eager path, with autograd, on CPU.

    torch's public ``flex_attention`` refuses inputs that require grad on CPU ("does not
    support backward on CPU"), yet the flex higher-order op behind it has an eager CPU
    forward and backward (dense math over the same BlockMask and mask_mod). Calling the op
    directly keeps CPU training and the sdpa-vs-flex gradient tests on the flex code path.
    """
    try:
        from torch._higher_order_ops.flex_attention import flex_attention as flex_attention_hop
        from torch.nn.attention.flex_attention import _apply_kernel_options, _identity

        kernel_options = _apply_kernel_options(q, k, v, False, None, None)
        return flex_attention_hop(q, k, v, _identity, block_mask.as_tuple(), scale, kernel_options)[0]
    except (ImportError, TypeError) as err:  # private API moved in another torch version
        raise RuntimeError(
            f"attention backend 'flex' cannot train on CPU with torch {torch.__version__}: the eager flex op "
            f"is not reachable ({err}); use the 'sdpa' backend on CPU") from err


class TritonCoreAttention(HybridCoreAttention):
    """The span-masked flash-attention kernel ``megafusion.ops.hybrid_attention``
    (training shapes: as many queries as keys)."""

    def attend(self, q, k, v, info, scale):
        try:
            from megafusion.ops import hybrid_attention
        except ImportError as err:
            raise RuntimeError(
                "attention backend 'triton' needs megafusion.ops.hybrid_attention "
                "(kernels/megafusion_kernels/hybrid_attention.py) "
                f"and it failed to import ({err}); use model attention backend 'flex' or 'sdpa'") from err
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"attention backend 'triton' needs as many queries as keys (got {q.shape[2]} vs "
                             f"{k.shape[2]}); decode with a KV cache through 'flex' or 'sdpa'")
        doc, span = info.doc_ids.to(q.device), info.span_ids.to(q.device)
        return hybrid_attention(q.contiguous(), k.contiguous(), v.contiguous(), doc, span, softmax_scale=scale)


ATTENTION_BACKENDS: dict[str, type[HybridCoreAttention]] = {
    "sdpa": SdpaCoreAttention,
    "flex": FlexCoreAttention,
    "triton": TritonCoreAttention,
}


def core_attention_class(name: str) -> type[HybridCoreAttention]:
    """The backend class for a config value, with an error naming the choices."""
    try:
        return ATTENTION_BACKENDS[name]
    except KeyError:
        raise ValueError(f"model attention backend {name!r} is unknown; choose one of "
                         f"{sorted(ATTENTION_BACKENDS)}") from None
