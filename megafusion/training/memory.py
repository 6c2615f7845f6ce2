"""A coarse upper bound on the memory one training process needs, checked at start-up.

``megafusion.config.validate`` refuses a config whose estimate exceeds the memory of the
device it would train on, so that ``model.seq_length: 10000000`` is a one-line error
naming both numbers instead of an out-of-memory kill minutes later. This is a guard
against absurd settings, not a memory model: it ignores allocator fragmentation, the
data loader, CUDA's own context, and the patch adapters and time embedding of
Transfusion (small next to the transformer). A validated memory model is a later issue.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per process: parameters with their gradients and Adam states, stored
    activations, and the logits of the LM head."""

    states: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.states + self.activations + self.logits


def estimate_training_memory(cfg, world_size: int, device_type: str) -> MemoryEstimate:
    """A coarse upper bound on the bytes one process holds during a training step.

    - States: every parameter this rank holds (transformer layers split over tp * pp,
      routed experts further over ep, embedding and LM head over tp) times 16 bytes in
      fp32 (weight, gradient, Adam's two moments) or 18 bytes in bf16/fp16 (16-bit
      weight, fp32 gradient buffer, fp32 main weight, two moments); the distributed
      optimizer shards the 12 bytes of main weight and moments over data parallelism.
    - Activations, after Korthikanti et al. 2022 ("Reducing Activation Recomputation in
      Large Transformer Models", section 4): per layer ``s*b*h*(10 + 24/tp)`` bytes
      (``34/tp`` with sequence parallelism) for 16-bit activations, plus
      ``5*a*s^2*b/tp`` for the attention scores where the backend materialises them (the
      dense-mask sdpa backend; megatron's local attention for the text model; flex on
      CPU). Twice that in fp32. All ``num_layers`` count whatever the pipeline size: with
      1F1B the first stage keeps ``pp`` micro-batches of its ``num_layers/pp`` layers.
      ``train.recompute: selective`` drops the scores, ``full`` keeps only each layer's
      input (``2*s*b*h``).
    - Logits: ``s*b*vocab*4/tp`` (fp32 for the cross entropy).
    """
    from megafusion.scaling.flops import ModelShape, params

    m, p, t = cfg.model, cfg.parallel, cfg.train
    shape = ModelShape.from_model_config(cfg.to_dict()["model"])  # the transformer only (latent_dim 0)
    if m.kind == "transfusion":
        shape = dataclasses.replace(shape, ffn_copies=2 if m.ffn == "modality" else 1,
                                    shared_expert_copies=2 if m.moe.per_modality_shared_experts else 1)
    count = params(shape)
    gated = 3 if shape.gated_ffn else 2
    experts = m.num_layers * m.moe.num_experts * gated * m.hidden_size * shape.expert_ffn
    layers = count.total - count.embedding - experts
    held = layers / (p.tp * p.pp) + experts / (p.tp * p.pp * p.ep) + count.embedding / p.tp

    sixteen_bit = t.precision in ("bf16", "fp16")
    shards = max(world_size // (p.tp * p.pp), 1) if p.distributed_optimizer else 1
    if sixteen_bit:  # 16-bit weight, fp32 gradient buffer; fp32 main weight and moments sharded
        per_param = 2 + 4 + 12 / shards
    else:  # weight, gradient; the moments sharded
        per_param = 4 + 4 + 8 / shards
    states = held * per_param

    s, b, h, a = m.seq_length, t.micro_batch_size, m.hidden_size, m.num_heads
    scale = 1 if sixteen_bit else 2  # Korthikanti's counts are for 16-bit activations
    linear = s * b * h * (34 / p.tp if p.sp else 10 + 24 / p.tp)
    dense_scores = ((m.kind == "text" and m.spec == "local")
                    or (m.kind == "transfusion" and (m.attention == "sdpa"
                                                     or (m.attention == "flex" and device_type == "cpu"))))
    scores = 5 * a * s * s * b / p.tp if dense_scores else 0
    per_layer = {"none": linear + scores, "selective": linear, "full": 2 * s * b * h}[t.recompute]
    activations = m.num_layers * per_layer * scale

    logits = s * b * m.vocab_size * 4 / p.tp
    return MemoryEstimate(int(states), int(activations), int(logits))


def device_memory(cfg) -> tuple[int, str, str] | None:
    """(bytes, what they are, device type) of the memory this process would train in:
    the GPU of ``LOCAL_RANK`` (its properties only: no context, no allocation), else the
    machine's RAM shared by the processes of this node. None where ``train.device = cuda``
    finds no GPU (the trainer refuses that itself)."""
    import torch

    if cfg.train.device != "cpu" and torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        props = torch.cuda.get_device_properties(index)
        return props.total_memory, f"GPU {index} ({props.name}) has", "cuda"
    if cfg.train.device == "cuda":
        return None
    import psutil

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    total = psutil.virtual_memory().total
    if local > 1:
        return total // local, f"this machine's RAM, shared by {local} processes, leaves each", "cpu"
    return total, "this machine's RAM is", "cpu"


def memory_problem(cfg, world_size: int) -> str | None:
    """A one-line refusal when the estimate exceeds the device's memory, else None."""
    device = device_memory(cfg)
    if device is None:
        return None
    available, what, device_type = device
    need = estimate_training_memory(cfg, world_size, device_type)
    if need.total <= available:
        return None
    m, t = cfg.model, cfg.train
    return (f"a training step needs about {need.total / GIB:,.1f} GiB per process (parameters, gradients and "
            f"Adam states {need.states / GIB:,.1f}, activations {need.activations / GIB:,.1f}, logits "
            f"{need.logits / GIB:,.1f}: model.seq_length = {m.seq_length}, train.micro_batch_size = "
            f"{t.micro_batch_size}, model.hidden_size = {m.hidden_size}, model.num_layers = {m.num_layers}) but "
            f"{what} {available / GIB:,.1f} GiB; lower model.seq_length or train.micro_batch_size, raise "
            "parallel.tp / parallel.pp, or set train.recompute = full (a coarse upper bound: "
            "megafusion/training/memory.py)")
