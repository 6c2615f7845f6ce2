"""What TensorBoard shows besides scalars: sample image grids and MoE routing heatmaps.

``sample_grid``: every ``logging.sample_every`` steps the training model itself (no second
copy) draws an image for each of ``logging.sample_prompts`` with a few ODE steps
(``logging.sample_steps``); :class:`~megafusion.training.metrics.MetricsWriter` writes the
grid as the ``samples`` image. Sampling runs in eval mode under ``torch.no_grad`` with the
RNG state (python, numpy, torch, CUDA and megatron's tracker) put back afterwards and MoE
routing counts not recorded, so a run's losses and metrics are bit-identical with and
without it. ``validate`` allows it at world size 1 only (the whole model in one process).

``routing_heatmap``: the per-layer, per-modality share of tokens sent to each expert (the
``moe/layerL/frac_M_tokens_expertE`` metrics) as one [layer x expert] panel per modality,
rendered with matplotlib's Agg canvas (pyplot is never imported).
"""

from __future__ import annotations

import contextlib
import random
import re
from typing import Any, Iterator, Sequence

import numpy as np
import torch

HEATMAP_TAG = "moe/routing_heatmap"
SAMPLES_TAG = "samples"


@contextlib.contextmanager
def preserved_rng(device: torch.device | None = None) -> Iterator[None]:
    """Runs the block and puts every RNG state back as it was before it."""
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = device is not None and device.type == "cuda" and torch.cuda.is_available()
    cuda_state = torch.cuda.get_rng_state(device) if cuda else None
    tracker_states = None
    if cuda:
        from megatron.core import tensor_parallel

        tracker_states = tensor_parallel.get_cuda_rng_tracker().get_states()
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda:
            torch.cuda.set_rng_state(cuda_state, device)
            from megatron.core import tensor_parallel

            tensor_parallel.get_cuda_rng_tracker().set_states(tracker_states)


def grid_array(images: Sequence[np.ndarray], ncols: int | None = None, pad: int = 2, scale: int = 2) -> np.ndarray:
    """[H, W, 3] uint8 images as one [H', W', 3] uint8 grid (as ``vision.images.save_grid`` draws it)."""
    from megafusion.vision.images import as_uint8

    tiles = [np.repeat(np.repeat(as_uint8(im), scale, 0), scale, 1) for im in images]
    h, w = tiles[0].shape[:2]
    ncols = ncols or len(tiles)
    nrows = -(-len(tiles) // ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 128, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = tile
    return grid


def sample_grid(model_chunks: list[torch.nn.Module], provider: Any, cfg, device: torch.device) -> np.ndarray:
    """One image per ``cfg.logging.sample_prompts`` from the training model (world size 1):
    an [H, W, 3] uint8 grid. The model, its routing counts and every RNG are left as found."""
    from megafusion.inference.generate import Generator, SamplingOptions
    from megafusion.model.routing import model_contexts
    from megafusion.training.checkpoint import unwrap

    if len(model_chunks) != 1:
        raise ValueError("sample_grid needs the whole model in one chunk (world size 1, no virtual pipeline)")
    model = unwrap(model_chunks[0])
    stream = provider.stream
    world = getattr(stream, "world", None)
    contexts = model_contexts(model)
    was_training, recording = model.training, [ctx.recording for ctx in contexts]
    try:
        with preserved_rng(device), torch.no_grad():
            for ctx in contexts:
                ctx.recording = False  # sampling is no training step: the routing metrics leave it out
            # The triton attention kernel needs as many queries as keys: recompute instead of caching.
            generator = Generator(model, cfg, stream.tokenizer, stream.representation, device,
                                  use_cache=cfg.model.attention != "triton",
                                  world_config=world.config if world is not None else None)
            images = [generator.generate_image(prompt, SamplingOptions(steps=cfg.logging.sample_steps, seed=i))
                      for i, prompt in enumerate(cfg.logging.sample_prompts)]
    finally:
        model.train(was_training)
        for ctx, was in zip(contexts, recording):
            ctx.recording = was
    return grid_array(images)


_FRAC = re.compile(r"^moe/layer(\d+)/frac_(text|image|video)_tokens_expert(\d+)$")


def routing_fractions(metrics: dict[str, Any]) -> dict[str, np.ndarray]:
    """modality -> [layers, experts] share of its tokens routed to each expert (NaN: no such
    tokens in that layer), from the ``moe/layerL/frac_M_tokens_expertE`` metrics; {} without."""
    found = [(m.group(2), int(m.group(1)), int(m.group(3)), float(v))
             for k, v in metrics.items() if (m := _FRAC.match(k)) and isinstance(v, (int, float))]
    if not found:
        return {}
    layers = max(f[1] for f in found) + 1
    experts = max(f[2] for f in found) + 1
    out: dict[str, np.ndarray] = {}
    for modality in ("text", "image", "video"):
        rows = [f for f in found if f[0] == modality]
        if rows:
            grid = np.full((layers, experts), np.nan)
            for _, layer, expert, value in rows:
                grid[layer, expert] = value
            out[modality] = grid
    return out


def routing_heatmap(metrics: dict[str, Any], step: int) -> np.ndarray | None:
    """The routing fractions as an [H, W, 3] uint8 image: one [layer x expert] panel per
    modality (matplotlib, Agg canvas); None when ``metrics`` has no routing statistics."""
    fractions = routing_fractions(metrics)
    if not fractions:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers, experts = next(iter(fractions.values())).shape
    figure = Figure(figsize=(1.2 + 2.2 * len(fractions) + 0.15 * experts * len(fractions), 1.2 + 0.3 * layers),
                    dpi=80, layout="constrained")
    canvas = FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(fractions), squeeze=False)[0]
    vmax = max(float(np.nanmax(grid)) if np.isfinite(grid).any() else 0.0 for grid in fractions.values()) or 1.0
    for ax, (modality, grid) in zip(axes, fractions.items()):
        shown = ax.imshow(np.ma.masked_invalid(grid), vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set_title(modality, fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_xticks(range(experts))
        ax.set_yticks(range(layers))
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("layer", fontsize=8)
    figure.colorbar(shown, ax=list(axes), shrink=0.9, label="share of tokens")
    figure.suptitle(f"MoE routing, step {step}", fontsize=9)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()
