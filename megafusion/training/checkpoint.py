"""Checkpoints in the run directory with megatron-core's dist_checkpointing.

Layout: ``checkpoints/step_00000012/`` (complete) and ``checkpoints/step_00000012.tmp/``
(being written). A checkpoint is written under the ``.tmp`` name and renamed only when
every rank has finished, so a crash mid-save leaves the previous checkpoint as the
latest. Tensors are stored with their global shapes and offsets, so a checkpoint saved
at one (TP, PP, EP, DP) layout loads at another.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def remove_incomplete(run_dir: Path) -> None:
    """Deletes ``.tmp`` leftovers of a crashed save (rank 0 only)."""
    root = checkpoint_root(run_dir)
    if root.is_dir():
        for path in root.glob("step_*.tmp"):
            shutil.rmtree(path, ignore_errors=True)


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "ep": ps.get_expert_model_parallel_world_size(), "dp": ps.get_data_parallel_world_size()}


def _rng_state(device: torch.device) -> dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / Float16Module wrappers: checkpoints hold its keys only, so a
    checkpoint does not depend on how the model was wrapped (precision, DDP)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _sharded_state_dict(model_chunks, optimizer, common: dict[str, Any], with_rng: bool,
                        device: torch.device, is_loading: bool) -> dict[str, Any]:
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state: dict[str, Any] = {"common": common}
    if len(model_chunks) == 1:
        state["model"] = unwrap(model_chunks[0]).sharded_state_dict()
    else:
        for i, chunk in enumerate(model_chunks):
            state[f"model{i}"] = unwrap(chunk).sharded_state_dict()
    # fully_reshardable: optimizer state stored per parameter in global coordinates, so it
    # loads at another TP/PP/DP layout; no chained-optimizer prefix, so expert-parallel
    # checkpoints load at another layout with the same EP.
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True})
    if with_rng:
        # One RNG state per (pp, tp) position; data-parallel replicas share it.
        state["rng_state"] = ShardedObject(
            "rng_state", _rng_state(device),
            (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
            (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
            replica_id=ps.get_data_parallel_rank(with_context_parallel=True))
    return state


class Checkpointer:
    """Saves and restores model, optimizer, LR scheduler, RNG and data position."""

    def __init__(self, run_dir: Path, keep: int, async_save: bool, device: torch.device) -> None:
        self.run_dir = Path(run_dir)
        self.keep = keep
        self.device = device
        self.async_save = async_save and device.type == "cuda"
        self._async_queue = None
        if dist.get_rank() == 0:
            checkpoint_root(self.run_dir).mkdir(parents=True, exist_ok=True)
            remove_incomplete(self.run_dir)
        dist.barrier()

    # ------------------------------------------------------------------ save
    def save(self, step: int, model_chunks, optimizer, scheduler, data_state: dict[str, Any],
             with_optimizer: bool = True) -> None:
        """Writes checkpoint ``step``. ``with_optimizer=False`` stores model weights and the
        LR schedule only (an imported model: its optimizer has never stepped and holds no
        state); resuming from it starts a fresh optimizer."""
        from megatron.core import dist_checkpointing

        root = checkpoint_root(self.run_dir)
        tmp, final = root / f"step_{step:08d}.tmp", root / f"step_{step:08d}"
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        common = {"step": step, "scheduler": scheduler.state_dict(), "layout": _layout(), "data": data_state,
                  "has_optimizer": with_optimizer}
        state = _sharded_state_dict(model_chunks, optimizer if with_optimizer else None, common, True, self.device,
                                    is_loading=False)
        if self.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            if self._async_queue is None:
                self._async_queue = AsyncCallsQueue()
            request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True)
            request.add_finalize_fn(lambda: self._publish(tmp, final))
            self._async_queue.schedule_async_request(request)
        else:
            dist_checkpointing.save(state, str(tmp))
            dist.barrier()
            self._publish(tmp, final)
            dist.barrier()

    def _publish(self, tmp: Path, final: Path) -> None:
        """Renames a finished checkpoint into place and prunes old ones (rank 0)."""
        if dist.get_rank() != 0:
            return
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for _, old in complete_checkpoints(self.run_dir)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def poll(self, blocking: bool = False) -> None:
        """Finishes asynchronous saves that are done (all of them when ``blocking``)."""
        if self._async_queue is not None:
            self._async_queue.maybe_finalize_async_calls(blocking=blocking)

    # ------------------------------------------------------------------ load
    def load_latest(self, model_chunks, optimizer, scheduler) -> dict[str, Any] | None:
        """Restores the latest complete checkpoint; returns its common state, or None."""
        from megatron.core import dist_checkpointing

        latest = latest_checkpoint(self.run_dir)
        if latest is None:
            return None
        _, path = latest
        common = dist_checkpointing.load_common_state_dict(str(path))["common"]
        same_layout = common["layout"] == _layout()
        has_optimizer = common.get("has_optimizer", True)
        state = _sharded_state_dict(model_chunks, optimizer if has_optimizer else None, common, same_layout,
                                    self.device, is_loading=True)
        loaded = dist_checkpointing.load(state, str(path))
        if len(model_chunks) == 1:
            unwrap(model_chunks[0]).load_state_dict(loaded["model"], strict=True)
        else:
            for i, chunk in enumerate(model_chunks):
                unwrap(chunk).load_state_dict(loaded[f"model{i}"], strict=True)
        if has_optimizer:
            optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(common["scheduler"])
        if same_layout:
            _set_rng_state(loaded["rng_state"])
        return common
