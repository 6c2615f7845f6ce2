"""A decoder-only text model: megatron-core's GPT stack through our layer spec.

The trainer backbone's reference model, and the text-only baseline of the research.
"""

from __future__ import annotations

from functools import partial

import torch

from megafusion.config import Config
from megafusion.data import synthetic
from megafusion.model.init import init_weights
from megafusion.model.spec import block_spec


def masked_token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """megatron loss function: (summed loss, token count, {metric: [sum, count]})."""
    mask = loss_mask.reshape(-1).float()
    total = torch.sum(per_token_loss.reshape(-1).float() * mask)
    count = mask.sum()
    stats = torch.stack([total.detach(), count])
    return total, count.to(torch.int), {"loss": stats, "loss_text": stats}


class TextModelProvider:
    metric_names = ("loss", "loss_text")

    def __init__(self, cfg: Config, transformer_config) -> None:
        self.cfg = cfg
        self.transformer_config = transformer_config

    def build(self, pre_process: bool, post_process: bool, vp_stage: int | None) -> torch.nn.Module:
        from megatron.core.models.gpt import GPTModel

        m = self.cfg.model
        spec = block_spec(self.transformer_config, m.spec, m.moe.num_experts, vp_stage)
        if m.moe.num_experts:
            from megafusion.model.moe_dispatch import with_moe_dispatch

            spec.layer_specs = [with_moe_dispatch(layer, m.moe.dispatch, m.moe.experts) for layer in spec.layer_specs]
        model = GPTModel(
            config=self.transformer_config,
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
        init_weights(model, self.cfg.train.seed, m.init_std, m.num_layers)
        return model

    def micro_batches(self, step: int, dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
        t, m = self.cfg.train, self.cfg.model
        return [synthetic.text_batch(t.seed, idx, m.seq_length, m.vocab_size)
                for idx in synthetic.micro_batch_indices(step, t.global_batch_size, t.micro_batch_size,
                                                         dp_rank, dp_size)]

    def forward_step(self, batch: dict[str, torch.Tensor], model: torch.nn.Module):
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(masked_token_loss, batch["loss_mask"])
