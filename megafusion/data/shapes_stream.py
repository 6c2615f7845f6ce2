"""ShapesWorld -> packed ``Sample``s, in-process (``data.kind: shapes``): data with no download.

Packed sequence ``i`` is a pure function of ``(seed, i)``: its ``j``-th document is drawn
with a generator keyed on ``(seed, i, j)`` (the source by ``data.shapes_weights``, then a
ShapesWorld index), so any data-parallel layout and any resume read the same data.
With ``data.shapes_holdout: compositions`` the world's held-out compositions
(``megafusion.data.shapes.holdout``) occur in no document of any source: each ShapesWorld
sample is redrawn from its own generator until it holds none, so it stays a pure function of
``(seed, index)``.
Documents are appended greedily until the next one does not fit; the rest is padding.

Document layouts (``<boi> latents <eoi>`` is one image/frame span, written by the packer):

- ``text``: a ShapesWorld text document, ``<eod>``.
- ``image_text``: caption ``<boi> image <eoi>`` ``<eod>`` (generation) or, with
  probability ``caption_first_prob`` complement, ``<boi> image <eoi>`` caption ``<eod>``
  (captioning).
- ``vqa``: ``<boi> image <eoi>`` then the image's questions and answers
  (``Question: .. Answer: ..`` each, ``megafusion.data.shapes.vqa_document``), ``<eod>``.
- ``video``: caption, then the frames separated by ``<frame>``, ``<eod>``; one span per frame.
- ``action_video``: caption, then each frame followed by the action token that moves it to
  the next one; the first ``context_frames`` frames are clean (conditioning, no loss).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from megafusion.data.packing import Document, Segment, SequencePacker, pack_drawn_documents
from megafusion.data.sample import IMAGE, VIDEO, Sample
from megafusion.data.shapes import ShapesWorld, WorldConfig, vqa_document

SOURCES = ("text", "image_text", "video", "action_video", "vqa")
_MAX_DOCS = 64  # per sequence; a guard, far above what fits


def load_tokenizer(path: str | None, type: str | None = "SentencePieceTokenizer"):
    """The byte tokenizer for ``None``, else ``type`` (``data.tokenizer_type``) loaded from ``path``
    (``megafusion.data.tokenizer.load_tokenizer``, the one factory)."""
    from megafusion.data.tokenizer import load_tokenizer as load

    return load(path, type)


@dataclass
class ShapesStream:
    """Index-addressable packed samples of ``seq_len`` positions.

    ``representation``: a ``megafusion.vision`` representation (images -> [T, C] latents).
    ``weights``: source -> mixture weight (missing sources weigh 0).
    ``world``: the ShapesWorld; its clip lengths decide how long video documents are.
    """

    seed: int
    seq_len: int
    tokenizer: object
    representation: object
    weights: dict[str, float]
    world: ShapesWorld
    caption_first_prob: float = 0.8

    def __post_init__(self):
        unknown = sorted(set(self.weights) - set(SOURCES))
        if unknown:
            raise ValueError(f"data.shapes_weights has unknown sources {unknown}; choose from {list(SOURCES)}")
        w = np.array([max(float(self.weights.get(s, 0.0)), 0.0) for s in SOURCES])
        if w.sum() <= 0:
            raise ValueError(f"data.shapes_weights = {self.weights}: at least one source needs a positive weight")
        self._probs = w / w.sum()
        tok = self.tokenizer
        self.packer = SequencePacker(self.seq_len, self.latent_dim, tok.pad_id, tok.boi_id, tok.eoi_id)

    @classmethod
    def from_config(cls, cfg) -> "ShapesStream":
        from megafusion.vision import representation_from_config

        v = cfg.vision
        rep = representation_from_config(v)
        # Clips short enough that a video document fits a tiny sequence next to its caption.
        # data.shapes_holdout: the held-out compositions never occur in any source (the eval's unseen split).
        clips = dict(seed=cfg.train.seed, image_size=v.image_size, video_frames=4, action_frames=4, context_frames=1,
                     holdout=cfg.data.shapes_holdout)
        world = ShapesWorld(config=WorldConfig.simple(**clips) if cfg.data.shapes_world == "simple"
                            else WorldConfig(**clips))
        return cls(cfg.train.seed, cfg.model.seq_length, load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_type), rep,
                   dict(cfg.data.shapes_weights), world)

    @property
    def latent_dim(self) -> int:
        return self.representation.latent_dim

    @property
    def tokens_per_image(self) -> int:
        return self.representation.tokens_per_image

    # ----------------------------------------------------------------------- documents
    @torch.no_grad()
    def encode_images(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [T, S, S, 3] -> normalised latents [T, tokens_per_image, C] float32."""
        images = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
        rep = self.representation
        return rep.normalize(rep.encode(images)).float().numpy()

    def _text(self, text: str) -> Segment:
        return Segment(tokens=np.asarray(self.tokenizer.encode(text), dtype=np.int64))

    def _ids(self, *ids: int) -> Segment:
        return Segment(tokens=np.asarray(ids, dtype=np.int64))

    def document(self, rng: np.random.Generator) -> Document:
        """One document drawn with ``rng`` (source, then a ShapesWorld index)."""
        source = SOURCES[int(rng.choice(len(SOURCES), p=self._probs))]
        index = int(rng.integers(2**31 - 1))
        eod = self._ids(self.tokenizer.eod_id)
        if source == "text":
            return [self._text(self.world.text_document(index).text), eod]
        if source == "image_text":
            s = self.world.image_text(index)
            image = Segment(latents=self.encode_images(s.image[None])[0], modality=IMAGE)
            if rng.random() < self.caption_first_prob:
                return [self._text(s.caption), image, eod]
            return [image, self._text(s.caption), eod]
        if source == "vqa":
            s = self.world.image_text(index)
            image = Segment(latents=self.encode_images(s.image[None])[0], modality=IMAGE)
            return [image, self._text(vqa_document(s.vqa)), eod]
        if source == "video":
            v = self.world.video(index)
            doc: Document = [self._text(v.caption)]
            for f, latents in enumerate(self.encode_images(v.frames)):
                if f:
                    doc.append(self._ids(self.tokenizer.frame_id))
                doc.append(Segment(latents=latents, modality=VIDEO))
            return doc + [eod]
        a = self.world.action_video(index)
        doc = [self._text(a.caption)]
        for f, latents in enumerate(self.encode_images(a.frames)):
            doc.append(Segment(latents=latents, modality=VIDEO, clean=f < a.context_frames))
            if f < len(a.actions):  # the preprocessing tool's layout: F0 a0 <frame> F1 a1 <frame> ..
                action = self.tokenizer.encode_action(a.actions[f]) + [self.tokenizer.frame_id]
                doc.append(Segment(tokens=np.asarray(action, dtype=np.int64)))
        return doc + [eod]

    def sample(self, i: int) -> Sample:
        """Packed sequence ``i``."""
        return pack_drawn_documents(
            self.packer, lambda j: self.document(np.random.default_rng([self.seed, zlib.crc32(b"shapes_stream"), int(i), j])),
            _MAX_DOCS)
