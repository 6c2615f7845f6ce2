"""The training loop: build, restore, step, log, checkpoint.

One function, :func:`train`, run by every process. Parallelism lives in megatron-core
(groups, DDP, the pipeline schedule, the distributed optimizer); this file only wires the
pieces together in the order they need. What keeps a run honest lives next to it:
``guards`` (no NaN/inf update or checkpoint), ``preemption`` (stop signals end a step
with a checkpoint), ``resume`` (what a run directory may be resumed with, and the config
history and schedule line it gets).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from megafusion.config import Config
from megafusion.data.loader import StepLoader, default_num_workers, micro_batch_iterators
from megafusion.model.transformer_config import build_transformer_config
from megafusion.parallel.setup import ParallelEnv, init_parallel, shutdown
from megafusion.recipes import get_provider
from megafusion.training.checkpoint import Checkpointer, latest_checkpoint
from megafusion.training.guards import (NonFiniteError, NonFiniteLossError, check_finite_for_save,  # noqa: F401
                                        check_loss_finite, optimizer_step, skip_limit, too_many_skips)
from megafusion.training.metrics import MetricsWriter
from megafusion.training.optim import build_optimizer, build_scheduler
from megafusion.training.preemption import Preempted, PreemptionWatcher
from megafusion.training.resume import check_compatible, check_run_dir, continue_schedule, write_config

log = logging.getLogger(__name__)

def _step_flops(shape, batches: list[dict[str, torch.Tensor]]) -> float:
    """Model training FLOPs of this rank's micro-batches (attention on unmasked pairs only)."""
    from megafusion.scaling.flops import training_flops_per_step

    total = 0
    for batch in batches:
        tokens = batch["tokens"]
        doc_ids = batch.get("doc_ids", torch.zeros_like(tokens))
        span_ids = batch.get("span_ids", torch.full_like(tokens, -1))
        modality = batch.get("modality", torch.zeros_like(tokens))
        total += training_flops_per_step(shape, doc_ids.cpu().numpy(), span_ids.cpu().numpy(),
                                         modality.cpu().numpy())
    return float(total)


def _throughput(cfg: Config, env: ParallelEnv, shape, batches, elapsed: float) -> dict[str, float | None]:
    """TFLOP/s per GPU (model FLOPs, split over the model-parallel ranks) and, on a GPU, MFU."""
    from megafusion.scaling.flops import matmul_dtype, mfu

    per_gpu = _step_flops(shape, batches) / (cfg.parallel.tp * cfg.parallel.pp) / elapsed
    out: dict[str, float | None] = {"tflops_per_gpu": per_gpu / 1e12}
    if env.device.type == "cuda":
        # None (JSON null) for a GPU whose peak we do not know: never another GPU's figure.
        out["mfu"] = mfu(per_gpu, torch.cuda.get_device_name(env.device),
                          matmul_dtype(cfg.train.precision, cfg.train.fp8))
    return out


def build_chunks(cfg: Config, transformer_config, provider, device: torch.device) -> list[torch.nn.Module]:
    """This rank's model chunks (one per virtual pipeline stage), not yet wrapped for DDP.

    Shared by training (:func:`build_model_chunks`) and the dry run
    (``megafusion.scaling.dry_run``, which builds on the meta device), so both count the
    same parameters. Megatron's model-parallel groups must already exist.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.module import Float16Module

    stages = [None] if cfg.parallel.vpp is None else list(range(cfg.parallel.vpp))
    chunks = []
    for vp_stage in stages:
        model = provider.build(
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage,
        ).to(device)
        if cfg.train.precision != "fp32":
            model = Float16Module(transformer_config, model)
        chunks.append(model)
    return chunks


def build_model_chunks(cfg: Config, transformer_config, provider, env: ParallelEnv) -> list[torch.nn.Module]:
    """This rank's model: one chunk per virtual pipeline stage, wrapped for DDP."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    chunks = build_chunks(cfg, transformer_config, provider, env.device)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        check_for_nan_in_grad=False,
        # FP8 weights (train.fp8_params): the distributed optimizer writes its updated fp32
        # main params back into the FP8 weights only with this set (validate requires
        # parallel.distributed_optimizer with it); without it they never change.
        fp8_param_gather=cfg.train.fp8_params,
    )
    return [
        DistributedDataParallel(config=transformer_config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def _reduce_metrics(losses_reduced: list[dict], names: tuple[str, ...], env: ParallelEnv) -> dict[str, float]:
    """Sums [sum, count] pairs over micro-batches and data-parallel ranks; returns means.

    Only the last pipeline stage computes losses, and all its TP ranks compute the same
    ones, so each (sum, count) is contributed once, by TP rank 0 of the last stage.
    """
    from megatron.core import parallel_state as ps

    totals = torch.zeros(len(names), 2, dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True) and env.tp_rank == 0:
        for micro in losses_reduced:
            for i, name in enumerate(names):
                if name in micro:
                    totals[i] += micro[name].detach().double().cpu()
    totals = totals.to(env.device)
    dist.all_reduce(totals)
    totals = totals.cpu()
    return {name: (totals[i, 0] / totals[i, 1]).item() for i, name in enumerate(names) if totals[i, 1] > 0}


def train(cfg: Config, run_dir: Path, profiler=None, watcher: PreemptionWatcher | None = None,
          started: Callable[[], None] | None = None) -> dict[str, float]:
    """Trains ``cfg`` in ``run_dir`` (resuming from its latest checkpoint). Returns the last metrics.

    ``profiler``: an optional ``torch.profiler.profile`` (already entered); it is stepped once
    per training step. Data loading, attention and MoE dispatch run inside the named ranges
    ``megafusion.data``, ``megafusion.attention`` and ``megafusion.moe_dispatch``.

    ``watcher``: the stop-signal watcher (default: one installed for this call). SIGTERM,
    SIGINT or SIGUSR1 end the run at the end of the current step with a checkpoint of it
    and :class:`Preempted`. Non-finite losses, gradients (beyond ``train.max_skipped_steps``)
    or tensors about to be saved end it with a :class:`NonFiniteError`; a run directory that
    cannot be resumed with this config, with a ``ConfigError`` before anything is written.

    ``started``: called once, when the model is built and restored and the first step is about
    to run (the entry points print their start-up summary there, e.g. megatron's warnings).

    Console lines go through ``logging`` (the entry points configure it: rank and time per
    record; see ``megafusion.logging_setup``).

    On a CPU device the caller applies ``megafusion.parallel.cpu_compat`` around the call
    (``megafusion.train.main``, ``bench`` and ``quickstart`` do); ``init_parallel`` refuses
    to start without it.
    """
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    check_compatible(cfg, run_dir, has_checkpoint=latest_checkpoint(run_dir) is not None)
    env = init_parallel(cfg)
    own_watcher = watcher is None
    watcher = PreemptionWatcher() if own_watcher else watcher
    try:
        transformer_config = build_transformer_config(cfg, env.device)
        provider = get_provider(cfg, transformer_config)
        stream = getattr(provider, "stream", None)
        if env.is_main and hasattr(stream, "truncation_notes"):
            for note in stream.truncation_notes(cfg.data.paths):
                log.info(note)
        model_chunks = build_model_chunks(cfg, transformer_config, provider, env)
        optimizer = build_optimizer(cfg, model_chunks)
        scheduler = build_scheduler(cfg, optimizer)
        transformer_config.finalize_model_grads_func = finalize_model_grads
        transformer_config.grad_scale_func = optimizer.scale_loss

        checkpointer = Checkpointer(run_dir, cfg.checkpoint.keep, cfg.checkpoint.async_save, env.device)
        restored = checkpointer.load_latest(model_chunks, optimizer, scheduler)
        start_step = restored["step"] if restored else 0
        # The data position: the steps of data consumed (every batch is a pure function of its step).
        saved_data = (restored.get("data") or {}) if restored else {}
        data_step = int(saved_data.get("step", start_step))
        skipped = int(saved_data.get("skipped_steps", 0))  # updates skipped for NaN/inf gradients, all attempts
        if restored and hasattr(provider, "load_data_state"):  # a sequential stream's saved position (energon)
            provider.load_data_state(saved_data)
        if restored:
            schedule_line = continue_schedule(cfg, scheduler, start_step)  # may re-plan; updates cfg to match
            if env.is_main:
                log.info(f"resumed from step {start_step} (data step {data_step}) in {run_dir}")
                log.info(schedule_line)
        # Only now, with the checkpoint loaded, is this attempt's config written.
        if env.is_main:
            write_config(cfg, run_dir)
        dist.barrier()
        if watcher.requested(env.device):  # a signal while setting up: stop before any work
            raise Preempted(watcher.signal_name, start_step, saved=False)

        lg = cfg.logging
        # MoE routing heatmaps: at most once per console line (every 10 logged steps without console_every).
        writer = MetricsWriter(run_dir, env.is_main, lg.tensorboard, cfg.train.steps, start_step,
                               console_every=lg.console_every,
                               heatmap_every=(lg.console_every or 10 * lg.every) if cfg.model.moe.num_experts else None,
                               wandb=lg.wandb if lg.wandb.project is not None else None,
                               run_config=cfg.to_dict() if lg.wandb.project is not None else None)
        forward_backward = get_forward_backward_func()
        from megafusion.scaling.flops import ModelShape

        flops_shape = getattr(provider, "model_shape", None) or ModelShape.from_model_config(cfg.to_dict()["model"])
        tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
        max_skipped = skip_limit(cfg.train.max_skipped_steps, cfg.train.precision)
        metrics: dict[str, float] = {}

        def forward_step(data_iterator, model):
            return provider.forward_step(next(data_iterator), model)

        def save(step: int) -> None:
            check_finite_for_save(model_chunks, optimizer, step, env.device)
            checkpointer.save(step, model_chunks, optimizer, scheduler,
                              data_state={"step": data_step + step - start_step, "skipped_steps": skipped,
                                          **(provider.data_state() if hasattr(provider, "data_state") else {})})

        if started is not None:
            started()
        num_workers = cfg.data.num_workers
        loader = StepLoader(provider.micro_batches, data_step, data_step + cfg.train.steps - start_step,
                            env.dp_rank, env.dp_size,
                            num_workers=0 if getattr(provider, "sequential_data", False) else
                            default_num_workers(env.device) if num_workers is None else num_workers,
                            prefetch=cfg.data.prefetch, pin_memory=env.device.type == "cuda")
        try:
            for step in range(start_step + 1, cfg.train.steps + 1):
                started = time.perf_counter()
                with torch.profiler.record_function("megafusion.data"):  # the wait for this step's batches
                    batches = [{k: v.to(env.device, non_blocking=True) for k, v in b.items()} for b in next(loader)]
                data_time = time.perf_counter() - started
                for chunk in model_chunks:
                    chunk.zero_grad_buffer()
                optimizer.zero_grad()
                losses = forward_backward(
                    forward_step_func=forward_step,
                    data_iterator=micro_batch_iterators(batches, len(model_chunks)),
                    model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
                    num_microbatches=len(batches),
                    seq_length=cfg.model.seq_length,
                    micro_batch_size=cfg.train.micro_batch_size,
                    forward_only=False,
                )
                check_loss_finite(losses, step, env.device)
                update = optimizer_step(optimizer, model_chunks, env.device, loss_scaled=cfg.train.precision == "fp16")
                if update.applied:
                    # The schedule counts updates (as megatron's does): a skipped step does not advance it.
                    scheduler.step(increment=1)
                else:
                    skipped += 1
                    if skipped > max_skipped:
                        raise too_many_skips(model_chunks, step, skipped, max_skipped, env.device)
                elapsed = time.perf_counter() - started
                # A stop signal ends the run after this step (the last step ends it anyway). A collective.
                stopping = step < cfg.train.steps and watcher.requested(env.device)

                if step % cfg.logging.every == 0 or step == cfg.train.steps or stopping or not update.applied:
                    metrics = _reduce_metrics(losses, provider.metric_names, env)
                    metrics.update(
                        lr=float(optimizer.param_groups[0]["lr"]),
                        grad_norm=update.grad_norm,
                        skipped_steps=skipped,
                        tokens_per_s=tokens_per_step / elapsed,
                        step_time_s=elapsed,
                        data_time_s=data_time,
                        **_throughput(cfg, env, flops_shape, batches, elapsed),
                    )
                    # Model-specific statistics (e.g. MoE routing per modality); a collective.
                    if hasattr(provider, "step_metrics"):
                        metrics.update(provider.step_metrics(model_chunks))
                    writer.log(step, metrics, force_console=stopping or not update.applied)
                # Sample grids (world size 1, validate's rule): the training RNG is put back after.
                if (lg.sample_every and env.is_main and (lg.tensorboard or lg.wandb.project is not None)
                        and (step % lg.sample_every == 0 or step == cfg.train.steps)):
                    from megafusion.training.samples import SAMPLES_TAG, sample_grid

                    writer.add_image(SAMPLES_TAG, sample_grid(model_chunks, provider, cfg, env.device), step)
                if profiler is not None:
                    profiler.step()
                checkpointer.poll()
                if stopping or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or (
                        step == cfg.train.steps and cfg.checkpoint.save_final):
                    save(step)
                if stopping:
                    checkpointer.poll(blocking=True)
                    raise Preempted(watcher.signal_name, step)
        except NonFiniteError:
            checkpointer.poll(blocking=True)  # every rank stops here together: finish earlier saves
            raise
        finally:
            loader.close()
            writer.close()
        checkpointer.poll(blocking=True)
        return metrics
    finally:
        if own_watcher:
            watcher.close()
        shutdown()
