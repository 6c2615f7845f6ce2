"""Recipes: what the trainer runs for each ``model.kind`` (Megatron keeps this in ``pretrain_gpt.py``).

A recipe's provider turns the run's :class:`~megafusion.config.Config` into

- the model (one megatron-core module per virtual pipeline stage, built by ``megafusion.model``),
- the data stream the config reads and how a step's micro-batches are made from it
  (``micro_batches``: the batch function the trainer's ``StepLoader`` calls),
- the loss (``forward_step`` returns the model output and megatron's loss function for it).

One module per model kind: ``text`` (GPT on synthetic or indexed text) and ``transfusion``
(text + flow-matching latents). Imports go one way: recipes use ``model``, ``data`` and
``diffusion``; ``training``, ``inference`` and ``interop`` use recipes; ``model`` never does.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Protocol

import torch

from megafusion.config import Config

# model.kind -> "module:Class"
PROVIDERS = {
    "text": "megafusion.recipes.text:TextModelProvider",
    "transfusion": "megafusion.recipes.transfusion:TransfusionProvider",
}


class ModelProvider(Protocol):
    # Names of the summed metrics the loss function reports, e.g. ("loss", "loss_text").
    metric_names: tuple[str, ...]

    def build(self, pre_process: bool, post_process: bool, vp_stage: int | None) -> torch.nn.Module:
        """One pipeline (virtual) stage of the model, on CPU, not yet wrapped for DDP."""

    def micro_batches(self, step: int, dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
        """This data-parallel rank's micro-batches for a step (deterministic in ``step``)."""

    def forward_step(self, batch: dict[str, torch.Tensor], model: torch.nn.Module
                     ) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
        """Runs the model; returns its output and megatron's loss function for it."""

    # Optional: ``step_metrics(model_chunks) -> dict[str, float]``, called on every rank at
    # each logged step (it may run collectives); its entries join metrics.jsonl/TensorBoard.


def get_provider(cfg: Config, transformer_config) -> ModelProvider:
    """The ``model.kind`` recipe's provider for ``cfg`` (``transformer_config``: from
    ``megafusion.model.transformer_config.build_transformer_config``; None if only data is needed)."""
    module_name, cls_name = PROVIDERS[cfg.model.kind].split(":")
    return getattr(importlib.import_module(module_name), cls_name)(cfg, transformer_config)
