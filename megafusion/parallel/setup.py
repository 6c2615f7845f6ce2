"""Process groups: torch.distributed, megatron-core's model-parallel groups, seeds, device.

Called once per process by the trainer. Works under ``torchrun`` (reads RANK/WORLD_SIZE/
LOCAL_RANK) and as a single process without it (a world of one).

This module only builds process groups. On CPU, megatron-core also needs the CPU
compatibility layer (``megafusion.parallel.cpu_compat``), which the entry points apply for
as long as they run; ``init_parallel`` checks that it is active and never applies it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from megafusion.config import Config


@dataclass(frozen=True)
class ParallelEnv:
    """Where this process sits in the parallel layout."""

    rank: int
    world_size: int
    device: torch.device
    tp_rank: int
    pp_rank: int
    dp_rank: int
    dp_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device = cuda but no CUDA GPU is visible; use train.device = cpu or auto")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _model_parallel_groups(cfg: Config, gloo: bool = True) -> None:
    """Megatron-core's TP / PP / VPP / EP groups for ``cfg.parallel`` (``gloo``: also its gloo
    side groups, which the fake backend cannot host)."""
    from megatron.core import parallel_state

    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
        expert_model_parallel_size=p.ep,
        create_gloo_process_groups=gloo,
    )


def init_parallel(cfg: Config) -> ParallelEnv:
    """Starts torch.distributed and megatron-core's groups for ``cfg.parallel``.

    On a CPU device the CPU compatibility layer must already be active (a RuntimeError
    says so otherwise): ``with cpu_compat.applied(device):`` around the caller's work.
    """
    device = resolve_device(cfg.train.device)
    if device.type == "cpu":
        from megafusion.parallel import cpu_compat

        if not cpu_compat.is_active():
            raise RuntimeError(
                "init_parallel: the device is CPU but megafusion's CPU compatibility layer is not "
                "active, and megatron-core assumes CUDA without it. Call "
                "megafusion.parallel.cpu_compat.apply(\"cpu\") first (or run inside "
                "`with megafusion.parallel.cpu_compat.applied(device):`), as the entry points "
                "(megafusion train, generate, eval, export, import, bench, quickstart) do.")
    else:
        torch.cuda.set_device(device)

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend=backend)
        else:  # a single process without torchrun: a world of one, no ports needed
            store = tempfile.NamedTemporaryFile(prefix="megafusion-store-", delete=False).name
            dist.init_process_group(backend=backend, init_method=f"file://{store}", rank=0, world_size=1)

    from megatron.core import parallel_state, tensor_parallel

    _model_parallel_groups(cfg)
    torch.manual_seed(cfg.train.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)

    return ParallelEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        device=device,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
    )


def shutdown() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def fake_world(cfg: Config, world_size: int, rank: int) -> Iterator[None]:
    """Megatron-core's groups for ``cfg.parallel`` as global rank ``rank`` of a world of
    ``world_size`` processes that do not exist: torch's ``fake`` backend, whose collectives
    do nothing, so a 4096-process layout can be built in one CPU process (the dry run,
    ``megafusion.scaling.dry_run``). Tears the groups and the process group down on exit.

    No seeds are set and no device is chosen: nothing built inside it is meant to run.
    Megatron's gloo side groups are not created (the fake backend cannot host them). The
    CPU compatibility layer must be active, as for :func:`init_parallel`.
    """
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("fake_world: a process group is already initialized in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        _model_parallel_groups(cfg, gloo=False)
        yield
    finally:
        shutdown()
