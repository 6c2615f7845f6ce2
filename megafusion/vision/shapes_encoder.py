"""A tiny semantic image encoder pretrained on ShapesWorld: the RAE's frozen encoder where
no DINOv2 or SigLIP can be downloaded (the quickstart's pixel-against-RAE comparison).

An RAE encodes images with a representation model trained for semantics (DINOv2 by
self-distillation, SigLIP on image-text pairs) and trains only a decoder back to pixels.
Here a DINOv2-architecture ViT of a few hundred thousand weights learns what ShapesWorld
knows exactly: each patch token predicts the colour, shape and size of the object whose grid
cell holds it (or none), and the mean token the image's object count. It is saved with
``save_pretrained`` and a ``preprocessor_config.json``, so it loads like any DINOv2
directory: ``megafusion train-decoder --encoder-path DIR``, ``load_representation("rae", DIR)``.

    from megafusion.vision.shapes_encoder import pretrain_shapes_encoder
    result = pretrain_shapes_encoder(WorldConfig.simple(), "runs/encoder", steps=1500)
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from megafusion.vision.images import to_tensor

# Pixel statistics of the saved encoder: inputs in [0, 1] map to [-1, 1].
PIXEL_MEAN = PIXEL_STD = (0.5, 0.5, 0.5)
ATTRIBUTES = ("colors", "shapes", "sizes")


def patch_labels(scene, patch_size: int, vocab) -> np.ndarray:
    """[grid_h * grid_w, 3] int64: per patch (row-major), the colour, shape and size index + 1
    of the object whose grid cell holds the patch centre; 0 where that cell is empty."""
    from megafusion.data.shapes.scene import cell_edges

    n = scene.image_size // patch_size
    centres = np.arange(n) * patch_size + patch_size / 2
    cell = np.searchsorted(cell_edges(scene.image_size, vocab.grid), centres, side="right") - 1
    labels = np.zeros((n, n, len(ATTRIBUTES)), np.int64)
    for obj in scene.objects:
        inside = np.outer(cell == obj.row, cell == obj.col)
        values = [getattr(vocab, a).index(v) + 1 for a, v in zip(ATTRIBUTES, (obj.color, obj.shape, obj.size))]
        labels[inside] = values
    return labels.reshape(n * n, len(ATTRIBUTES))


class ShapesBatches:
    """Rendered scenes of a world and their labels, drawn by index (deterministic per seed)."""

    def __init__(self, config, patch_size: int) -> None:
        from megafusion.data.shapes import ShapesWorld

        self.world = ShapesWorld(config=config)
        self.vocab, self.patch_size = config.vocab, patch_size

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images [B, 3, S, S] in [0, 1], patch labels [B, tokens, 3], object counts [B])."""
        from megafusion.data.shapes.scene import render_scene

        scenes = [self.world.scene(int(i)) for i in indices]
        images = torch.stack([to_tensor(render_scene(s)) for s in scenes])
        labels = np.stack([patch_labels(s, self.patch_size, self.vocab) for s in scenes])
        return images, torch.from_numpy(labels), torch.tensor([len(s.objects) for s in scenes])


class LabelHeads(nn.Module):
    """Linear read-outs of the encoder's tokens: one per attribute (per patch) and the count (pooled)."""

    def __init__(self, hidden: int, classes: list[int], max_objects: int) -> None:
        super().__init__()
        self.attributes = nn.ModuleList(nn.Linear(hidden, c) for c in classes)
        self.count = nn.Linear(hidden, max_objects + 1)

    def loss_and_accuracy(self, tokens: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor
                          ) -> tuple[torch.Tensor, float, float]:
        """tokens [B, T, D] -> (summed cross-entropy, patches with every attribute right, counts right)."""
        loss, right = 0.0, torch.ones(labels.shape[:2], dtype=torch.bool, device=labels.device)
        for k, head in enumerate(self.attributes):
            logits = head(tokens)
            loss = loss + F.cross_entropy(logits.flatten(0, 1), labels[..., k].flatten())
            right &= logits.argmax(-1) == labels[..., k]
        count_logits = self.count(tokens.mean(1))
        loss = loss + F.cross_entropy(count_logits, counts)
        return loss, right.float().mean().item(), (count_logits.argmax(-1) == counts).float().mean().item()


def pretrain_shapes_encoder(config, out_dir: str | Path, steps: int = 1500, batch_size: int = 64,
                            hidden_size: int = 64, layers: int = 4, heads: int = 4, patch_size: int = 8,
                            lr: float = 1e-3, heldout: int = 256, device: str | torch.device = "cpu",
                            log_every: int = 100) -> dict:
    """Trains the encoder on scenes of ``config`` (a WorldConfig) and saves it under ``out_dir``.

    Training scenes are indices [heldout, ...) of the world; the first ``heldout`` are held out.
    Returns (and writes to ``out_dir/pretraining.json``) the held-out accuracy before and after:
    ``patch_accuracy`` (patches with colour, shape and size right) and ``count_accuracy``, with
    ``chance``: always answering the most frequent label.
    """
    import transformers

    out_dir = Path(out_dir)
    torch.manual_seed(config.seed)
    vocab = config.vocab
    model = transformers.Dinov2Model(transformers.Dinov2Config(
        image_size=config.image_size, patch_size=patch_size, hidden_size=hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, mlp_ratio=2)).to(device)
    heads_ = LabelHeads(hidden_size, [len(getattr(vocab, a)) + 1 for a in ATTRIBUTES], config.max_objects).to(device)
    data = ShapesBatches(config, patch_size)
    mean = torch.tensor(PIXEL_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=device).view(1, 3, 1, 1)

    def tokens(images: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=(images.to(device) - mean) / std).last_hidden_state[:, 1:]  # drop CLS

    held = [t.to(device) for t in data.batch(range(heldout))]

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        _, patches, counts = heads_.loss_and_accuracy(tokens(held[0]), held[1], held[2])
        model.train()
        return {"patch_accuracy": patches, "count_accuracy": counts}

    before = evaluate()
    params = list(model.parameters()) + list(heads_.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = np.random.default_rng(config.seed)
    for step in range(1, steps + 1):
        images, labels, counts = data.batch(heldout + rng.integers(0, 10_000_000, batch_size))
        loss, patches, _ = heads_.loss_and_accuracy(tokens(images), labels.to(device), counts.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            print(f"[encoder] step {step}/{steps} loss {loss.item():.4f} patch accuracy {patches:.3f}", flush=True)
    after = evaluate()

    out_dir.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(out_dir)
    (out_dir / "preprocessor_config.json").write_text(json.dumps({"image_mean": list(PIXEL_MEAN),
                                                                  "image_std": list(PIXEL_STD)}))
    # baselines: always the most frequent label (of a patch; of an image's count)
    majority = lambda x: torch.unique(x, dim=0, return_counts=True)[1].max().item() / len(x)  # noqa: E731
    chance = {"patch_accuracy": majority(held[1].flatten(0, 1)), "count_accuracy": majority(held[2])}
    result = {"steps": steps, "heldout": heldout, "before": before, "after": after, "chance": chance,
              "world": dataclasses.asdict(config)}
    (out_dir / "pretraining.json").write_text(json.dumps(result, indent=2))
    return result
