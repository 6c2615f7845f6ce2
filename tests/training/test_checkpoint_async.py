"""Asynchronous checkpoints go through megatron-core's own ``mcore`` writer and queue.

``dist_checkpointing.save(..., async_sharded_save=True)`` defaults to the ``nvrx`` strategy,
which imports nvidia_resiliency_ext (not a dependency): every GPU run with the default
``checkpoint.async_save`` would have died at its first save. Async saves run on a GPU only;
here the real mcore path runs on CPU (gloo, one process) with its two CUDA calls (the
finalize all-reduce's device and the D2H synchronize) pointed at the CPU.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist

from megafusion.training import checkpoint as ckpt_mod
from megafusion.training.checkpoint import Checkpointer, complete_checkpoints, verify_checkpoint


class _Scheduler:
    def state_dict(self):
        return {"last": 1}


@pytest.fixture
def gloo(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture
def async_ckpt(gloo, tmp_path, monkeypatch):
    """A Checkpointer saving asynchronously on CPU, with a one-tensor state per step, and a
    record of every ``dist_checkpointing.save`` call."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(ckpt_mod, "_layout", lambda: {"tp": 1, "pp": 1, "ep": 1, "dp": 1})

    def state(model_chunks, optimizer, common, with_rng, device, is_loading):
        weight = model_chunks[0]
        return {"common": common, "w": ShardedTensor.from_rank_offsets("w", weight, replica_id=0)}

    monkeypatch.setattr(ckpt_mod, "_sharded_state_dict", state)
    calls = []
    real_save = dist_checkpointing.save

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(dist_checkpointing, "save", spy)
    checkpointer = Checkpointer(tmp_path / "run", keep=5, async_save=True, device=torch.device("cuda"))
    assert checkpointer.async_save
    checkpointer.device = torch.device("cpu")  # the RNG/state helpers are mocked; tensors live on the CPU
    return checkpointer, calls, tmp_path / "run"


def _save(checkpointer, step):
    checkpointer.save(step, [torch.full((4, 3), float(step))], None, _Scheduler(), {"step": step},
                      with_optimizer=False)


def test_async_save_uses_megatrons_own_strategy_and_queue(async_ckpt):
    checkpointer, calls, run_dir = async_ckpt
    _save(checkpointer, 1)
    assert calls[-1]["async_sharded_save"] is True
    assert calls[-1]["async_strategy"] == "mcore"  # never the nvrx default
    assert "nvidia_resiliency_ext" not in sys.modules
    assert checkpointer.pending() == 1
    checkpointer.poll(blocking=True)
    assert checkpointer.pending() == 0
    assert [s for s, _ in complete_checkpoints(run_dir)] == [1]


def test_previous_save_is_published_before_the_next_and_the_last_at_the_final_poll(async_ckpt):
    checkpointer, calls, run_dir = async_ckpt
    _save(checkpointer, 1)
    _save(checkpointer, 2)  # finalizes step 1 first: one save in flight at most
    assert [s for s, _ in complete_checkpoints(run_dir)] == [1]
    assert checkpointer.pending() == 1
    checkpointer.poll(blocking=True)  # what the training loop calls before it returns or stops
    assert [s for s, _ in complete_checkpoints(run_dir)] == [1, 2]
    assert checkpointer.pending() == 0
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    for _, path in complete_checkpoints(run_dir):
        assert verify_checkpoint(path).verified  # manifest written by the finalize step

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    target = {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(4, 3), replica_id=0)}
    loaded = dist_checkpointing.load(target, str(run_dir / "checkpoints" / "step_00000002"))
    assert torch.equal(loaded["w"], torch.full((4, 3), 2.0))
