"""The one mapping between megafusion (megatron-core) parameter names and exported names.

Exported names are the keys of the world-size-1 model's ``state_dict()`` (the unwrapped
model, i.e. no DDP / Float16Module prefixes), with two rules:

* megatron's ``..._extra_state`` entries (Transformer Engine / FP8 metadata, pickled
  objects) are not weights and are never exported;
* every other key keeps its name, so the mapping is the identity and stable as long as the
  model's module tree is. A world of one holds every MoE expert locally, so expert ``i``'s
  weights appear under its global index (``...experts.local_experts.<i>...`` for the
  sequential MLP, ``...experts.linear_fc1.weight<i>`` for grouped GEMMs).

``to_exported`` / ``to_megafusion`` are the two directions; change names only here.
"""

from __future__ import annotations

import torch

EXTRA_STATE_SUFFIX = "_extra_state"


def is_exported(megafusion_name: str) -> bool:
    """False for entries that are not weights (megatron's ``_extra_state``)."""
    return not megafusion_name.endswith(EXTRA_STATE_SUFFIX)


def to_exported(megafusion_name: str) -> str:
    return megafusion_name


def to_megafusion(exported_name: str) -> str:
    return exported_name


def export_state(state_dict: dict[str, object]) -> dict[str, torch.Tensor]:
    """The exported tensors of a world-size-1 model's ``state_dict()``, by exported name."""
    return {to_exported(k): v for k, v in state_dict.items() if is_exported(k) and isinstance(v, torch.Tensor)}
