"""Layout-independent weight initialisation.

megatron-core draws initial weights from per-rank random streams, so a TP2 or PP2 run
starts from different weights than a single-process run and their losses can't be
compared. Here every weight is drawn from a generator seeded by its *global* checkpoint
key (``decoder.layers.mlp.linear_fc1.weight``, with the layer and expert axes that
sharded checkpoints use) and each rank keeps its own slice: any (TP, PP, EP, DP) layout
starts from the same model. The cost is building each global tensor once at start-up.
"""

from __future__ import annotations

import math
import zlib

import torch

# Output projections of each residual branch get a depth-scaled std (GPT-2 / megatron).
_SCALED_SUFFIXES = ("linear_proj.weight", "linear_fc2.weight")


def _leaf_sharded_tensors(sharded_state_dict):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for value in sharded_state_dict.values():
        if isinstance(value, ShardedTensor):
            yield value
        elif isinstance(value, ShardedTensorFactory):
            built = value.build()
            yield from _leaf_sharded_tensors(built if isinstance(built, dict) else {"_": built})
        elif isinstance(value, dict):
            yield from _leaf_sharded_tensors(value)
        elif isinstance(value, (list, tuple)):
            yield from _leaf_sharded_tensors(dict(enumerate(value)))


@torch.no_grad()
def init_weights(model: torch.nn.Module, seed: int, std: float, num_layers: int,
                 std_of: dict[str, float] | None = None) -> None:
    """Re-initialises every matrix of ``model`` (a megatron module) independently of layout.

    Vectors (norm scales, biases) keep the values their modules were built with.
    ``std_of``: {checkpoint key suffix: std} for matrices drawn at a std of their own.
    """
    for sh in _leaf_sharded_tensors(model.sharded_state_dict()):
        local = sh.data
        if local is None or local.dim() < 2 or not local.is_floating_point():
            continue
        # Axes prepended for checkpointing (global layer index, expert index) are not in the
        # local tensor: they pick the generator, and the rest of the global shape is drawn.
        n = sh.prepend_axis_num
        name = f"{sh.key}@{sh.global_offset[:n]}"
        generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
        scale = std / math.sqrt(2.0 * num_layers) if sh.key.endswith(_SCALED_SUFFIXES) else std
        scale = next((v for suffix, v in (std_of or {}).items() if sh.key.endswith(suffix)), scale)
        full = torch.randn(sh.global_shape[n:], generator=generator, dtype=torch.float32) * scale
        piece = full[tuple(slice(off, off + size) for off, size in zip(sh.global_offset[n:], sh.local_shape))]
        if sh.flattened_range is not None:
            piece = piece.flatten()[sh.flattened_range]
        local.copy_(piece.reshape(local.shape).to(local.dtype))
        # FP8 weights (train.fp8_params) keep TE's first random draw in high precision, and
        # megatron seeds the optimizer's master weights from it: give it our values too.
        hp = local.get_high_precision_init_val() if hasattr(local, "get_high_precision_init_val") else None
        if hp is not None and hp.numel() == piece.numel():
            hp.copy_(piece.reshape(hp.shape).to(hp.dtype))
