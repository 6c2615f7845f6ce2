"""``megafusion train-decoder``: train the RAE's ViT decoder on frozen encoder features.

    megafusion train-decoder --encoder-path DIR --data FOLDER|shapes|synthetic --run-dir RUN \
        [--config FILE] [--set key=value ...]
    torchrun --nproc_per_node N -m megafusion.vision.train_decoder ...   (data parallel; gloo on CPU)

Each step: encode a batch with the frozen encoder, add RAE noise augmentation to the latents
(sigma ~ |N(0, tau^2)| per sample), decode, and minimise L1 (+ optional LPIPS, + optional
hinge GAN with a patch discriminator). Batches and noise are a pure function of
(seed, step, rank), so a resumed run continues exactly where it stopped.

Run directory: ``config.yaml``, ``metrics.jsonl`` (train lines: step, loss, l1, lr, grad_norm,
images_per_s, ...; eval lines: step, heldout_psnr), ``tensorboard/`` (scalars and held-out
originals over reconstructions), ``checkpoints/step_XXXXXXXX/state.pt`` + ``checkpoints/latest``,
and at the end ``representation/`` (loadable with ``load_representation("rae", RUN)``, with
latent statistics) and ``result.json`` (held-out PSNR before and after training).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from megafusion.vision.decoder_losses import (PatchDiscriminator, discriminator_hinge_loss, generator_hinge_loss,
                                              load_lpips, psnr)
from megafusion.vision.images import open_image_source
from megafusion.vision.rae import RAERepresentation, noise_augment


@dataclass
class DecoderTrainConfig:
    """Every field is also a command-line flag (``--noise-tau 0.5``) and a key of ``--config`` YAML."""

    encoder_path: str | None = None   # HF DINOv2/SigLIP/SigLIP 2 dir, or a saved RAE (continue its decoder)
    data: str = "synthetic"           # a folder of images, "shapes" (ShapesWorld) or "synthetic"
    run_dir: str = "runs/rae_decoder"
    image_size: int | None = None     # decoder output size; default: the encoder's input size
    encoder_input_size: int | None = None
    decoder_hidden_size: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_mlp_ratio: float = 4.0
    steps: int = 1000
    batch_size: int = 32              # per rank
    lr: float = 2e-4
    min_lr_ratio: float = 0.1         # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    noise_tau: float = 0.8            # RAE noise augmentation; 0 disables
    l1_weight: float = 1.0
    lpips_weight: float = 0.0         # needs the optional `lpips` package
    lpips_net: str = "vgg"
    adv_weight: float = 0.0           # hinge GAN with a patch discriminator
    adv_start_step: int = 0
    disc_lr: float = 2e-4
    disc_channels: int = 64
    generated_images: int = 100_000   # size of a generated ("shapes"/"synthetic") training set
    heldout_images: int = 64
    eval_every: int = 200
    log_every: int = 10
    image_every: int = 200
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    stats_images: int = 256           # latent statistics saved with the final representation; 0 skips
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda

    def validate(self, need_encoder_path: bool = True) -> None:
        if need_encoder_path and not self.encoder_path:
            raise ValueError("train-decoder needs --encoder-path DIR (a local DINOv2/SigLIP/SigLIP 2 directory "
                             "with config.json, or a saved RAE representation)")
        for name in ("steps", "batch_size", "eval_every", "log_every", "image_every", "checkpoint_every",
                     "generated_images"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train-decoder: {name}={getattr(self, name)} must be > 0")
        if self.noise_tau < 0:
            raise ValueError(f"train-decoder: noise_tau={self.noise_tau} must be >= 0")


# --- data ------------------------------------------------------------------------------

def split_data(cfg: DecoderTrainConfig, image_size: int) -> tuple[Dataset, Dataset]:
    """(train, held-out). Generated data: disjoint seeds. A folder: a fixed random held-out subset."""
    if cfg.data in ("shapes", "synthetic"):
        train = open_image_source(cfg.data, image_size, cfg.generated_images, seed=cfg.seed)
        heldout = open_image_source(cfg.data, image_size, cfg.heldout_images, seed=cfg.seed + 1_000_003)
        return train, heldout
    full = open_image_source(cfg.data, image_size)
    if len(full) <= cfg.heldout_images:
        raise ValueError(f"'{cfg.data}' has {len(full)} images; need more than heldout_images={cfg.heldout_images}")
    perm = np.random.default_rng(cfg.seed).permutation(len(full)).tolist()
    return Subset(full, perm[cfg.heldout_images:]), Subset(full, perm[:cfg.heldout_images])


class StepBatches:
    """Index batches for steps [start, steps) on one rank: global sample g = (step*world + rank)*B + j
    walks epoch-wise random permutations, so the order depends only on (seed, step, rank)."""

    def __init__(self, n: int, batch: int, start: int, steps: int, rank: int, world: int, seed: int) -> None:
        self.n, self.batch, self.start, self.steps = n, batch, start, steps
        self.rank, self.world, self.seed = rank, world, seed
        self._perm: tuple[int, np.ndarray] | None = None

    def _index(self, g: int) -> int:
        epoch, pos = divmod(g, self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng((self.seed, epoch)).permutation(self.n))
        return int(self._perm[1][pos])

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.steps):
            first = (step * self.world + self.rank) * self.batch
            yield [self._index(first + j) for j in range(self.batch)]

    def __len__(self) -> int:
        return max(0, self.steps - self.start)


# --- checkpoints -----------------------------------------------------------------------

def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoints/step_N/state.pt through a temporary directory and an atomic rename."""
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = ckpt_root / ".latest.tmp"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, ckpt_root / "latest")
    old = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for p in old[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip() / "state.pt"
    if not path.exists():
        raise FileNotFoundError(f"'{pointer}' points at {path}, which is missing; delete the pointer to restart")
    return path


# --- distributed -----------------------------------------------------------------------

def init_distributed(device_pref: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref == "cuda"
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return rank, world, device


# --- training --------------------------------------------------------------------------

def build_representation(cfg: DecoderTrainConfig, encoder: nn.Module | None = None) -> RAERepresentation:
    from megafusion.vision import load_representation

    decoder = dict(hidden_size=cfg.decoder_hidden_size, depth=cfg.decoder_depth, num_heads=cfg.decoder_heads,
                   mlp_ratio=cfg.decoder_mlp_ratio)
    if encoder is not None:
        return load_representation("rae", encoder=encoder, image_size=cfg.image_size, decoder=decoder,
                                   encoder_input_size=cfg.encoder_input_size)
    path = Path(cfg.encoder_path)
    from megafusion.vision.base import read_manifest

    if read_manifest(path) is not None or read_manifest(path / "representation") is not None:
        return load_representation("rae", path)  # continue training a saved RAE's decoder
    return load_representation("rae", path, image_size=cfg.image_size, decoder=decoder,
                               encoder_input_size=cfg.encoder_input_size)


def lr_at(cfg: DecoderTrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def heldout_psnr(rep: RAERepresentation, heldout: Dataset, device: torch.device, batch: int = 32
                 ) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Mean PSNR (dB) of decode(encode(x)) over the held-out set, with the first batch (originals, recons)."""
    values, first = [], None
    for i in range(0, len(heldout), batch):
        x = torch.stack([heldout[j] for j in range(i, min(i + batch, len(heldout)))]).to(device)
        rec = rep.decode(rep.encode(x))
        values.append(psnr(rec, x))
        if first is None:
            first = (x[:8].cpu(), rec[:8].cpu())
    return float(torch.cat(values).mean()), first[0], first[1]


def image_grid(originals: torch.Tensor, recons: torch.Tensor) -> torch.Tensor:
    """[3, 2H, N*W]: originals on top, reconstructions below."""
    return torch.cat([torch.cat(list(originals), dim=2), torch.cat(list(recons), dim=2)], dim=1)


def train_decoder(cfg: DecoderTrainConfig, encoder: nn.Module | None = None) -> dict[str, Any]:
    """Train (or resume) and return the result dict written to ``run_dir/result.json`` (rank 0)."""
    cfg.validate(need_encoder_path=encoder is None)
    rank, world, device = init_distributed(cfg.device)
    run_dir = Path(cfg.run_dir)
    torch.manual_seed(cfg.seed)  # identical decoder initialisation on every rank
    rep = build_representation(cfg, encoder).to(device)
    train_set, heldout = split_data(cfg, rep.image_size)

    decoder: nn.Module = rep.decoder
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    disc = disc_opt = None
    if cfg.adv_weight > 0:
        disc = PatchDiscriminator(cfg.disc_channels).to(device)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9))
    perceptual = load_lpips(cfg.lpips_net).to(device) if cfg.lpips_weight > 0 else None

    start = 0
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        # weights_only: a checkpoint holds state dicts, the step and the config as plain
        # types, so nothing in a run dir is ever executed on resume.
        try:
            state = torch.load(ckpt, map_location=device, weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"GLOBAL ([\w.]+)", str(err))  # torch's message names the refused global
            what = f"'{found.group(1)}'" if found else "an object that is not plain data"
            raise ValueError(f"'{ckpt}': refusing to unpickle {what} (train-decoder checkpoints hold tensors and "
                             "plain data only); it was not written by train-decoder: do not resume from it") from None
        decoder.load_state_dict(state["decoder"])
        optimizer.load_state_dict(state["optimizer"])
        if disc is not None and state.get("discriminator") is not None:
            disc.load_state_dict(state["discriminator"])
            disc_opt.load_state_dict(state["disc_optimizer"])
        start = int(state["step"])

    ddp_decoder, ddp_disc = decoder, disc
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_decoder = DDP(decoder)
        if disc is not None:
            ddp_disc = DDP(disc)

    writer = None
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        import yaml

        (run_dir / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start if start else None)
    metrics_path = run_dir / "metrics.jsonl"
    if rank == 0 and start and metrics_path.exists():  # drop lines the interrupted run logged past its checkpoint
        kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["step"] <= start]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    metrics = open(metrics_path, "a") if rank == 0 else None

    def log(record: dict[str, Any]) -> None:
        if rank != 0:
            return
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        print(f"[train-decoder] step {record['step']}/{cfg.steps} | "
              + " | ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "step"), flush=True)
        for k, v in record.items():
            if k != "step":
                writer.add_scalar(k, v, record["step"])

    def evaluate(step: int) -> float:
        rep.eval()
        value, originals, recons = heldout_psnr(rep, heldout, device)
        rep.train()
        log({"step": step, "heldout_psnr": value})
        writer.add_image("heldout/originals_over_reconstructions", image_grid(originals, recons), step)
        return value

    result: dict[str, Any] = {}
    result_path = run_dir / "result.json"
    if rank == 0 and start == 0:
        result["heldout_psnr_initial"] = evaluate(0)
        result_path.write_text(json.dumps(result, indent=2) + "\n")

    loader = DataLoader(train_set, batch_sampler=StepBatches(len(train_set), cfg.batch_size, start, cfg.steps,
                                                             rank, world, cfg.seed),
                        num_workers=cfg.num_workers)
    rep.train()
    t0, step = time.perf_counter(), start
    for step, images in enumerate(loader, start=start):
        images = images.to(device, non_blocking=True)
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + step * 1009 + rank)
        latents = noise_augment(rep.encode(images), cfg.noise_tau, generator=gen)
        target = images * 2 - 1
        lr = lr_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr

        pred = ddp_decoder(latents)
        l1 = (pred - target).abs().mean()
        loss = cfg.l1_weight * l1
        record: dict[str, Any] = {"step": step + 1, "l1": l1.item()}
        if perceptual is not None:
            lp = perceptual(pred.clamp(-1, 1), target).mean()
            loss = loss + cfg.lpips_weight * lp
            record["lpips"] = lp.item()
        adversarial = disc is not None and step >= cfg.adv_start_step
        if adversarial:
            disc.requires_grad_(False)
            g_adv = generator_hinge_loss(disc(pred))  # plain module: no gradient sync for a frozen pass
            loss = loss + cfg.adv_weight * g_adv
            record["g_adv"] = g_adv.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(decoder.parameters(), cfg.grad_clip if cfg.grad_clip > 0
                                                   else float("inf"))
        optimizer.step()
        if adversarial:
            disc.requires_grad_(True)
            real_logits, fake_logits = ddp_disc(torch.cat([target, pred.detach()])).chunk(2)  # one DDP forward
            d_loss = discriminator_hinge_loss(real_logits, fake_logits)
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
            record["d_loss"] = d_loss.item()

        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            elapsed = time.perf_counter() - t0
            record.update(loss=loss.item(), lr=lr, grad_norm=float(grad_norm),
                          images_per_s=cfg.batch_size * world * (done - start) / max(elapsed, 1e-9))
            log(record)
        if rank == 0 and (done % cfg.eval_every == 0 or done % cfg.image_every == 0) and done != cfg.steps:
            evaluate(done)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            if rank == 0:
                save_checkpoint(run_dir, done, {
                    "decoder": decoder.state_dict(), "optimizer": optimizer.state_dict(),
                    "discriminator": disc.state_dict() if disc is not None else None,
                    "disc_optimizer": disc_opt.state_dict() if disc_opt is not None else None,
                    "step": done, "config": dataclasses.asdict(cfg)}, cfg.keep_checkpoints)
            if world > 1:
                dist.barrier()

    if rank == 0:
        result["heldout_psnr_final"] = evaluate(cfg.steps)
        result["steps"] = cfg.steps
        rep.eval()
        if cfg.stats_images > 0:
            from megafusion.vision.stats import apply_latent_stats, compute_latent_stats

            n = min(cfg.stats_images, len(train_set))
            batches = (torch.stack([train_set[j] for j in range(i, min(i + cfg.batch_size, n))])
                       for i in range(0, n, cfg.batch_size))
            apply_latent_stats(rep, compute_latent_stats(rep, batches))
        rep.to("cpu").save(run_dir / "representation")
        previous = json.loads(result_path.read_text()) if result_path.exists() else {}
        result = {**previous, **result, "representation": str(run_dir / "representation")}
        result_path.write_text(json.dumps(result, indent=2) + "\n")
        writer.close()
        metrics.close()
    if world > 1:
        dist.barrier()
    return result


# --- command line ----------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megafusion train-decoder", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML file whose keys are the fields below (flags override it)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, as `megafusion train --set` (repeatable; after --config and the flags), "
                        "e.g. --set noise_tau=0.5")
    for f in dataclasses.fields(DecoderTrainConfig):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
        conv = int if "int" in kind else float if "float" in kind else str
        p.add_argument("--" + f.name.replace("_", "-"), type=conv, default=None, help=f"(default: {f.default})")
    return p


def config_from_args(argv: list[str] | None) -> DecoderTrainConfig:
    """``--config`` YAML, then the flags, then ``--set`` overrides, read as ``megafusion train``
    reads its config (:func:`megafusion.settings.load_dataclass`: typed, unknown keys refused)."""
    from megafusion.settings import load_dataclass

    args = _parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "overrides") and v is not None}
    return load_dataclass(DecoderTrainConfig, args.config, args.overrides, flags)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_from_args(argv)
        cfg.validate()
    except (ValueError, FileNotFoundError) as err:
        print(f"megafusion train-decoder: {err}", file=sys.stderr)
        return 2
    try:
        result = train_decoder(cfg)
    # A missing encoder/data path or optional dependency, too few images, a refused checkpoint.
    except (FileNotFoundError, ImportError, ValueError) as err:
        print(f"megafusion train-decoder: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
