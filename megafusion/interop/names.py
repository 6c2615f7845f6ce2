"""The one mapping between megafusion (megatron-core) parameter names and exported names.

Exported names are the keys of the world-size-1 model's ``state_dict()`` built with the
``local`` layer spec (the unwrapped model, i.e. no DDP / Float16Module prefixes):

* megatron's ``..._extra_state`` entries (Transformer Engine / FP8 metadata, pickled
  objects) are not weights and are never exported;
* a model built with ``model.spec=te`` names some weights differently; they are normalised
  to the local names, so a run exports the same names whichever spec trained it:

  ================================================  ==============================================
  Transformer Engine (``model.spec=te``)             exported (local spec)
  ================================================  ==============================================
  ``L.self_attention.linear_qkv.layer_norm_weight``  ``L.input_layernorm.norm.weight`` (fused norm)
  ``L.self_attention.linear_qkv.layer_norm_bias``    ``L.input_layernorm.norm.bias`` (LayerNorm)
  ``L.mlp.linear_fc1.layer_norm_weight`` / ``_bias``  ``L.pre_mlp_layernorm.norm.weight`` / ``.bias``
  ``L.input_layernorm.weight`` (``TENorm``), also     ``L.input_layernorm.norm.weight``
  ``pre_mlp_layernorm``, ``decoder.final_layernorm``
  ``L.mlp.experts.linear_fc1.weight<i>`` (grouped)   ``L.mlp.experts.local_experts.<i>.linear_fc1.weight``
  ================================================  ==============================================

* every other key keeps its name. A world of one holds every MoE expert locally, so expert
  ``i``'s weights appear under its global index (``...mlp.experts.local_experts.<i>.linear_fc1.weight``).

``to_exported`` maps a model's name to the exported one; loading goes through
``export_state(model.state_dict())`` (the model's tensors by exported name), so it needs no
inverse. Change names only here. The Hugging Face Llama names: ``megafusion.interop.hf_llama``.
"""

from __future__ import annotations

import re

import torch

EXTRA_STATE_SUFFIX = "_extra_state"

# (pattern, replacement) applied in order; the first that matches renames the key.
_TE_RULES = (
    (re.compile(r"^(.*\.)self_attention\.linear_qkv\.layer_norm_(weight|bias)$"), r"\1input_layernorm.norm.\2"),
    (re.compile(r"^(.*\.)mlp\.linear_fc1\.layer_norm_(weight|bias)$"), r"\1pre_mlp_layernorm.norm.\2"),
    (re.compile(r"^(.*\.)?(input_layernorm|pre_mlp_layernorm|final_layernorm)\.(weight|bias)$"), r"\1\2.norm.\3"),
    (re.compile(r"^(.*\.)experts\.linear_fc([12])\.(weight|bias)(\d+)$"), r"\1experts.local_experts.\4.linear_fc\2.\3"),
)


def is_exported(megafusion_name: str) -> bool:
    """False for entries that are not weights (megatron's ``_extra_state``)."""
    return not megafusion_name.endswith(EXTRA_STATE_SUFFIX)


def to_exported(megafusion_name: str) -> str:
    """The exported name of a model's state-dict key (local spec: itself; TE spec: normalised)."""
    for pattern, replacement in _TE_RULES:
        if pattern.match(megafusion_name):
            return pattern.sub(replacement, megafusion_name)
    return megafusion_name


def to_megafusion(exported_name: str) -> str:
    """The local-spec model's name of an exported tensor (the identity: exported names are local names)."""
    return exported_name


def export_state(state_dict: dict[str, object]) -> dict[str, torch.Tensor]:
    """The exported tensors of a world-size-1 model's ``state_dict()``, by exported name."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if not is_exported(k) or not isinstance(v, torch.Tensor):
            continue
        name = to_exported(k)
        if name in out:
            raise ValueError(f"two model tensors export to the same name {name!r} (one is {k!r}); "
                             "megafusion.interop.names needs a rule for this model")
        out[name] = v
    return out
