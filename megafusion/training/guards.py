"""Keeping NaN and inf out of updates and checkpoints.

Three guards, each a collective that every rank calls at the same point of a step, so all
ranks take the same decision:

- :func:`check_loss_finite`: a NaN/inf loss stops the run.
- :func:`optimizer_step`: an update whose gradients hold NaN/inf is skipped: no parameter,
  optimizer state or LR-schedule change. In fp32/bf16 the gradients (the DDP buffers) are
  checked before megatron's optimizer sees them; in fp16 the dynamic loss scaler already
  unscales, checks, skips and backs off (``optimizer.step()`` returns ``success=False``),
  so the guard only counts what it skipped. The caller stops after
  ``train.max_skipped_steps`` skips (:func:`skip_limit`) with :func:`too_many_skips`.
- :func:`check_finite_for_save`: no checkpoint is written whose parameters or optimizer
  state hold NaN/inf, whatever put them there.

Each stop names the step, the first rank with the problem and the first non-finite tensor
on it (rank order, then parameter order), found by :func:`agree_on_first`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from megafusion.training.checkpoint import unwrap


# What `megafusion train` (and the quickstart, bench) exit with after a NonFiniteError.
NON_FINITE_EXIT_CODE = 3


class NonFiniteError(RuntimeError):
    """NaN or inf in a loss, a gradient or a tensor about to be saved; the run stops (exit 3)."""


class NonFiniteLossError(NonFiniteError):
    """The loss became NaN or inf; the run stops without saving a new checkpoint."""


class NonFiniteGradientError(NonFiniteError):
    """More steps had NaN/inf gradients than ``train.max_skipped_steps`` allows."""


class NonFiniteCheckpointError(NonFiniteError):
    """A tensor about to be checkpointed is NaN or inf; the save was refused."""


def named_parameters(model_chunks) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of this rank's chunks, named as in checkpoints (``chunkI.`` with VPP)."""
    for i, chunk in enumerate(model_chunks):
        prefix = f"chunk{i}." if len(model_chunks) > 1 else ""
        for name, param in unwrap(chunk).named_parameters():
            yield prefix + name, param


def _grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    """The gradient megatron's optimizer reads: DDP's ``main_grad`` (the reduced buffer view), else ``.grad``."""
    grad = getattr(param, "main_grad", None)
    return grad if grad is not None else param.grad


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """One flag for many tensors, with a single host sync."""
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all().item())


def local_grads_finite(model_chunks) -> bool:
    """Whether every gradient on this rank is finite (checks DDP's contiguous grad buffers)."""
    buffers = [b.grad_data for chunk in model_chunks
               for b in getattr(chunk, "buffers", []) + getattr(chunk, "expert_parallel_buffers", [])]
    if buffers:
        return _all_finite(buffers)
    return _all_finite([g for _, p in named_parameters(model_chunks) if (g := _grad(p)) is not None])


def first_non_finite_grad(model_chunks) -> str | None:
    for name, param in named_parameters(model_chunks):
        grad = _grad(param)
        if grad is not None and not torch.isfinite(grad).all():
            return name
    return None


def _any_rank(flag: bool, device: torch.device) -> bool:
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def agree_on_first(local: str | None, device: torch.device) -> tuple[int, str] | None:
    """The lowest rank whose ``local`` finding is not None, and that finding; None if no rank has one.

    A collective (an all-reduce, then a broadcast of the name when something was found).
    """
    if not dist.is_initialized():
        return (0, local) if local is not None else None
    world = dist.get_world_size()
    first = torch.tensor([dist.get_rank() if local is not None else world], dtype=torch.int64, device=device)
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    rank = int(first.item())
    if rank == world:
        return None
    box = [local]
    dist.broadcast_object_list(box, src=rank, device=device if device.type == "cuda" else None)
    return rank, box[0]


# --------------------------------------------------------------------------- the loss


def check_loss_finite(losses_reduced: list[dict], step: int, device: torch.device) -> None:
    """Stops every rank if any rank saw a non-finite loss, naming the first such rank."""
    bad = any(not torch.isfinite(v).all() for micro in losses_reduced for v in micro.values())
    found = agree_on_first("loss" if bad else None, device)
    if found is not None:
        raise NonFiniteLossError(
            f"non-finite loss (NaN or inf) at step {step} on rank {found[0]}; stopping without saving a "
            f"checkpoint. Lower optimizer.lr, enable clipping (optimizer.clip_grad) or use fp32/bf16.")


# --------------------------------------------------------------------------- the update


@dataclass
class StepOutcome:
    applied: bool  # False: the update was skipped (non-finite gradients)
    grad_norm: float  # megatron's global norm before clipping; NaN when not computed or skipped


def optimizer_step(optimizer, model_chunks, device: torch.device, loss_scaled: bool) -> StepOutcome:
    """One optimizer update, or none when any rank's gradients hold NaN/inf.

    ``loss_scaled`` (fp16): the dynamic loss scaler inside ``optimizer.step()`` finds
    non-finite gradients itself, skips the update and lowers the scale; checking before it
    would skip without the back-off, so the guard only reads its verdict.
    """
    if not loss_scaled and _any_rank(not local_grads_finite(model_chunks), device):
        return StepOutcome(False, math.nan)
    success, grad_norm, _ = optimizer.step()
    if loss_scaled:  # the scaler's verdict is shared already; agreeing again costs one scalar
        success = not _any_rank(not success, device)
    if not success:
        return StepOutcome(False, math.nan)
    return StepOutcome(True, float(grad_norm) if grad_norm is not None else math.nan)


def skip_limit(max_skipped_steps: int | None, precision: str) -> float:
    """``train.max_skipped_steps``; None: unlimited in fp16 (the loss scaler's business), else 0."""
    if max_skipped_steps is not None:
        return max_skipped_steps
    return math.inf if precision == "fp16" else 0


def too_many_skips(model_chunks, step: int, skipped: int, limit: float, device: torch.device) -> NonFiniteGradientError:
    """The error to raise (on every rank) when ``skipped`` exceeds ``limit``. A collective."""
    found = agree_on_first(first_non_finite_grad(model_chunks), device)
    rank, name = found if found is not None else (0, "(none found: the gradient norm overflowed)")
    return NonFiniteGradientError(
        f"non-finite gradient (NaN or inf) at step {step} on rank {rank}, first in parameter {name}; the update "
        f"was skipped ({skipped} skipped so far, train.max_skipped_steps = {limit:g}) and the run stops. "
        f"The last checkpoint holds no skipped update. Lower optimizer.lr, enable clipping (optimizer.clip_grad) "
        f"or raise train.max_skipped_steps.")


# --------------------------------------------------------------------------- before a save


def _optimizer_tensors(optimizer, names: dict[int, str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(description, tensor) of the optimizer's main parameters and their state (Adam moments)."""
    model_ids = set(names)
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        # Main (fp32) copies of low-precision parameters, mapped back to the model's names.
        pairs = [("float16_groups", "fp32_from_float16_groups"),
                 ("model_float16_groups", "shard_fp32_from_float16_groups"),
                 ("model_fp32_groups", "shard_fp32_groups")]
        for model_attr, main_attr in pairs:
            for model_group, main_group in zip(getattr(opt, model_attr, []) or [], getattr(opt, main_attr, []) or []):
                for model_param, main_param in zip(model_group, main_group):
                    if model_param is not None and main_param is not None and id(model_param) in names:
                        names.setdefault(id(main_param), names[id(model_param)])
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                name = names.get(id(param), f"a parameter of shape {tuple(param.shape)}")
                if id(param) not in model_ids:  # checked with the model's parameters already
                    yield f"the optimizer's main copy of {name}", param
                for key, value in inner.state.get(param, {}).items():
                    if torch.is_tensor(value) and value.is_floating_point():
                        yield f"optimizer state '{key}' of {name}", value


def first_non_finite_tensor(model_chunks, optimizer) -> str | None:
    """The first model parameter or optimizer tensor on this rank holding NaN/inf."""
    names = {}
    for name, param in named_parameters(model_chunks):
        if not torch.isfinite(param).all():
            return f"parameter {name}"
        names[id(param)] = name
    if optimizer is not None:
        for what, tensor in _optimizer_tensors(optimizer, names):
            if not torch.isfinite(tensor).all():
                return what
    return None


def check_finite_for_save(model_chunks, optimizer, step: int, device: torch.device) -> None:
    """Refuses (on every rank) to checkpoint step ``step`` if any rank holds a NaN/inf tensor. A collective."""
    found = agree_on_first(first_non_finite_tensor(model_chunks, optimizer), device)
    if found is not None:
        rank, what = found
        raise NonFiniteCheckpointError(
            f"refusing to save the checkpoint of step {step}: {what} on rank {rank} holds NaN or inf; the run "
            f"stops and the last checkpoint is kept. Lower optimizer.lr or enable clipping (optimizer.clip_grad).")
