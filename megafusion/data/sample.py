"""The packed training sample: the one format the data pipeline produces and the model reads.

A sequence has N positions. Each position is either a text token (ordinary tokens and
the begin/end-of-image marker tokens) or one continuous latent patch of an image or a
video frame. The patches of one image (or one frame) form a *span*: they sit between its
begin-of-image and end-of-image markers and attend to each other bidirectionally.

Attention rule (what every attention backend implements)::

    i sees j  iff  doc_ids[i] == doc_ids[j]
                   and (j <= i or (span_ids[i] >= 0 and span_ids[i] == span_ids[j]))

Noise is not part of the sample: the diffusion code draws timesteps and noise in the
training step, so the same data can be reused with any noise schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

# Values of `modality`.
TEXT, IMAGE, VIDEO = 0, 1, 2
MODALITY_NAMES = {TEXT: "text", IMAGE: "image", VIDEO: "video"}

IGNORE_INDEX = -100  # label of positions without a next-token target


@dataclass
class Sample:
    """One packed sequence, or a batch of them (every field then gains a leading B).

    Shapes for one sequence of N positions and latent width C:

    - ``tokens`` [N] int64: token ids; at latent positions the pad id (never read).
    - ``labels`` [N] int64: the next-token target of a text position, ``IGNORE_INDEX``
      where there is none (the last token of a document, a token followed by an image
      patch, latent positions, padding).
    - ``latents`` [N, C] float32: clean (normalised) latent patches at latent positions,
      zeros elsewhere.
    - ``modality`` [N] int64: ``TEXT``, ``IMAGE`` or ``VIDEO`` per position.
    - ``doc_ids`` [N] int64: packed document index, 0.. in order; padding gets its own id.
    - ``span_ids`` [N] int64: image/frame span index, unique within the pack; -1 for text.
    - ``positions`` [N] int64: position inside its document (restarts at 0), for RoPE.
    - ``clean_spans`` [N] bool: latent positions whose span must stay clean (a
      conditioning frame of action-conditioned video, say); they get no diffusion loss.
    - ``image_loss_mask`` [N] bool: latent positions that get the flow-matching loss.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    latents: torch.Tensor
    modality: torch.Tensor
    doc_ids: torch.Tensor
    span_ids: torch.Tensor
    positions: torch.Tensor
    clean_spans: torch.Tensor
    image_loss_mask: torch.Tensor

    @property
    def text_loss_mask(self) -> torch.Tensor:
        """[.., N] bool: positions with a next-token target."""
        return self.labels != IGNORE_INDEX

    def to(self, device: torch.device | str) -> "Sample":
        return Sample(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @staticmethod
    def collate(samples: list["Sample"]) -> "Sample":
        """Stacks equally long samples into a batch [B, N, ...]."""
        lengths = {s.tokens.shape[-1] for s in samples}
        if len(lengths) != 1:
            raise ValueError(f"cannot collate samples of different lengths {sorted(lengths)}; pack them first")
        return Sample(**{f.name: torch.stack([getattr(s, f.name) for s in samples]) for f in fields(Sample)})
