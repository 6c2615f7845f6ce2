"""Layer specs: where megatron-core gets told which module implements each part of a layer.

This is the one place where the model's parallel building blocks are chosen. ``local``
uses megatron-core's pure-torch modules (CPU and GPU); ``te`` uses Transformer Engine's
(GPU only, imported only when asked for: FP8 training needs it, ``train.fp8``).
"""

from __future__ import annotations

import dataclasses

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer

from megafusion.model.norm import Norm

SPECS = ("local", "te")


def require_transformer_engine() -> None:
    """Raises a RuntimeError that says what to do when Transformer Engine cannot be imported.

    Installed-but-broken counts as missing: TE's wheels fail to import without CUDA
    libraries (``OSError``), which is what a CPU machine with TE installed shows.
    """
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError) as err:
        raise RuntimeError(
            "model.spec = te needs Transformer Engine (pip install 'megafusion[gpu]' on a CUDA machine); "
            f"use model.spec = local otherwise (import failed: {err})") from err


def local_layer_spec(num_experts: int | None) -> ModuleSpec:
    """megatron-core's local GPT layer, with a sequence-parallel-aware norm."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules

    sub = get_gpt_layer_local_submodules(num_experts=num_experts or None, moe_grouped_gemm=False)
    sub.input_layernorm = Norm
    sub.pre_mlp_layernorm = Norm
    return ModuleSpec(module=TransformerLayer, submodules=sub)


def te_layer_spec(num_experts: int | None) -> ModuleSpec:
    """Transformer Engine layer (fused norm+linear, TE attention). Needs a GPU and TE."""
    require_transformer_engine()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts or None, moe_grouped_gemm=True)


def _final_norm(spec: str):
    if spec == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return Norm


def _check_spec(spec: str) -> None:
    if spec not in SPECS:
        raise ValueError(f"model.spec = {spec!r} is not one of {', '.join(SPECS)}")


def block_spec(transformer_config, spec: str, num_experts: int | None, vp_stage: int | None = None
               ) -> TransformerBlockSubmodules:
    """The layers this pipeline stage builds, plus the block's final norm."""
    _check_spec(spec)
    layer = te_layer_spec(num_experts) if spec == "te" else local_layer_spec(num_experts)
    num_layers = get_num_layers_to_build(transformer_config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=_final_norm(spec))


def _te_transfusion_layer(num_experts: int | None, core_attention, fuse_input_norm: bool, mlp_spec) -> ModuleSpec:
    """A Transformer Engine layer for the Transfusion block around our ``core_attention``.

    - QKV: TE's fused norm + column-parallel linear (``TELayerNormColumnParallelLinear``, the
      layer's input norm is then an identity), or a ``TENorm`` and a plain
      ``TEColumnParallelLinear`` when ``fuse_input_norm`` is False (AdaLN norms need the
      timestep, which TE's fused norm cannot take).
    - output projection: ``TERowParallelLinear``.
    - FFN: ``mlp_spec`` after a ``TENorm`` (our FFN variants read a normalised input; their
      linears are TE's too, ``modality_ffn.mlp_submodules('te')``); without one, TE's dense
      MLP with the norm fused into fc1.
    """
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TELayerNormColumnParallelLinear,
        TENorm,
        TERowParallelLinear,
    )
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

    pre_mlp_norm = TENorm
    if mlp_spec is None:
        if num_experts:
            raise ValueError("transfusion_block_spec(spec='te') with experts needs an mlp_spec "
                             "(megafusion.model.ffn.ffn_spec builds the MoE FFN)")
        mlp_spec = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=TELayerNormColumnParallelLinear,
                                                                   linear_fc2=TERowParallelLinear))
        pre_mlp_norm = IdentityOp
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=IdentityOp if fuse_input_norm else TENorm,
        self_attention=ModuleSpec(
            module=SelfAttention,
            params={},
            submodules=SelfAttentionSubmodules(
                linear_qkv=TELayerNormColumnParallelLinear if fuse_input_norm else TEColumnParallelLinear,
                core_attention=core_attention,
                linear_proj=TERowParallelLinear,
                q_layernorm=IdentityOp,
                k_layernorm=IdentityOp,
            ),
        ),
        self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=pre_mlp_norm,
        mlp=mlp_spec,
        mlp_bda=get_bias_dropout_add,
    ))


def transfusion_block_spec(transformer_config, attention: str, num_experts: int | None,
                           vp_stage: int | None = None, mlp_spec=None, norm_spec=None,
                           spec: str = "local") -> TransformerBlockSubmodules:
    """The Transfusion layers of this pipeline stage, with the hybrid core attention
    ``attention`` (sdpa | flex | triton, megafusion.model.attention) in either layer spec.

    ``spec``: ``local`` - megatron's pure-torch GPT layer (CPU and GPU); ``te`` - Transformer
    Engine's linears and norms (fused norm+QKV, FP8-capable GEMMs under ``train.fp8``; GPU
    only, TE imported only here). Both keep *our* core attention, so the hybrid mask applies
    in both; in FP8 runs the attention itself stays in bf16.

    The attention mask type is ``arbitrary``: the model passes the packed ids
    (``HybridMaskInfo.as_tensor()``) as ``attention_mask`` and the backend applies the rule.
    FFN hook: ``mlp_spec`` (a ModuleSpec for the layer's ``mlp``) replaces megatron's dense
    MLP / MoE chosen by ``num_experts``; this is the one place the FFN variant is plugged in.
    ``norm_spec`` replaces both pre-norms of every layer (AdaLN time conditioning).
    """
    from megatron.core.transformer.enums import AttnMaskType

    from megafusion.model.attention import core_attention_class

    _check_spec(spec)
    core_attention = core_attention_class(attention)
    if spec == "te":
        require_transformer_engine()
        if norm_spec is not None and mlp_spec is None:
            raise ValueError("transfusion_block_spec(spec='te', norm_spec=...) needs an mlp_spec: TE's own MLP fuses "
                             "its pre-norm into fc1 and would bypass the given norm")
        layer = _te_transfusion_layer(num_experts, core_attention, fuse_input_norm=norm_spec is None, mlp_spec=mlp_spec)
    else:
        layer = local_layer_spec(num_experts)
    sub = layer.submodules
    attn = sub.self_attention
    sub.self_attention = ModuleSpec(
        module=attn.module,
        params={**attn.params, "attn_mask_type": AttnMaskType.arbitrary},
        submodules=dataclasses.replace(attn.submodules, core_attention=core_attention),
    )
    if mlp_spec is not None:
        sub.mlp = mlp_spec
    if norm_spec is not None:
        sub.input_layernorm = sub.pre_mlp_layernorm = norm_spec
    num_layers = get_num_layers_to_build(transformer_config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=_final_norm(spec))
