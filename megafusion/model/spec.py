"""Layer specs: where megatron-core gets told which module implements each part of a layer.

This is the one place where the model's parallel building blocks are chosen. ``local``
uses megatron-core's pure-torch modules (CPU and GPU); ``te`` uses Transformer Engine's
(GPU only, imported only when asked for).
"""

from __future__ import annotations

import dataclasses

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer

from megafusion.model.norm import Norm


def local_layer_spec(num_experts: int | None) -> ModuleSpec:
    """megatron-core's local GPT layer, with a sequence-parallel-aware norm."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules

    sub = get_gpt_layer_local_submodules(num_experts=num_experts or None, moe_grouped_gemm=False)
    sub.input_layernorm = Norm
    sub.pre_mlp_layernorm = Norm
    return ModuleSpec(module=TransformerLayer, submodules=sub)


def te_layer_spec(num_experts: int | None) -> ModuleSpec:
    """Transformer Engine layer (fused norm+linear, TE attention). Needs a GPU and TE."""
    try:
        import transformer_engine  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            "model.spec = te needs Transformer Engine (pip install 'megafusion[gpu]' on a CUDA machine); "
            "use model.spec = local otherwise") from err
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts or None, moe_grouped_gemm=True)


def block_spec(transformer_config, spec: str, num_experts: int | None, vp_stage: int | None = None
               ) -> TransformerBlockSubmodules:
    """The layers this pipeline stage builds, plus the block's final norm."""
    layer = te_layer_spec(num_experts) if spec == "te" else local_layer_spec(num_experts)
    num_layers = get_num_layers_to_build(transformer_config, vp_stage=vp_stage)
    final_norm = Norm
    if spec == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=final_norm)


def transfusion_block_spec(transformer_config, attention: str, num_experts: int | None,
                           vp_stage: int | None = None, mlp_spec=None, norm_spec=None) -> TransformerBlockSubmodules:
    """The Transfusion layers of this pipeline stage: the local GPT layer with the hybrid
    core attention ``attention`` (sdpa | flex | triton, megafusion.model.attention).

    The attention mask type is ``arbitrary``: the model passes the packed ids
    (``HybridMaskInfo.as_tensor()``) as ``attention_mask`` and the backend applies the rule.
    FFN hook: ``mlp_spec`` (a ModuleSpec for the layer's ``mlp``) replaces megatron's dense
    MLP / MoE chosen by ``num_experts``; this is the one place the FFN variant is plugged in.
    ``norm_spec`` replaces both pre-norms of every layer (AdaLN time conditioning).
    """
    from megatron.core.transformer.enums import AttnMaskType

    from megafusion.model.attention import core_attention_class

    layer = local_layer_spec(num_experts)
    sub = layer.submodules
    attn = sub.self_attention
    sub.self_attention = ModuleSpec(
        module=attn.module,
        params={**attn.params, "attn_mask_type": AttnMaskType.arbitrary},
        submodules=dataclasses.replace(attn.submodules, core_attention=core_attention_class(attention)),
    )
    if mlp_spec is not None:
        sub.mlp = mlp_spec
    if norm_spec is not None:
        sub.input_layernorm = sub.pre_mlp_layernorm = norm_spec
    num_layers = get_num_layers_to_build(transformer_config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=Norm)
