"""Small input/output adapters of the Transfusion model: latent patches in and out, and
the diffusion timestep embedding.

They are replicated across tensor-parallel ranks (plain ``nn.Linear``) and applied to the
*whole* sequence: ``PatchIn``/``TimestepEmbedding`` before the sequence-parallel scatter,
``PatchOut`` after the gather, so every TP rank computes identical gradients for them and
no extra all-reduce is needed. Biases start at zero so that every parallel layout starts
from the same model (``megafusion.model.init`` redraws the matrices by checkpoint key).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megafusion.data.sample import VIDEO


def _zero_bias(linear: nn.Linear) -> nn.Linear:
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


class PatchIn(nn.Module):
    """Linear patch embedding: latents [..., C] -> [..., hidden]."""

    def __init__(self, latent_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = _zero_bias(nn.Linear(latent_dim, hidden_size))

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.proj(latents)

    def forward_sparse(self, latents: torch.Tensor) -> torch.Tensor:
        """``forward`` for inputs that are zero at most positions (the frame-before input is
        zero at text and images): the matrix product runs on the nonzero rows only, which
        matters for the 9x wider 3x3-window input."""
        rows = latents.ne(0).any(-1)
        out = self.proj.bias.to(latents.dtype).expand(*latents.shape[:-1], -1).clone()
        out[rows] += nn.functional.linear(latents[rows], self.proj.weight.to(latents.dtype))
        return out


class FrameActionIn(nn.Module):
    """The action input of a video frame (``model.action_conditioning: embedding``): the
    mean word embedding of the text before the frame (``mean_between_frames``) [..., hidden]
    -> [..., hidden]. RMS-normalised first: word embeddings are drawn at init_std (0.02), and
    so small an input was drowned by the noised patch it is added to."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.proj = nn.Linear(hidden_size, hidden_size, bias=False)  # no bias: no action, no input

    def forward(self, mean_embedding: torch.Tensor) -> torch.Tensor:
        x = mean_embedding.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)  # zeros stay zeros
        return self.proj(x.to(mean_embedding.dtype))


class PatchOut(nn.Module):
    """Linear latent head: hidden [..., hidden] -> [..., C] (the flow-matching prediction)."""

    def __init__(self, hidden_size: int, latent_dim: int) -> None:
        super().__init__()
        self.proj = _zero_bias(nn.Linear(hidden_size, latent_dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, scale: float = 1000.0
                         ) -> torch.Tensor:
    """[...] timesteps in [0, 1] -> [..., dim] float32 (DiT's frequency embedding of ``scale * t``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (scale * t.float())[..., None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
    return emb


class TimestepEmbedding(nn.Module):
    """t [...] in [0, 1] -> [..., hidden]: sinusoidal features, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            _zero_bias(nn.Linear(frequency_dim, hidden_size)),
            nn.SiLU(),
            _zero_bias(nn.Linear(hidden_size, hidden_size)),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_embedding(t, self.frequency_dim)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def span_offsets(span_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """span_ids [b, s] (-1 at text) -> (k, start) [b, s] int64: the index of each latent
    position inside its (contiguous) span, and the sequence index where that span starts
    (meaningless at text positions)."""
    b, s = span_ids.shape
    index = torch.arange(s, device=span_ids.device).expand(b, s)
    previous = torch.cat([torch.full_like(span_ids[:, :1], -1), span_ids[:, :-1]], dim=1)
    starts = (span_ids >= 0) & (span_ids != previous)
    start = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
    return index - start, start


def previous_frame_index(span_ids: torch.Tensor, modality: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] int64: for each patch of a video frame, the sequence index of the patch at the
    same place in the frame before it (the nearest earlier span, if it is a frame of the
    same document and that long); -1 elsewhere (text, images, a clip's first frame).

    span_ids, modality, doc_ids: [b, s] (``Sample`` fields).
    """
    b, s = span_ids.shape
    k, start = span_offsets(span_ids)
    index = torch.arange(s, device=span_ids.device).expand(b, s)
    is_latent = span_ids >= 0
    # The start of the latest span beginning at or before each index, then the one before a
    # span's own start: the previous span's start (-1: none).
    latest = torch.cummax(torch.where(is_latent & (index == start), index, torch.full_like(index, -1)), dim=1).values
    before_start = torch.where(start > 0, start - 1, torch.zeros_like(start))
    prev_start = torch.where(start > 0, latest.gather(1, before_start), torch.full_like(start, -1))
    safe_prev = prev_start.clamp_min(0)
    source = safe_prev + k
    valid = (is_latent & (modality == VIDEO) & (prev_start >= 0)
             & (modality.gather(1, safe_prev) == VIDEO) & (doc_ids.gather(1, safe_prev) == doc_ids)
             & (source < s))
    safe_source = source.clamp_max(s - 1)
    # the patch at offset k must still lie in that previous span
    valid &= (span_ids.gather(1, safe_source) == span_ids.gather(1, safe_prev)) & (safe_source < start)
    return torch.where(valid, safe_source, torch.full_like(source, -1))


def mean_between_frames(values: torch.Tensor, span_ids: torch.Tensor, modality: torch.Tensor,
                        doc_ids: torch.Tensor) -> torch.Tensor:
    """[b, s, h]: for each patch of a video frame, the mean of ``values`` [b, s, h] over the
    text positions between the frame before it (the nearest earlier span, a frame of the same
    document) and it: in action-conditioned video, the action that moved one to the other.
    Zeros elsewhere (text, images, a clip's first frame, frames with no text between)."""
    b, s = span_ids.shape
    _, start = span_offsets(span_ids)
    index = torch.arange(s, device=span_ids.device).expand(b, s)
    is_latent = span_ids >= 0
    # the last latent position before each span's start: the end of the span before it
    last_latent = torch.cummax(torch.where(is_latent, index, torch.full_like(index, -1)), dim=1).values
    prev_end = torch.where(start > 0, last_latent.gather(1, (start - 1).clamp_min(0)), torch.full_like(start, -1))
    safe_end = prev_end.clamp_min(0)
    count = start - 1 - prev_end  # text positions strictly between the two spans
    valid = (is_latent & (modality == VIDEO) & (prev_end >= 0) & (count > 0)
             & (modality.gather(1, safe_end) == VIDEO) & (doc_ids.gather(1, safe_end) == doc_ids))
    # prefix[j] = sum of values[:, :j]: the sum over (prev_end, start) is prefix[start] - prefix[prev_end + 1]
    prefix = torch.cat([values.new_zeros(b, 1, values.shape[-1], dtype=torch.float32),
                        values.float().cumsum(dim=1)], dim=1)
    pick = lambda i: prefix.gather(1, i.unsqueeze(-1).expand(-1, -1, values.shape[-1]))  # noqa: E731
    mean = (pick(start) - pick(safe_end + 1)) / count.clamp_min(1).unsqueeze(-1)
    return (mean * valid.unsqueeze(-1)).to(values.dtype)


def previous_window_index(span_ids: torch.Tensor, modality: torch.Tensor, doc_ids: torch.Tensor,
                          grid: int) -> torch.Tensor:
    """[b, s, 9] int64: for each patch of a video frame, the sequence indices of the 3x3
    window of patches around its place in the frame before it (row-major, the centre is
    ``previous_frame_index``); -1 where the window leaves the ``grid`` x ``grid`` frame and
    at positions without a previous frame."""
    s = span_ids.shape[1]
    centre = previous_frame_index(span_ids, modality, doc_ids)
    centre_span = span_ids.gather(1, centre.clamp_min(0))
    k, _ = span_offsets(span_ids)
    row, col = k // grid, k % grid
    out = []
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            source = centre + dr * grid + dc
            valid = ((centre >= 0) & (row + dr >= 0) & (row + dr < grid) & (col + dc >= 0) & (col + dc < grid)
                     & (source < s))
            # a short previous frame may end before the neighbour
            valid &= span_ids.gather(1, source.clamp(0, s - 1)) == centre_span
            out.append(torch.where(valid, source, torch.full_like(centre, -1)))
    return torch.stack(out, dim=-1)


def gather_previous_frames(latents: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """latents [b, s, C], index [b, n] (``previous_frame_index``) or [b, n, w]
    (``previous_window_index``; n <= s: some rows of it) -> [b, n, C] or [b, n, w * C]: the
    latents of each position's previous-frame patches, zeros where the index is -1."""
    b, n = index.shape[:2]
    flat = index.reshape(b, -1)
    picked = latents.gather(1, flat.clamp_min(0).unsqueeze(-1).expand(-1, -1, latents.shape[-1]))
    picked = picked * (flat >= 0).unsqueeze(-1).to(latents.dtype)
    return picked.reshape(b, n, -1)


class PatchPositionEmbedding(nn.Module):
    """Learned absolute position of a patch inside its image/frame (``model.patch_positions:
    learned``): span_ids [b, s] -> [b, s, hidden], row k of the table for the k-th patch of a
    span (row-major), zeros at text positions. Frames of a video share the table, so the
    same place in consecutive frames carries the same vector (what copying attends by)."""

    def __init__(self, tokens_per_image: int, hidden_size: int) -> None:
        super().__init__()
        self.tokens_per_image = tokens_per_image
        self.table = nn.Embedding(tokens_per_image, hidden_size)

    def forward(self, span_ids: torch.Tensor) -> torch.Tensor:
        k, _ = span_offsets(span_ids)
        is_latent = span_ids >= 0
        if bool((k[is_latent] >= self.tokens_per_image).any()):
            raise ValueError(f"a span holds more than tokens_per_image = {self.tokens_per_image} patches; "
                             "every image/frame span must hold exactly one image")
        rows = self.table(torch.where(is_latent, k, torch.zeros_like(k)))
        return rows * is_latent.unsqueeze(-1).to(rows.dtype)


def rope_axis_of_frequency(n: int, layout: str) -> torch.Tensor:
    """[n] int64 in {0, 1, 2}: the ``rope_coordinates`` axis (time, row, column) that rotates
    RoPE frequency i (0 = the highest). ``contiguous``: thirds, time first (M-RoPE), so the
    row and column axes get only the lowest frequencies; ``interleaved``: row, column, time,
    row, ... (Qwen3-VL interleaves likewise), so neighbouring rows and columns differ by a
    large angle even with few frequencies. Text positions rotate alike either way (they
    carry the same coordinate on every axis)."""
    i = torch.arange(n)
    if layout == "contiguous":
        return i * 3 // n
    if layout == "interleaved":
        return torch.tensor([1, 2, 0])[i % 3]
    raise ValueError(f"rope layout {layout!r}: use 'contiguous' or 'interleaved'")


def rope_coordinates(positions: torch.Tensor, span_ids: torch.Tensor, grid_width: int) -> torch.Tensor:
    """2-D RoPE coordinates (``model.image_positions: 2d``), M-RoPE style: [3, b, s] int64.

    The three axes are (time, row, column). A text position uses its 1-D position on every
    axis, so text rotates exactly as with 1-D RoPE. Patch k of an image/frame span whose
    first patch sits at 1-D position p0 gets (p0, p0 + k // grid_width, p0 + k % grid_width):
    patches of one row share a row coordinate, one column a column coordinate, and every
    frame of a video has its own time p0. ``positions``/``span_ids``: [b, s] (``Sample``);
    spans are contiguous and laid out row-major (``megafusion.vision`` patchify order).
    """
    is_latent = span_ids >= 0
    k, start_index = span_offsets(span_ids)
    p0 = positions.gather(1, start_index)
    time = torch.where(is_latent, p0, positions)
    row = torch.where(is_latent, p0 + k // grid_width, positions)
    col = torch.where(is_latent, p0 + k % grid_width, positions)
    return torch.stack([time, row, col])
