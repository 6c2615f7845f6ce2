"""Rectified-flow (flow-matching) paths for the image/frame latents of a packed sample.

Time convention, used everywhere in megafusion: **t = 0 is clean data, t = 1 is pure
noise**. The path between a clean latent ``x0`` and Gaussian noise ``eps`` is the straight
line::

    x_t = (1 - t) * x0 + t * eps          velocity  v = d x_t / dt = eps - x0

Sampling integrates the ODE from t = 1 down to t = 0 (``megafusion.diffusion.sampling``).

The network predicts one of three quantities, chosen by ``FlowMatchingConfig.prediction``:
``"x"`` (the clean latent, the default: best with RAE latents), ``"v"`` (the velocity, best
with VAE latents) or ``"eps"`` (the noise, as in Transfusion's DDPM). For a fixed ``x_t``
and ``t`` each is an affine function of the others (``convert``), so a prediction made in
any one can be read as any other. The conversions divide by ``t`` (from ``x``) or by
``1 - t`` (from ``eps``): x-prediction carries no velocity information at t = 0 and
eps-prediction none about ``x0`` at t = 1; those denominators are clamped at
``min_denominator`` and the samplers avoid evaluating there.

Timesteps are drawn once per *span* (an image, or one video frame: every frame is its own
span, so a video gets one timestep per frame) from a logit-normal distribution and then
shifted towards noise for large latents (``time_shift``, RAE's dimension-dependent shift).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

Prediction = Literal["x", "v", "eps"]
PREDICTIONS = ("x", "v", "eps")

#: Base latent dimension of RAE's shift rule: shift = sqrt(latent_dim / SHIFT_BASE_DIM).
SHIFT_BASE_DIM = 4096


@dataclass
class FlowMatchingConfig:
    """How latents are noised and what the network is trained to predict.

    - ``prediction``: ``"x"`` (clean latent), ``"v"`` (velocity ``eps - x0``) or ``"eps"``.
    - ``loss_weight``: lambda in ``L = L_text + lambda * L_image`` (applied by the training
      step; ``flow_matching_loss`` itself is unweighted). Default 3 (flow-matching study).
    - ``logit_normal_mean`` / ``logit_normal_std``: ``t = sigmoid(u)``, ``u ~ N(mean, std^2)``.
    - ``time_shift``: ``"auto"`` uses ``sqrt(latent_dim / 4096)`` per span, where
      ``latent_dim`` = positions in the span x latent channels (RAE); a float is one
      fixed shift for all spans; 1.0 disables the shift. Larger shift = more noise.
    - ``frame_time_shift``: the shift of video frames (None: ``time_shift``). Where the
      next frame is mostly the frame before, only nearly pure noise hides where things
      move, and only there must the model read the action: a larger shift trains there more.
    - ``clean_fraction``: fraction of (eligible) spans whose timestep is drawn uniformly in
      ``[0, clean_t_max]`` so that nearly clean images can condition text (captioning;
      Transfusion caps DDPM noise at t <= 500 of 1000 for 20% of image-caption pairs). These
      spans *keep* their diffusion loss, as in Transfusion.
    - ``clean_t_max``: the largest timestep of such a span, in (0, 1].
    - ``frame_clean_fraction``: the same fraction for video frames that condition later
      frames (None: ``clean_fraction``). At 1.0 every frame but a clip's last is nearly
      clean, so next-frame prediction from noise is learnt from one frame per clip; below
      1.0 the other frames are learnt from noise too, with a noisier context now and then.
    - ``frame_condition_noise``: in training, the frame-before input of each video frame
      (``model.frame_conditioning``) gets Gaussian noise of a std drawn uniformly in
      ``[0, this]`` per sample (GameNGen's context noise): a rollout feeds back its own,
      blurred frames, and a model that saw only clean ones copies their errors. 0 = none.
    - ``cfg_dropout``: probability that a span's (or a document's) text condition is
      dropped for classifier-free guidance; ``add_noise`` returns the flag, the model
      decides how to drop.
    - ``min_denominator``: clamp of ``t`` / ``1 - t`` in the parameterisation conversions.
    """

    prediction: Prediction = "x"
    loss_weight: float = 3.0
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    time_shift: Literal["auto"] | float = "auto"
    frame_time_shift: float | None = None
    clean_fraction: float = 0.2
    clean_t_max: float = 0.5
    frame_clean_fraction: float | None = None
    frame_condition_noise: float = 0.0
    cfg_dropout: float = 0.1
    min_denominator: float = 1e-5

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"flow.prediction={self.prediction!r}: choose one of {PREDICTIONS}")
        if not self.logit_normal_std > 0:
            raise ValueError(f"flow.logit_normal_std={self.logit_normal_std}: must be > 0")
        if isinstance(self.time_shift, str):
            if self.time_shift != "auto":
                try:
                    self.time_shift = float(self.time_shift)
                except ValueError:
                    raise ValueError(f"flow.time_shift={self.time_shift!r}: use 'auto' or a positive number") from None
        if not isinstance(self.time_shift, str) and not self.time_shift > 0:
            raise ValueError(f"flow.time_shift={self.time_shift}: must be 'auto' or > 0 (1.0 = no shift)")
        if self.frame_time_shift is not None and not self.frame_time_shift > 0:
            raise ValueError(f"flow.frame_time_shift={self.frame_time_shift}: must be > 0 (or null: time_shift)")
        if not 0.0 <= self.clean_fraction <= 1.0:
            raise ValueError(f"flow.clean_fraction={self.clean_fraction}: must lie in [0, 1]")
        if self.frame_clean_fraction is not None and not 0.0 <= self.frame_clean_fraction <= 1.0:
            raise ValueError(f"flow.frame_clean_fraction={self.frame_clean_fraction}: must lie in [0, 1] (or null)")
        if not self.frame_condition_noise >= 0.0:
            raise ValueError(f"flow.frame_condition_noise={self.frame_condition_noise}: must be >= 0 (0 = none)")
        if not 0.0 < self.clean_t_max <= 1.0:
            raise ValueError(f"flow.clean_t_max={self.clean_t_max}: must lie in (0, 1]")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"flow.cfg_dropout={self.cfg_dropout}: must lie in [0, 1)")
        if not 0.0 < self.min_denominator < 0.5:
            raise ValueError(f"flow.min_denominator={self.min_denominator}: must lie in (0, 0.5)")


# --------------------------------------------------------------------------- time


def auto_shift(latent_dim: int | float | torch.Tensor) -> float | torch.Tensor:
    """RAE's dimension-dependent shift ``sqrt(latent_dim / 4096)``; ``latent_dim`` is the
    number of latent scalars of one image or frame (positions x channels)."""
    if isinstance(latent_dim, torch.Tensor):
        return torch.sqrt(latent_dim.to(torch.float64) / SHIFT_BASE_DIM)
    return math.sqrt(latent_dim / SHIFT_BASE_DIM)


def resolve_shift(cfg: FlowMatchingConfig, latent_dim: int | float | torch.Tensor,
                  frame: bool = False) -> float | torch.Tensor:
    """The shift for a span of ``latent_dim`` scalars under ``cfg.time_shift`` (a video
    frame's: ``cfg.frame_time_shift`` where set)."""
    if frame and cfg.frame_time_shift is not None:
        return float(cfg.frame_time_shift)
    if cfg.time_shift == "auto":
        return auto_shift(latent_dim)
    return float(cfg.time_shift)


def time_shift(t: torch.Tensor, shift: float | torch.Tensor) -> torch.Tensor:
    """Maps ``t`` in [0, 1] to ``shift * t / (1 + (shift - 1) * t)``.

    Monotone, fixes 0 and 1, identity at ``shift == 1``; ``shift > 1`` moves every interior
    ``t`` towards 1, i.e. towards *more noise* (what large latents need, since their
    signal survives more noise).
    """
    shift = torch.as_tensor(shift, dtype=t.dtype, device=t.device)
    return shift * t / (1 + (shift - 1) * t)


def sample_logit_normal(shape: tuple[int, ...], cfg: FlowMatchingConfig, generator: torch.Generator | None = None,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """float32 timesteps ``sigmoid(u)``, ``u ~ N(cfg.logit_normal_mean, cfg.logit_normal_std^2)``."""
    u = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return torch.sigmoid(cfg.logit_normal_mean + cfg.logit_normal_std * u)


# --------------------------------------------------------------- parameterisations


def make_target(x0: torch.Tensor, noise: torch.Tensor, prediction: Prediction) -> torch.Tensor:
    """The regression target of ``prediction`` for clean ``x0`` and ``noise``."""
    if prediction == "x":
        return x0
    if prediction == "v":
        return noise - x0
    if prediction == "eps":
        return noise
    raise ValueError(f"prediction={prediction!r}: choose one of {PREDICTIONS}")


def convert(pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | float, src: Prediction, dst: Prediction,
            min_denominator: float = 1e-5) -> torch.Tensor:
    """Reads a prediction in parameterisation ``src`` as parameterisation ``dst``.

    ``pred`` and ``x_t`` share a shape [..., C]; ``t`` broadcasts against them (a float, or
    [...,1]). Uses ``x_t = (1-t) x0 + t eps`` and ``v = eps - x0``.
    """
    if src not in PREDICTIONS or dst not in PREDICTIONS:
        raise ValueError(f"convert {src!r} -> {dst!r}: both must be one of {PREDICTIONS}")
    if src == dst:
        return pred
    t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device)
    # First recover (x0, eps) from (pred, x_t), then form dst.
    if src == "x":
        x0 = pred
        eps = (x_t - (1 - t) * x0) / t.clamp_min(min_denominator)
    elif src == "eps":
        eps = pred
        x0 = (x_t - t * eps) / (1 - t).clamp_min(min_denominator)
    else:  # v
        x0 = x_t - t * pred
        eps = x_t + (1 - t) * pred
    if dst == "x":
        return x0
    if dst == "eps":
        return eps
    if src == "x":  # v = (x_t - x0) / t: one division, exact at the clamp
        return (x_t - x0) / t.clamp_min(min_denominator)
    if src == "eps":  # v = (eps - x_t) / (1 - t)
        return (eps - x_t) / (1 - t).clamp_min(min_denominator)
    return eps - x0


def to_velocity(pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | float, prediction: Prediction,
                min_denominator: float = 1e-5) -> torch.Tensor:
    """The ODE velocity ``d x_t / dt`` implied by a prediction (what the samplers step with)."""
    return convert(pred, x_t, t, prediction, "v", min_denominator)


def to_x0(pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | float, prediction: Prediction,
          min_denominator: float = 1e-5) -> torch.Tensor:
    """The clean latent implied by a prediction."""
    return convert(pred, x_t, t, prediction, "x", min_denominator)


# ------------------------------------------------------------------------- noising


class NoisedLatents(NamedTuple):
    """What ``add_noise`` returns; every field is [B, N] or [B, N, C] like the input.

    - ``x_t`` [B, N, C]: noised latents at latent positions, zeros at text positions.
    - ``t`` [B, N] float32: the timestep of each position's span; 0 at text and clean spans.
    - ``target`` [B, N, C]: the regression target in ``cfg.prediction``.
    - ``loss_mask`` [B, N] bool: positions that get the flow-matching loss.
    - ``drop_condition`` [B, N] bool: classifier-free-guidance dropout flag (whole spans,
      or whole documents when ``doc_ids`` was given); the model drops the text condition
      of flagged positions.
    - ``noise`` [B, N, C]: the Gaussian noise used (zeros at text positions).
    """

    x_t: torch.Tensor
    t: torch.Tensor
    target: torch.Tensor
    loss_mask: torch.Tensor
    drop_condition: torch.Tensor
    noise: torch.Tensor


def _span_index(span_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Numbers the (row, span) pairs of a batch 0..S-1. Returns the index per latent
    position (-1 at text), the number of positions per span [S], and S."""
    B, N = span_ids.shape
    is_latent = span_ids >= 0
    width = int(span_ids.max().item()) + 1 if is_latent.any() else 1
    row = torch.arange(B, device=span_ids.device).unsqueeze(1).expand(B, N)
    key = torch.where(is_latent, row * width + span_ids, -1)
    uniq, inverse = torch.unique(key[is_latent], return_inverse=True)
    index = torch.full_like(span_ids, -1)
    index[is_latent] = inverse
    sizes = torch.bincount(inverse, minlength=uniq.numel())
    return index, sizes, uniq.numel()


def _any_per_span(mask: torch.Tensor, index: torch.Tensor, S: int) -> torch.Tensor:
    """[S] bool: whether ``mask`` [B, N] is set at any latent position of each span."""
    hit = mask.bool() & (index >= 0)
    out = torch.zeros(S, dtype=torch.int64, device=mask.device)
    return out.index_add_(0, index[hit], torch.ones_like(index[hit])) > 0


def add_noise(
    sample_latents: torch.Tensor,
    span_ids: torch.Tensor,
    clean_spans: torch.Tensor,
    cfg: FlowMatchingConfig,
    generator: torch.Generator | None = None,
    *,
    image_loss_mask: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    cap_eligible: torch.Tensor | None = None,
    cap_fraction: torch.Tensor | None = None,
    is_frame: torch.Tensor | None = None,
) -> NoisedLatents:
    """Draws per-span timesteps and noise for a packed batch and builds the training target.

    Args:
        sample_latents: [B, N, C] (or [N, C]) clean latents (``Sample.latents``).
        span_ids: [B, N] int span index per position, -1 at text (``Sample.span_ids``).
        clean_spans: [B, N] bool, latent positions whose span stays clean: t = 0, no loss.
        cfg: the flow-matching configuration.
        generator: source of all randomness (timesteps, capping, CFG flags, noise).
        image_loss_mask: [B, N] bool (``Sample.image_loss_mask``); if given, the loss mask
            is additionally restricted to it.
        doc_ids: [B, N] (``Sample.doc_ids``); if given, CFG dropout is decided per document
            (every position of the document is flagged), otherwise per span.
        cap_eligible: [B, N] bool, latent positions whose span may be noise-capped (images
            that condition later text); default: every non-clean span.
        cap_fraction: [B, N] float, the capping probability of each position's span
            (e.g. ``frame_clean_fraction`` on video frames); default ``cfg.clean_fraction``.
        is_frame: [B, N] bool, latent positions of video frames (their spans take
            ``cfg.frame_time_shift``); default: none.

    Each span (an image, or one video frame) gets one timestep ``t = shift(sigmoid(u))``;
    a ``cfg.clean_fraction`` of eligible spans then has ``t`` redrawn uniformly in
    ``[0, cfg.clean_t_max]`` (they keep their loss); clean spans get ``t = 0`` and no loss.
    """
    unbatched = sample_latents.dim() == 2
    if unbatched:
        sample_latents, span_ids, clean_spans = sample_latents[None], span_ids[None], clean_spans[None]
        image_loss_mask = None if image_loss_mask is None else image_loss_mask[None]
        doc_ids = None if doc_ids is None else doc_ids[None]
        cap_eligible = None if cap_eligible is None else cap_eligible[None]
        cap_fraction = None if cap_fraction is None else cap_fraction[None]
        is_frame = None if is_frame is None else is_frame[None]
    if sample_latents.dim() != 3 or span_ids.shape != sample_latents.shape[:2] or clean_spans.shape != span_ids.shape:
        raise ValueError(
            f"add_noise: latents {tuple(sample_latents.shape)} must be [B, N, C] with span_ids and clean_spans "
            f"[B, N]; got span_ids {tuple(span_ids.shape)}, clean_spans {tuple(clean_spans.shape)}")
    device = sample_latents.device
    B, N, C = sample_latents.shape
    is_latent = span_ids >= 0
    index, sizes, S = _span_index(span_ids)

    # Draw on the generator's device so a CUDA generator works too, then move.
    draw_device = generator.device if generator is not None else device

    def per_span_uniform(n: int = S) -> torch.Tensor:
        return torch.rand(n, generator=generator, device=draw_device).to(device)

    t_span = sample_logit_normal((S,), cfg, generator, device=draw_device).to(device)
    shift = torch.as_tensor(resolve_shift(cfg, sizes * C), dtype=torch.float64, device=device)
    if is_frame is not None:
        frame_shift = torch.as_tensor(resolve_shift(cfg, sizes * C, frame=True), dtype=torch.float64, device=device)
        shift = torch.where(_any_per_span(is_frame, index, S), frame_shift, shift)
    t_span = time_shift(t_span, shift)

    def per_position(per_span: torch.Tensor) -> torch.Tensor:
        """[S] -> [B, N]; text positions (index -1) read an appended zero/False."""
        return torch.cat([per_span, per_span.new_zeros(1)])[index]

    span_clean = _any_per_span(clean_spans, index, S)
    eligible = ~span_clean
    if cap_eligible is not None:
        eligible &= _any_per_span(cap_eligible, index, S)
    fraction = cfg.clean_fraction
    if cap_fraction is not None:  # [S]: one value per span (its positions agree)
        latent = index >= 0
        fraction = torch.zeros(S, dtype=torch.float32, device=device).index_put_(
            (index[latent],), cap_fraction[latent].float())
    capped = eligible & (per_span_uniform() < fraction)
    # Uniform, not the shifted draw scaled down: a conditioning image is clean (t = 0) at
    # inference, and the scaled draw (median 0.19 of 0.25 at time_shift 3) came within 0.01
    # of 0 for under 1% of spans, so text after a clean image was out of distribution.
    t_span = torch.where(capped, per_span_uniform() * cfg.clean_t_max, t_span)
    t_span = torch.where(span_clean, torch.zeros_like(t_span), t_span)

    drop_span = per_span_uniform() < cfg.cfg_dropout
    if doc_ids is None:
        drop_condition = per_position(drop_span)
    else:
        # One independent flag per (row, document), set on all of its positions.
        doc_index, _, n_docs = _span_index(doc_ids)
        drop_doc = per_span_uniform(n_docs) < cfg.cfg_dropout
        drop_condition = torch.cat([drop_doc, drop_doc.new_zeros(1)])[doc_index]

    t = per_position(t_span)
    noise = torch.randn(sample_latents.shape, generator=generator, device=draw_device).to(device)
    noise = noise.to(sample_latents.dtype) * is_latent.unsqueeze(-1)
    x0 = sample_latents * is_latent.unsqueeze(-1)
    tt = t.unsqueeze(-1).to(sample_latents.dtype)
    x_t = (1 - tt) * x0 + tt * noise
    target = make_target(x0, noise, cfg.prediction)
    loss_mask = is_latent & ~per_position(span_clean)
    if image_loss_mask is not None:
        loss_mask &= image_loss_mask.bool()

    out = NoisedLatents(x_t, t, target, loss_mask, drop_condition, noise)
    if unbatched:
        out = NoisedLatents(*(f[0] for f in out))
    return out


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor,
                       reduction: Literal["mean", "none"] = "mean") -> torch.Tensor:
    """Mean squared error between ``pred`` and ``target`` [.., N, C] in the configured
    parameterisation, averaged over channels per position, then over ``loss_mask`` [.., N].

    ``reduction="none"`` returns the per-position loss [.., N] (zero outside the mask), for
    per-modality logging or a sum/count reduction across micro-batches. The mean of an
    empty mask is 0 (still connected to ``pred`` so backward works).
    """
    per_position = (pred.float() - target.float()).pow(2).mean(dim=-1) * loss_mask
    if reduction == "none":
        return per_position
    if reduction != "mean":
        raise ValueError(f"reduction={reduction!r}: use 'mean' or 'none'")
    return per_position.sum() / loss_mask.sum().clamp_min(1)
