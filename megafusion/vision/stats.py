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


# --- command line (tools/compute_latent_stats.py) --------------------------------------

def main(argv: list[str] | None = None) -> int:
    """Compute a representation's latent statistics over a dataset and save them with it.

    Runs under torchrun too: rank r encodes images r, r+world, ... of the first --num-images.
    """
    import argparse
    import json
    import os
    import sys
    from pathlib import Path

    import torch.distributed as dist

    from megafusion.vision import load_representation
    from megafusion.vision.base import read_manifest
    from megafusion.vision.images import open_image_source

    p = argparse.ArgumentParser(prog="compute_latent_stats", description=main.__doc__.split("\n\n")[0])
    p.add_argument("--kind", default="auto", help="pixel | rae | vae | auto (auto: the kind saved in --path)")
    p.add_argument("--path", help="saved representation dir (or RAE encoder / VAE weights dir)")
    p.add_argument("--data", required=True, help="folder of images, 'shapes' or 'synthetic'")
    p.add_argument("--num-images", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, help="pixel/vae: image size (a saved representation keeps its own)")
    p.add_argument("--patch-size", type=int, help="pixel/vae: patch size")
    p.add_argument("--out", help="where to save; default --path (only latent_stats.safetensors is rewritten)")
    p.add_argument("--eps", type=float, default=1e-6, help="floor of each channel's std")
    p.add_argument("--seed", type=int, default=0, help="seed of generated data")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = p.parse_args(argv)

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    use_cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    kw = {k: v for k, v in (("image_size", args.image_size), ("patch_size", args.patch_size)) if v is not None}
    try:
        rep = load_representation(args.kind, args.path, **kw).to(device).eval()
        data = open_image_source(args.data, rep.image_size, length=args.num_images, seed=args.seed)
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"compute_latent_stats: {err}", file=sys.stderr)
        return 2
    if args.out is None and args.path is None:
        print("compute_latent_stats: pass --out DIR (or --path of a saved representation)", file=sys.stderr)
        return 2
    mine = list(range(rank, min(args.num_images, len(data)), world))
    batches = (torch.stack([data[i] for i in mine[k:k + args.batch_size]])
               for k in range(0, len(mine), args.batch_size))
    stats = compute_latent_stats(rep, batches, eps=args.eps)
    apply_latent_stats(rep, stats, eps=args.eps)
    if rank == 0:
        saved = Path(args.path) if args.path else None
        if saved is not None and read_manifest(saved) is None and read_manifest(saved / "representation"):
            saved = saved / "representation"  # a train-decoder run directory
        out = Path(args.out) if args.out else saved
        same = saved is not None and out.resolve() == saved.resolve() and read_manifest(out) is not None
        if same:
            rep.save_stats(out)
        else:
            rep.to("cpu").save(out)
        print(json.dumps({"out": str(out), "kind": rep.kind, "observations": stats.count,
                          "latent_dim": rep.latent_dim, "mean_of_means": float(stats.mean.mean()),
                          "mean_of_stds": float(stats.std(args.eps).mean())}))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0
