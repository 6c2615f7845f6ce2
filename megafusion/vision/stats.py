"""Per-channel latent statistics over a dataset (mean/std of each of ``latent_dim`` channels,
pooled over images and tokens), accumulated in float64 with Chan's parallel update so batches
and ranks merge exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

from megafusion.vision.base import Representation


@dataclass
class RunningStats:
    """Running count / mean / sum of squared deviations (M2), per channel, float64."""

    dim: int
    count: int = 0
    mean: torch.Tensor = field(default=None)  # type: ignore[assignment]
    m2: torch.Tensor = field(default=None)    # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.mean is None:
            self.mean = torch.zeros(self.dim, dtype=torch.float64)
        if self.m2 is None:
            self.m2 = torch.zeros(self.dim, dtype=torch.float64)

    def update(self, latents: torch.Tensor) -> None:
        """Add latents [..., dim] (every leading index is one observation)."""
        x = latents.detach().reshape(-1, self.dim).to(device="cpu", dtype=torch.float64)
        if x.shape[0] == 0:
            return
        self.merge(RunningStats(self.dim, x.shape[0], x.mean(0), ((x - x.mean(0)) ** 2).sum(0)))

    def merge(self, other: "RunningStats") -> None:
        if other.count == 0:
            return
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / n)
        self.m2 = self.m2 + other.m2 + delta ** 2 * (self.count * other.count / n)
        self.count = n

    def all_reduce(self) -> None:
        """Merge across torch.distributed ranks (no-op when not initialised)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        packed = torch.cat([torch.tensor([float(self.count)], dtype=torch.float64), self.mean, self.m2])
        gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, packed)
        total = RunningStats(self.dim)
        for g in gathered:
            total.merge(RunningStats(self.dim, int(g[0].item()), g[1:1 + self.dim], g[1 + self.dim:]))
        self.count, self.mean, self.m2 = total.count, total.mean, total.m2

    def std(self, eps: float = 1e-6) -> torch.Tensor:
        """Population std per channel, floored at ``eps`` so constant channels stay invertible."""
        if self.count == 0:
            raise ValueError("no latents were accumulated")
        return (self.m2 / self.count).sqrt().clamp_min(eps)


@torch.no_grad()
def compute_latent_stats(rep: Representation, batches: Iterable[torch.Tensor], max_images: int | None = None,
                         eps: float = 1e-6) -> RunningStats:
    """Encode image batches [B, 3, S, S] (up to ``max_images``) and accumulate their latent statistics.

    Merged across ranks if torch.distributed is initialised (each rank passes its own shard).
    """
    stats = RunningStats(rep.latent_dim)
    seen = 0
    device = next((b.device for b in rep.buffers()), torch.device("cpu"))
    for images in batches:
        if max_images is not None:
            images = images[: max_images - seen]
        if images.shape[0] == 0:
            break
        stats.update(rep.encode(images.to(device)))
        seen += images.shape[0]
        if max_images is not None and seen >= max_images:
            break
    stats.all_reduce()
    return stats


def apply_latent_stats(rep: Representation, stats: RunningStats, eps: float = 1e-6) -> None:
    rep.set_stats(stats.mean, stats.std(eps))
