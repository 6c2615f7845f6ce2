"""Packed text ``Sample``s -> the micro-batches megatron-core's ``GPTModel`` trains on.

The text model (``model.kind: text``) reads preprocessed datasets through the same
``IndexedStream`` as Transfusion: the same blending, packing and ``(seed, index)`` purity.
This module only changes the format. What a packed sequence means for the GPT model:

- **Attention crosses documents.** The documents packed into one sequence see each other
  under the plain causal mask, as in Megatron's ``pretrain_gpt`` with its default
  ``reset_attention_mask=False``: no attention mask is passed, so both layer specs (local
  and Transformer Engine) and every parallel layout run their plain causal path.
  A document therefore reads the tail of the one before it as context; preprocess with
  ``--append-eod`` so that an end-of-document token marks where one ends. (The Transfusion
  model isolates documents, ``megafusion.data.sample``; the two baselines differ here.)
- **Position ids run 0..N-1 over the whole sequence** (Megatron's default
  ``reset_position_ids=False``). With attention crossing documents this is the consistent
  choice: restarting RoPE positions at each document would put the previous document at
  negative relative distances, where no training sequence ever had anything.
- **No loss across a boundary.** A position has a target only when the next position
  belongs to the same document (``Sample.labels``): the last token of a document does not
  learn to predict the first token of a random next one, and padding learns nothing.
  Megatron, by contrast, trains that cross-document prediction unless ``eod_mask_loss``.

Documents longer than the sequence are truncated to it (the rest of the document is
dropped, counted in the packer's stats): the index-addressable mixture packs whole documents.
"""

from __future__ import annotations

import torch

from megafusion.data.sample import IGNORE_INDEX, TEXT, Sample


def gpt_batch(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """B packed text samples of N positions -> a GPT micro-batch, every tensor [B, N]:

    - ``tokens`` int64: the token ids, padding included (pad id).
    - ``labels`` int64: the next token where there is a target, else ``pad_id``. Not
      ``IGNORE_INDEX``: ``GPTModel`` feeds labels to its cross-entropy, which would index the
      vocabulary with -100; ``loss_mask`` is what says which targets count.
    - ``loss_mask`` float32: 1 where the position has a target, 0 elsewhere.
    - ``position_ids`` int64: 0..N-1 in every row (see the module docstring).
    """
    batch = Sample.collate(samples)
    if (batch.modality != TEXT).any():
        raise ValueError("gpt_batch: the samples hold image or video positions; the text model reads text only")
    has_target = batch.labels != IGNORE_INDEX
    tokens = batch.tokens
    return {
        "tokens": tokens,
        "labels": torch.where(has_target, batch.labels, torch.full_like(batch.labels, pad_id)),
        "loss_mask": has_target.to(torch.float32),
        "position_ids": torch.arange(tokens.shape[-1]).expand_as(tokens).contiguous(),
    }
