"""megatron-core's ``TransformerConfig`` for a run: the model and parallel layout of a
:class:`~megafusion.config.Config` (sizes, norms, activation, MoE, FP8, recomputation).

Both model kinds build their megatron-core modules from it; which modules, and how data
reaches them, is the recipe's business (``megafusion.recipes``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from megafusion.config import Config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fp8_config(recipe: str, fp8_params: bool) -> dict[str, Any]:
    """TransformerConfig fields for ``train.fp8`` / ``train.fp8_params`` (Transformer Engine).

    megatron-core wraps every TE layer of the block in TE's FP8 autocast with the recipe
    (and builds the weights as FP8 tensors when ``fp8_param``); modules that are not TE's
    (our hybrid core attention, embeddings, heads) stay in bf16.
    - delayed: per-tensor scales from an amax history (1024 steps, max), E4M3 forward /
      E5M2 gradients ("hybrid"): the Megatron-LM / NeMo default.
    - tensorwise: per-tensor current scaling (scales from this step's amax), hybrid format.
    - mxfp8: 32-element block scales in E8M0 (Blackwell tensor cores), E4M3 throughout.
    """
    if recipe == "none":
        return {}
    kwargs: dict[str, Any] = dict(fp8="e4m3" if recipe == "mxfp8" else "hybrid", fp8_recipe=recipe,
                                  fp8_param=fp8_params)
    if recipe == "delayed":
        kwargs.update(fp8_amax_history_len=1024, fp8_amax_compute_algo="max")
    return kwargs


def build_transformer_config(cfg: Config, device: torch.device):
    """megatron-core's TransformerConfig for the run's model and parallel layout."""
    from megatron.core.transformer import TransformerConfig

    m, p, t, moe = cfg.model, cfg.parallel, cfg.train, cfg.model.moe
    dtype = DTYPES[t.precision]
    recompute = {"none": {}, "full": dict(recompute_granularity="full", recompute_method="uniform",
                                          recompute_num_layers=1),
                 "selective": dict(recompute_granularity="selective")}[t.recompute]
    moe_kwargs: dict[str, Any] = {}
    if moe.num_experts:
        moe_kwargs = dict(
            num_moe_experts=moe.num_experts,
            moe_router_topk=moe.top_k,
            moe_ffn_hidden_size=moe.ffn_hidden_size or m.ffn_hidden_size or 4 * m.hidden_size,
            moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
            moe_token_dispatcher_type=moe.dispatcher,
            moe_router_score_function=moe.router_score,
            moe_router_load_balancing_type="aux_loss" if moe.aux_loss_coeff > 0 else "none",
            moe_aux_loss_coeff=moe.aux_loss_coeff,
            moe_z_loss_coeff=moe.z_loss_coeff,
            moe_expert_capacity_factor=moe.capacity_factor,
            moe_router_dtype="fp32",
        )
    return TransformerConfig(
        **fp8_config(t.fp8, t.fp8_params),
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_heads,
        num_query_groups=m.num_kv_heads,
        ffn_hidden_size=m.ffn_hidden_size or 4 * m.hidden_size,
        normalization="RMSNorm" if m.normalization == "rmsnorm" else "LayerNorm",
        gated_linear_unit=m.activation == "swiglu",
        activation_func=F.silu if m.activation == "swiglu" else F.gelu,
        add_bias_linear=False,  # MoE with biases fails in megatron-core 0.19 (platform.md)
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
        expert_model_parallel_size=p.ep,
        sequence_parallel=p.sp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        # Losses are summed per token and divided by the global token count once, so any
        # layout (and any packing) weights every token the same.
        calculate_per_token_loss=True,
        use_cpu_initialization=device.type == "cpu",
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        **recompute,
        **moe_kwargs,
    )
