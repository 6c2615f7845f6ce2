"""The Transfusion recipe (``model.kind: transfusion``): the data a config reads, how a
step's micro-batches are made from it, and the loss, for ``megafusion.model.transfusion``.

- Data (``data.kind``): packed ShapesWorld sequences generated in-process (``shapes``,
  ``megafusion.data.shapes_stream``) or preprocessed indexed datasets (``indexed``,
  ``megafusion.data.indexed_stream``), where packed sample ``i`` is a pure function of
  (seed, i); or Energon WebDataset shards (``energon``, ``megafusion.data.energon_stream``),
  read in order, whose position is saved in the checkpoint (``data_state``).
- Micro-batches (``TransfusionProvider.batch``): flow-matching noise and time sampling per
  image/frame span (``megafusion.diffusion.flow.add_noise``), noise caps for spans that
  condition later text (``conditions_later_text``, ``diffusion.clean_fraction`` /
  ``frame_clean_fraction``), classifier-free-guidance caption dropout
  (``drop_text_condition``), and the frame-before context of video frames
  (``diffusion.frame_condition_noise``).
- Loss (``transfusion_loss``): mean next-token CE over text + ``diffusion.loss_weight`` x
  mean flow-matching MSE over latent loss positions.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch

from megafusion.config import Config, ConfigError, require_provider_config
from megafusion.config_checks import square_grid_problem, square_grid_width
from megafusion.data import synthetic
from megafusion.data.sample import IGNORE_INDEX, IMAGE, TEXT, VIDEO
from megafusion.diffusion.flow import add_noise
from megafusion.model.routing import ModalityContext
from megafusion.model.transfusion import build_transfusion_model
from megafusion.model.unet import latent_layout


# --------------------------------------------------------------------------- the loss


def transfusion_loss(batch: dict[str, torch.Tensor], loss_weight: float, output):
    """megatron loss function of one micro-batch.

    L = mean CE over text targets + loss_weight * mean flow-matching MSE over latent
    loss positions. Each micro-batch counts once (``num_tokens = 1``): every layout cuts the
    global batch into the same micro-batches, so the mean over micro-batches is
    layout-independent. Per-modality metrics are token-weighted [sum, count] pairs.
    """
    ce, latent_pred = output
    text_mask = batch["text_loss_mask"].float()
    ce_sum = (ce.float() * text_mask).sum()
    n_text = text_mask.sum()
    mse = (latent_pred.float() - batch["target"].float()).pow(2).mean(-1)  # [b, s]
    flow_mask = batch["flow_loss_mask"].float()
    mse_sum = (mse * flow_mask).sum()
    n_latent = flow_mask.sum()
    loss = ce_sum / n_text.clamp_min(1) + loss_weight * mse_sum / n_latent.clamp_min(1)

    def pair(values, mask):
        return torch.stack([(values * mask).sum().detach(), mask.sum()])

    is_image = (batch["modality"] == IMAGE).float() * flow_mask
    is_video = (batch["modality"] == VIDEO).float() * flow_mask
    metrics = {
        "loss": torch.stack([loss.detach(), torch.ones_like(loss)]),
        "loss_text": torch.stack([ce_sum.detach(), n_text]),
        "loss_image": pair(mse.detach(), is_image),
        "loss_video": pair(mse.detach(), is_video),
    }
    return loss, torch.tensor(1, dtype=torch.int, device=loss.device), metrics


# --------------------------------------------------------------------------- batch rules


def drop_text_condition(tokens: torch.Tensor, labels: torch.Tensor, modality: torch.Tensor,
                        doc_ids: torch.Tensor, drop: torch.Tensor, null_id: int):
    """Classifier-free-guidance condition dropout, on [B, N] tensors.

    In a flagged document (``drop``, set on all its positions by ``add_noise``) the text
    before its first image/frame span (the caption; the ``<boi>`` marker stays) is replaced
    by ``null_id`` in the model input and loses its next-token targets. Documents without
    a leading caption (text only, image first) are unchanged. Returns (tokens, labels).
    """
    B, N = tokens.shape
    index = torch.arange(N, device=tokens.device).expand(B, N)
    is_latent = modality != TEXT
    big = torch.full_like(index, N)
    first_latent = torch.full((B, int(doc_ids.max()) + 1), N, dtype=index.dtype, device=tokens.device)
    first_latent.scatter_reduce_(1, doc_ids, torch.where(is_latent, index, big), reduce="amin")
    first = first_latent.gather(1, doc_ids)  # N: the document has no latents
    before = (index < first - 1) & (first < N)  # strictly before <boi>
    dropped = drop & ~is_latent & before
    return torch.where(dropped, torch.full_like(tokens, null_id), tokens), \
        torch.where(dropped, torch.full_like(labels, IGNORE_INDEX), labels)


def conditions_later_text(labels: torch.Tensor, span_ids: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """[N] bool: latent positions whose span is followed, in its document, by text that has
    next-token targets beyond the span's own ``<eoi>`` (a captioning image, a video frame
    before more text/frames). Only these spans may be noise-capped (``clean_fraction``):
    a caption-first image (``caption <boi> image <eoi> <eod>``) is not. One sequence [N].
    """
    n = labels.shape[0]
    has_target = labels != IGNORE_INDEX
    # targets strictly after position i in its document (a contiguous run of one doc id):
    # count up to the run's last position minus count up to i
    count = torch.cumsum(has_target.long(), 0)
    last_of_run = torch.ones(n, dtype=torch.bool)
    last_of_run[:-1] = doc_ids[1:] != doc_ids[:-1]
    ends = last_of_run.nonzero().squeeze(1)
    run_end = ends[torch.searchsorted(ends, torch.arange(n))]
    after = torch.cat([count[run_end] - count, torch.zeros(1, dtype=torch.long)])
    out = torch.zeros(n, dtype=torch.bool)
    for span in span_ids.unique().tolist():
        if span < 0:
            continue
        idx = (span_ids == span).nonzero().squeeze(1)
        eoi = int(idx[-1]) + 1
        out[idx] = eoi < n and bool(doc_ids[eoi] == doc_ids[idx[0]]) and bool(after[eoi] > 0)
    return out


# --------------------------------------------------------------------------- the provider


class TransfusionProvider:
    """Builds the Transfusion model and feeds it packed samples: ShapesWorld in-process
    (``data.kind: shapes``), preprocessed indexed datasets (``data.kind: indexed``) or
    Energon-prepared WebDataset shards (``data.kind: energon``)."""

    metric_names = ("loss", "loss_text", "loss_image", "loss_video")

    def __init__(self, cfg: Config, transformer_config) -> None:
        from megafusion.data.indexed_stream import IndexedStream
        from megafusion.data.shapes_stream import ShapesStream

        # validate's checks of the data kind, the tokenizer's and datasets' vocabularies and the
        # patch grid (megafusion.config_checks); a validated config passes.
        require_provider_config(cfg)
        self.cfg = cfg
        self.transformer_config = transformer_config
        # shapes and indexed give packed sample i as a pure function of (seed, i); energon
        # (WebDataset shards read by megatron-energon) is sequential and keeps a saved position.
        if cfg.data.kind == "energon":
            from megafusion.data.energon_stream import EnergonStream

            self.stream = EnergonStream.from_config(cfg)
        else:
            self.stream = (ShapesStream if cfg.data.kind == "shapes" else IndexedStream).from_config(cfg)
        # A sequential stream is read in order in the training process (the trainer's
        # StepLoader builds no steps ahead in workers; the stream has its own workers).
        self.sequential_data = bool(getattr(self.stream, "sequential", False))
        self.latent_dim = self.stream.latent_dim  # from the representation, not the config
        self.modality_contexts: list[ModalityContext] = []  # one per built chunk
        self.unet_layout = None
        if cfg.model.patch_adapter == "unet":
            self.unet_layout = (*latent_layout(self.stream.representation), self.stream.tokens_per_image)
        # 2d and 3d share the (time, row, column) coordinates of rope_coordinates: the time
        # axis is each span's start position, so every video frame has its own time.
        self.image_grid_width = (self.square_grid(f"model.image_positions = {cfg.model.image_positions}")
                                 if cfg.model.image_positions in ("2d", "3d") else None)
        self.window_grid = (self.square_grid("model.frame_conditioning = window", " (use previous)")
                            if cfg.model.frame_conditioning == "window" else None)

    def square_grid(self, what: str, hint: str = "") -> int:
        """Patches per row of the representation's square patch grid. validate refuses a
        ``what`` that needs one without it (config_checks); the ConfigError here is only for a
        grid validate could not read without building the representation (pretrained RAE /
        VAE weights, whose grids are square by construction)."""
        width = square_grid_width(self.stream.tokens_per_image)
        if width is None:
            raise ConfigError(square_grid_problem(self.stream.tokens_per_image, what, hint))
        return width

    def step_metrics(self, model_chunks=None, group=None) -> dict[str, float]:
        """Per-layer, per-modality MoE routing statistics since the last call ({} without MoE).

        ``model_chunks`` (the trainer's wrapped chunks) is unused: the provider keeps the
        ModalityContext of every chunk it built. A collective over ``group`` (default: all
        ranks): call it on every rank at the same step.
        """
        from megafusion.model.moe import collect_routing_stats

        stats = collect_routing_stats(self.modality_contexts, group=group)
        if self.sequential_data:
            stats["data_skipped_samples"] = self._skipped_samples(group)
        return stats

    def _skipped_samples(self, group=None) -> float:
        """Corrupt samples skipped so far by all data-parallel ranks (a collective over ``group``)."""
        import torch.distributed as dist

        count = torch.tensor([float(self.stream.skipped)])
        if dist.is_available() and dist.is_initialized():
            from megatron.core import parallel_state as ps

            dist.all_reduce(count, group=ps.get_data_parallel_group())
        return float(count)

    # ----------------------------------------------------------------- data position
    def data_state(self) -> dict:
        """The sequential stream's position for the checkpoint (``{}`` for index-addressable
        streams, whose position is the step): every data-parallel rank's state, gathered, so
        the checkpoint's common state (written by rank 0) holds them all. A collective."""
        if not self.sequential_data:
            return {}
        import torch.distributed as dist

        blob = self.stream.state_dict()
        if not (dist.is_available() and dist.is_initialized()):
            return {"stream_states": [blob]}
        from megatron.core import parallel_state as ps

        group = ps.get_data_parallel_group()
        states = [None] * dist.get_world_size(group)
        dist.all_gather_object(states, blob, group=group)
        return {"stream_states": states}

    def load_data_state(self, saved: dict) -> None:
        """Restores ``data_state``'s position on this rank (before the first step)."""
        if not self.sequential_data:
            return
        states = saved.get("stream_states")
        if not states:
            raise ConfigError("the checkpoint holds no energon data position (it was written by a run with "
                              "another data.kind); start a new run directory for data.kind = energon")
        import torch.distributed as dist

        dp_rank, dp_size = 0, 1
        if dist.is_available() and dist.is_initialized():
            from megatron.core import parallel_state as ps

            dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        if len(states) != dp_size:
            raise ConfigError(f"the checkpoint's energon data position is for {len(states)} data-parallel ranks, "
                              f"this run has {dp_size}: Energon's loader state is per rank, so resume with the "
                              "same data-parallel size")
        self.stream.load_state_dict(states[dp_rank])

    @property
    def model_shape(self):
        """The sizes the trainer's FLOP counter needs (``megafusion.scaling.flops.ModelShape``)."""
        from megafusion.scaling.flops import ModelShape

        m = self.cfg.model
        shape = ModelShape.from_model_config({**self.cfg.to_dict()["model"], "latent_dim": self.latent_dim,
                                              "unet_layout": self.unet_layout})
        copies = {"ffn_copies": 2 if m.ffn == "modality" else 1,
                  "shared_expert_copies": 2 if m.moe.per_modality_shared_experts else 1}
        return dataclasses.replace(shape, **copies)

    def build(self, pre_process: bool, post_process: bool, vp_stage: int | None) -> torch.nn.Module:
        model, context = build_transfusion_model(
            self.cfg, self.transformer_config, pre_process, post_process, vp_stage, latent_dim=self.latent_dim,
            tokens_per_image=self.stream.tokens_per_image, unet_layout=self.unet_layout,
            image_grid_width=self.image_grid_width, frame_grid_width=self.window_grid)
        self.modality_contexts.append(context)
        return model

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """The training micro-batch of global sample ``indices``: a pure function of (seed, indices)."""
        t = self.cfg.train
        rows = []
        d = self.cfg.diffusion
        for i in indices:
            s = self.stream.sample(i)
            generator = torch.Generator().manual_seed(t.seed * 1_000_003 + int(i) + 17)
            cap_fraction = None
            if d.frame_clean_fraction is not None:
                cap_fraction = torch.where(s.modality == VIDEO, d.frame_clean_fraction, d.clean_fraction)
            noised = add_noise(s.latents, s.span_ids, s.clean_spans, d, generator,
                               image_loss_mask=s.image_loss_mask, doc_ids=s.doc_ids,
                               cap_eligible=conditions_later_text(s.labels, s.span_ids, s.doc_ids),
                               cap_fraction=cap_fraction, is_frame=s.modality == VIDEO)
            condition = s.latents
            if d.frame_condition_noise > 0:  # what the next frame reads as the frame before it
                std = d.frame_condition_noise * torch.rand((), generator=generator)
                noise = torch.randn(s.latents.shape, generator=generator)
                condition = s.latents + std * noise * (s.modality == VIDEO).unsqueeze(-1)
            rows.append((s, noised, condition))
        stack = lambda f: torch.stack([f(s, n) for s, n, _ in rows])  # noqa: E731
        tokens, labels = stack(lambda s, n: s.tokens), stack(lambda s, n: s.labels)
        modality, doc_ids = stack(lambda s, n: s.modality), stack(lambda s, n: s.doc_ids)
        drop = stack(lambda s, n: n.drop_condition)
        tokens, labels = drop_text_condition(tokens, labels, modality, doc_ids, drop,
                                             self.stream.tokenizer.pad_id)
        return {
            "tokens": tokens,
            "labels": labels,
            "text_loss_mask": labels != IGNORE_INDEX,
            "positions": stack(lambda s, n: s.positions),
            "doc_ids": doc_ids,
            "span_ids": stack(lambda s, n: s.span_ids),
            "modality": modality,
            "x_t": stack(lambda s, n: n.x_t),
            "clean_latents": torch.stack([c for _, _, c in rows]),
            "t": stack(lambda s, n: n.t),
            "target": stack(lambda s, n: n.target),
            "flow_loss_mask": stack(lambda s, n: n.loss_mask),
        }

    def micro_batches(self, step: int, dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
        t = self.cfg.train
        if self.sequential_data:
            self.stream.bind(dp_rank, dp_size)  # opens this rank's loaders once
        return [self.batch(idx) for idx in synthetic.micro_batch_indices(
            step, t.global_batch_size, t.micro_batch_size, dp_rank, dp_size)]

    def forward_step(self, batch: dict[str, torch.Tensor], model: torch.nn.Module):
        mask = torch.stack([batch["doc_ids"], batch["span_ids"]])  # HybridMaskInfo.as_tensor()
        output = model(batch["tokens"], batch["positions"], mask, latents=batch["x_t"], timesteps=batch["t"],
                       modality=batch["modality"], labels=batch["labels"], clean_latents=batch["clean_latents"])
        return output, partial(transfusion_loss, batch, self.cfg.diffusion.loss_weight)
