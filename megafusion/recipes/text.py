"""The text recipe (``model.kind: text``): a GPT model (``megafusion.model.text``), its data
stream, its micro-batches and its loss (summed next-token cross-entropy over ``loss_mask``).

Data (``data.kind``):

- ``synthetic``: arithmetic sequences made in-process (``megafusion.data.synthetic``).
- ``indexed``: text datasets written by ``tools/preprocess_data.py --kind text``, blended by
  ``data.weights`` and packed by the same ``IndexedStream`` as Transfusion's, with the
  tokenizer of ``data.tokenizer``; ``megafusion.data.text_batches`` says how a packed
  sequence becomes a GPT micro-batch (attention crosses documents, the loss does not).
  Datasets holding images or video are refused: this model cannot read them.

What the data must be (a kind this model reads, a tokenizer and datasets that fit
``model.vocab_size``, no images) is checked by ``megafusion.config.validate`` before any
process group exists; the provider only re-asserts it (``require_provider_config``) for a
config that never went through validate.

Either way micro-batch ``k`` of step ``s`` is a pure function of ``(train.seed, s, k)``.
"""

from __future__ import annotations

from functools import partial

import torch

from megafusion.config import Config, require_provider_config
from megafusion.data import synthetic
from megafusion.data.text_batches import gpt_batch
from megafusion.model.text import build_text_model


def masked_token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """megatron loss function: (summed loss, token count, {metric: [sum, count]})."""
    mask = loss_mask.reshape(-1).float()
    total = torch.sum(per_token_loss.reshape(-1).float() * mask)
    count = mask.sum()
    stats = torch.stack([total.detach(), count])
    return total, count.to(torch.int), {"loss": stats, "loss_text": stats}


class TextModelProvider:
    """Builds the GPT model and feeds it synthetic or indexed text (``data.kind``)."""

    metric_names = ("loss", "loss_text")

    def __init__(self, cfg: Config, transformer_config) -> None:
        require_provider_config(cfg)  # validate's data checks; a validated config passes
        self.cfg = cfg
        self.transformer_config = transformer_config
        # The indexed datasets' stream (data.kind = indexed); None for synthetic text.
        self.stream = None
        if cfg.data.kind == "indexed":
            from megafusion.data.indexed_stream import IndexedStream

            self.stream = IndexedStream.from_config(cfg, text_only=True)

    def build(self, pre_process: bool, post_process: bool, vp_stage: int | None) -> torch.nn.Module:
        return build_text_model(self.cfg, self.transformer_config, pre_process, post_process, vp_stage)

    def micro_batches(self, step: int, dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of ``step``: tokens, labels, loss_mask, position_ids, each
        [micro_batch_size, seq_length]. Global sample ``i`` is packed sequence ``i`` of the data."""
        t, m = self.cfg.train, self.cfg.model
        indices = synthetic.micro_batch_indices(step, t.global_batch_size, t.micro_batch_size, dp_rank, dp_size)
        if self.stream is None:
            return [synthetic.text_batch(t.seed, idx, m.seq_length, m.vocab_size) for idx in indices]
        pad_id = self.stream.tokenizer.pad_id
        return [gpt_batch([self.stream.sample(i) for i in idx], pad_id) for idx in indices]

    def forward_step(self, batch: dict[str, torch.Tensor], model: torch.nn.Module):
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(masked_token_loss, batch["loss_mask"])
