"""Optimizer (megatron-core's, AdamW) and learning-rate schedule from the run config."""

from __future__ import annotations

from megafusion.config import Config
from megafusion.model.transformer_config import DTYPES


def build_optimizer(cfg: Config, model_chunks):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o, t = cfg.optimizer, cfg.train
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_eps=o.eps,
        clip_grad=o.clip_grad,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        params_dtype=DTYPES[t.precision],
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    return get_megatron_optimizer(opt_config, model_chunks)


def build_scheduler(cfg: Config, optimizer):
    """Linear warmup, then cosine decay, WSD (warmup-stable-decay) or constant, per step."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    s, o = cfg.schedule, cfg.optimizer
    decay_steps = s.decay_steps or cfg.train.steps
    wsd_steps = max(1, round(s.wsd_decay_fraction * decay_steps)) if s.kind == "wsd" else None
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if s.warmup_steps else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr if s.kind != "constant" else o.lr,
        lr_warmup_steps=s.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style={"cosine": "cosine", "wsd": "WSD", "constant": "constant"}[s.kind],
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        wsd_decay_steps=wsd_steps,
        lr_wsd_decay_style="cosine" if s.kind == "wsd" else None,
    )
