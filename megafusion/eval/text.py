"""Text perplexity on held-out documents, given any model as a log-probability callable.

The model side stays outside: pass ``logprob_fn(text) -> per-token log-probs`` (natural
log, one value per predicted token), e.g. a closure over a tokenizer and a checkpoint.
Besides perplexity per token this reports bits per UTF-8 byte, which compares models
with different tokenizers.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np

LogProbFn = Callable[[str], Sequence[float]]


def perplexity(documents: Iterable[str], logprob_fn: LogProbFn, vocab_size: int | None = None) -> dict:
    """Corpus-level perplexity: exp(total negative log-likelihood / total predicted tokens).

    Returns a JSON-ready dict: ``documents``, ``tokens``, ``nll_per_token`` (nats),
    ``perplexity``, ``bits_per_byte``, and when ``vocab_size`` is given ``chance_perplexity``
    (a uniform distribution over the vocabulary: perplexity = vocab_size).
    """
    total_nll, tokens, n_bytes, docs = 0.0, 0, 0, 0
    for doc in documents:
        lp = np.asarray(logprob_fn(doc), dtype=np.float64).reshape(-1)
        if lp.size and (not np.all(np.isfinite(lp)) or lp.max() > 1e-6):
            raise ValueError(f"logprob_fn returned values that are not finite log-probabilities (max {lp.max()}) "
                             f"for document {docs}: it must return log p <= 0 per token")
        total_nll -= float(lp.sum())
        tokens += lp.size
        n_bytes += len(doc.encode("utf-8"))
        docs += 1
    if tokens == 0:
        raise ValueError("perplexity: no tokens were scored (empty documents or logprob_fn returned nothing)")
    nll = total_nll / tokens
    out = {"documents": docs, "tokens": tokens, "nll_per_token": nll, "perplexity": math.exp(nll),
           "bits_per_byte": total_nll / math.log(2) / max(n_bytes, 1)}
    if vocab_size is not None:
        out["chance_perplexity"] = float(vocab_size)
        out["chance_nll_per_token"] = math.log(vocab_size)
    out["headline"] = {"metric": "perplexity", "value": out["perplexity"],
                       "chance": float(vocab_size) if vocab_size is not None else None, "higher_is_better": False}
    return out


def heldout_documents(n: int, seed: int | None = None, image_size: int = 32) -> list[str]:
    """``n`` ShapesWorld text documents from the held-out seed (``HELDOUT_SEED`` by default)."""
    from megafusion.data.shapes import HELDOUT_SEED, ShapesWorld

    seed = HELDOUT_SEED if seed is None else seed
    world = ShapesWorld(seed=seed, image_size=image_size)
    return [world.text_document(i).text for i in range(n)]
