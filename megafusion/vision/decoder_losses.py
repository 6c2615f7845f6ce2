"""Losses for RAE decoder training beyond L1: LPIPS (optional dependency) and a small
patch discriminator with hinge losses. Images here are in [-1, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def psnr(pred01: torch.Tensor, target01: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1]: [B, 3, H, W] x2 -> [B]."""
    mse = ((pred01.float() - target01.float()) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


class PatchDiscriminator(nn.Module):
    """PatchGAN-style: strided 4x4 convs (spectral norm) -> a logit per receptive-field patch."""

    def __init__(self, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = 3
        for i in range(layers):
            c_out = channels * 2 ** i
            blocks += [nn.utils.parametrizations.spectral_norm(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)),
                       nn.LeakyReLU(0.2)]
            c_in = c_out
        blocks.append(nn.utils.parametrizations.spectral_norm(nn.Conv2d(c_in, 1, 3, padding=1)))
        self.net = nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [-1, 1] -> logits [B, 1, H / 2^layers, W / 2^layers]."""
        return self.net(images)


def discriminator_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def generator_hinge_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


def load_lpips(net: str = "vgg") -> nn.Module:
    """The ``lpips`` package's perceptual metric, frozen. It builds on torchvision's ImageNet
    backbones, whose weights must already be in the torch hub cache ($TORCH_HOME) on machines
    without internet access."""
    try:
        import lpips
    except ImportError as err:
        raise ImportError("lpips_weight > 0 needs the optional dependency `lpips` (pip install lpips; it also "
                          "needs torchvision matching your torch); or set lpips_weight=0") from err
    return lpips.LPIPS(net=net, verbose=False).eval().requires_grad_(False)
