"""The FLOP and parameter accounting against the real megatron Transfusion model.

torch's FlopCounterMode counts every matmul and convolution of one forward + backward of
``TransfusionModel`` (linear or U-Net adapters, additive or AdaLN time conditioning,
dense / modality-specific FFN / MoE with per-modality shared experts). The model runs its
LM head, linear adapters and time embedding on *every* position (the accounting counts the
useful positions only), so the reference here is the accounting of a packing in which every
position is both text and latent. Core attention is left out on both sides: on CPU the
counter does not see the fused attention op; attention pairs are checked against the dense
mask in test_flops.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megafusion.config import load_config
from megafusion.scaling.flops import ModelShape, PackingCounts, flop_breakdown_of_counts, params, unet_cost

CONFIG = "examples/configs/tiny_transfusion.yaml"
SMALL = ["model.seq_length=64", "model.num_layers=1", "train.micro_batch_size=2", "train.device=cpu"]
VARIANTS = {
    "linear_additive": [],
    "adaln": ["model.time_conditioning=adaln"],
    "unet": ["model.patch_adapter=unet"],
    "modality_ffn": ["model.ffn=modality"],
    "moe_per_modality_shared": ["model.moe.num_experts=4", "model.moe.ffn_hidden_size=32",
                                "model.moe.shared_expert_ffn_hidden_size=16",
                                "model.moe.per_modality_shared_experts=true"],
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_accounting_matches_the_real_model(megatron_world, variant):
    from megafusion.model.transformer_config import build_transformer_config
    from megafusion.recipes.transfusion import TransfusionProvider

    cfg = load_config(CONFIG, [*SMALL, *VARIANTS[variant]])
    provider = TransfusionProvider(cfg, build_transformer_config(cfg, torch.device("cpu")))
    model = provider.build(pre_process=True, post_process=True, vp_stage=None)
    trainer_shape = provider.model_shape  # what the trainer's throughput / MFU log counts with
    shape = dataclasses.replace(
        ModelShape.from_model_config({**cfg.to_dict()["model"], "latent_dim": provider.latent_dim,
                                      "unet_layout": provider.unet_layout}),
        ffn_copies=trainer_shape.ffn_copies, shared_expert_copies=trainer_shape.shared_expert_copies)
    # (the provider still reports U-Net adapters as linear ones: checked once it passes unet_layout)
    if variant != "unet" or trainer_shape.patch_adapter == "unet":
        assert trainer_shape == shape

    assert params(shape).total == sum(p.numel() for p in model.parameters())

    indices = [i for i in range(64) if provider.stream.sample(i).image_loss_mask.any()][:2]
    batch = provider.batch(indices)
    b, s = batch["tokens"].shape
    is_latent = batch["modality"] != 0
    gen = torch.Generator().manual_seed(0)
    # input gradients everywhere (the accounting's 6ND convention)
    latents = torch.randn(b, s, provider.latent_dim, generator=gen).requires_grad_()
    t = (torch.rand(b, s, generator=gen) * is_latent).requires_grad_()
    mask = torch.stack([batch["doc_ids"], batch["span_ids"]])
    with FlopCounterMode(display=False) as counter:
        ce, pred = model(batch["tokens"], batch["positions"], mask, latents=latents, timesteps=t,
                         modality=batch["modality"])
        (ce.float().square().mean() + pred.square().mean()).backward()
    core = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name.endswith("core_attention"))

    everywhere = flop_breakdown_of_counts(shape, PackingCounts(positions=b * s, latent=b * s, pairs=0))
    lm_head_everywhere = b * s * 2 * shape.hidden_size * shape.vocab_size
    adapters = everywhere.patch_adapters
    if shape.patch_adapter == "unet":  # the U-Net runs on the images only
        cost = unet_cost(shape)
        assert int(is_latent.sum()) % shape.tokens_per_image == 0
        adapters = int(is_latent.sum()) // shape.tokens_per_image * (cost.down_flops + cost.up_flops)
    expected = 3 * (everywhere.forward - everywhere.patch_adapters + adapters + lm_head_everywhere)
    assert counter.get_total_flops() - core == expected
