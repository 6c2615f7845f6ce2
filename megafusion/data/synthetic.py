"""Synthetic text generated in-process: a default corpus that needs no download.

Each sequence packs short "documents" that are arithmetic progressions modulo the
vocabulary (``a, a+d, a+2d, ...``), separated by an end-of-document token. Predicting the
next token needs the previous two, so a small transformer's loss falls steadily from
ln(vocab) towards zero: a visible learning signal for smoke tests and parallel checks.
Every sequence is a pure function of (seed, index): resuming at a step reproduces it.
"""

from __future__ import annotations

import numpy as np
import torch

EOD = 1  # end-of-document token; 0 is reserved for padding
FIRST_TOKEN = 2


def arithmetic_sequence(seed: int, index: int, length: int, vocab_size: int) -> torch.Tensor:
    """Token ids [length] for sample ``index``."""
    if vocab_size <= FIRST_TOKEN + 1:
        raise ValueError(f"vocab_size = {vocab_size} is too small for synthetic text (needs > {FIRST_TOKEN + 1})")
    rng = np.random.default_rng([seed, index])
    span = vocab_size - FIRST_TOKEN
    out: list[int] = []
    while len(out) < length:
        start, step = int(rng.integers(span)), int(rng.integers(1, 8))
        doc_len = int(rng.integers(8, 33))
        out.extend(FIRST_TOKEN + (start + step * np.arange(doc_len)) % span)
        out.append(EOD)
    return torch.tensor(out[:length], dtype=torch.int64)


def text_batch(seed: int, indices: range | list[int], seq_length: int, vocab_size: int) -> dict[str, torch.Tensor]:
    """A micro-batch of next-token examples: tokens, labels, loss_mask, position_ids [B, seq_length]."""
    seqs = torch.stack([arithmetic_sequence(seed, i, seq_length + 1, vocab_size) for i in indices])
    tokens, labels = seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous()
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": torch.ones_like(tokens, dtype=torch.float32),
        "position_ids": torch.arange(seq_length).expand_as(tokens).contiguous(),
    }


def micro_batch_indices(step: int, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                        dp_size: int) -> list[range]:
    """Global sample indices of this rank's micro-batches at ``step``.

    The global batch of step s is samples [s*G, (s+1)*G); rank r takes a contiguous
    G/dp slice and cuts it into micro-batches, so the union over ranks is the same set of
    samples whatever the layout.
    """
    per_rank = global_batch_size // dp_size
    start = step * global_batch_size + dp_rank * per_rank
    return [range(start + i, start + i + micro_batch_size) for i in range(0, per_rank, micro_batch_size)]
