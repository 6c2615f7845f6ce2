"""A decoder-only text model: megatron-core's GPT stack through our layer spec.

The trainer backbone's reference model, and the text-only baseline of the research. Its
data and loss are the text recipe's (``megafusion.recipes.text``).
"""

from __future__ import annotations

import torch

from megafusion.config import Config
from megafusion.model.init import init_weights
from megafusion.model.spec import block_spec


def build_text_model(cfg: Config, transformer_config, pre_process: bool, post_process: bool,
                     vp_stage: int | None) -> torch.nn.Module:
    """One pipeline (virtual) stage of ``cfg.model``'s GPT model, on CPU, initialised from
    ``train.seed`` (``transformer_config``: ``build_transformer_config(cfg, ...)``)."""
    from megatron.core.models.gpt import GPTModel

    m = cfg.model
    spec = block_spec(transformer_config, m.spec, m.moe.num_experts, vp_stage)
    if m.moe.num_experts:
        from megafusion.model.moe_dispatch import with_moe_dispatch

        spec.layer_specs = [with_moe_dispatch(layer, m.moe.dispatch, m.moe.experts) for layer in spec.layer_specs]
    model = GPTModel(
        config=transformer_config,
        transformer_layer_spec=spec,
        vocab_size=m.vocab_size,
        max_sequence_length=m.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(m.rope_base),
        vp_stage=vp_stage,
    )
    init_weights(model, cfg.train.seed, m.init_std, m.num_layers)
    return model
