"""Dry run: what each rank of a layout holds, at any world size, without the cluster.

    megafusion train --dry-run --world-size 64 --config examples/configs/transfusion_7b_64gpu.yaml

Each reported rank's model is built exactly as training builds it
(``megafusion.training.loop.build_model_chunks``: the recipe's provider, one chunk per
virtual pipeline stage, Float16Module for 16-bit training), but on the ``meta`` device
(shapes only, no memory) and inside torch's ``fake`` process group of the requested world
size (megatron's groups exist, no collective runs). The DDP wrapper is replaced by a
stand-in that records its arguments, and megatron-core's own layout functions turn them
into the gradient buffer and the distributed optimizer's shards, so the figures are what
the real run allocates (``tests/scaling/test_dry_run_exact.py`` checks them against real
models built under gloo, exactly).

What a rank holds (bytes):

- weights: its parameters in their dtype (bf16/fp16 weights are 2 bytes, fp32 4);
- gradient buffer: megatron DDP's contiguous buffers (``grad_reduce_in_fp32``: 4 bytes per
  element), with the padding megatron adds (64-element parameter alignment and bucket ends
  divisible by lcm(DP, 128) under the distributed optimizer);
- optimizer: Adam's two fp32 moments (8 bytes per element) plus, for 16-bit training, an
  fp32 main copy of each 16-bit weight (4 bytes); ``optimizer_bytes`` replicated on every
  DP rank, ``optimizer_bytes_distributed`` this rank's shard of megatron's distributed
  optimizer (each bucket of the buffer cut into DP equal pieces; expert buffers over the
  expert-DP group). Adam's per-tensor ``step`` scalars are not counted;
- activations: ``megafusion.scaling.activations`` (the 1F1B peak, GPU attention kernels).

Not counted: the CUDA context and allocator fragmentation, communication buffers, the
logits' fp32 copy for the loss beyond what the activation estimate includes, data loading.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

from megafusion.config import Config, data_parallel_size
from megafusion.scaling.step_time import Hardware, StepTimeEstimate

GIB = 2**30
META = torch.device("meta")


@dataclass
class ChunkReport:
    """One model chunk (a virtual pipeline stage; the whole rank's model without vpp)."""

    vp_stage: int | None
    params: int  # elements, every parameter of the chunk
    embedding_params: int  # the vocab-sized matrices: input embedding, untied (or pp-shared) LM head
    expert_params: int  # routed experts (not shared experts, not the router)
    param_bytes: int  # params in their dtype
    grad_buffer_numel: int  # DDP's gradient buffers, padded, all buffers of the chunk
    grad_buffer_bytes: int
    optimizer_bytes: int  # fp32 main weights of 16-bit params + Adam's two moments, replicated over DP
    optimizer_bytes_distributed: int  # the same, this rank's shard under the distributed optimizer


@dataclass
class RankReport:
    """One global rank: its coordinates, its chunks, and their sums (elements / bytes)."""

    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    chunks: list[ChunkReport]
    params: int
    embedding_params: int
    expert_params: int
    param_bytes: int
    grad_buffer_numel: int
    grad_buffer_bytes: int
    optimizer_bytes: int
    optimizer_bytes_distributed: int
    # This rank's stored activations at the 1F1B peak (megafusion.scaling.activations)
    activation_bytes: int = 0
    total_bytes: int = 0  # weights + grads + the config's optimizer choice + activations (if known)


@dataclass
class DryRun:
    """The dry run of one config at one world size."""

    config: str
    world_size: int
    layout: dict[str, Any]  # tp, pp, vpp, ep, sp, dp, expert_dp, distributed_optimizer, precision
    gpu_memory_gb: float  # GiB of device memory the totals are compared with
    ranks: list[RankReport]
    notes: list[str] = field(default_factory=list)
    step_time: StepTimeEstimate | None = None

    def to_json(self) -> str:
        out = dataclasses.asdict(self)
        out["step_time"] = None if self.step_time is None else self.step_time.to_json()
        return json.dumps(out, indent=2) + "\n"


# --------------------------------------------------------------------------- building


class _RecordedDDP(torch.nn.Module):
    """Stands in for megatron's DistributedDataParallel in a dry run: it keeps the module and
    the arguments and allocates nothing (the real one allocates the gradient buffers)."""

    def __init__(self, config, ddp_config, module, disable_bucketing: bool = False, **kwargs):
        super().__init__()
        self.module = module
        self.ddp_config = ddp_config
        self.disable_bucketing = disable_bucketing
        self.kwargs = kwargs


class _EverythingOnMeta(TorchFunctionMode):
    """Every tensor factory allocates on the meta device, an explicit ``device=`` included
    (``torch.device("meta")`` as a context only fills in a missing one, and modules that
    allocate on ``cpu`` explicitly would hold real memory, then lose their parameter
    attributes when moved to meta as new Parameter objects)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _device_constructors():
            kwargs["device"] = META
        return func(*args, **kwargs)


@contextlib.contextmanager
def _meta_build() -> Iterator[None]:
    """Builds models without data: every tensor on the meta device, megafusion's
    layout-independent re-initialisation (``model.init.init_weights``, which copies into
    every weight) skipped, and DDP the recording stand-in. Shapes, dtypes and parameter
    attributes are those of the real build."""
    import megatron.core.distributed as mcd

    import megafusion.model.text as text_model
    import megafusion.model.transfusion as transfusion_model

    saved = [(transfusion_model, "init_weights"), (text_model, "init_weights"), (mcd, "DistributedDataParallel")]
    originals = [getattr(owner, name) for owner, name in saved]
    transfusion_model.init_weights = text_model.init_weights = lambda *args, **kwargs: None
    mcd.DistributedDataParallel = _RecordedDDP
    try:
        with _EverythingOnMeta():
            yield
    finally:
        for (owner, name), value in zip(saved, originals):
            setattr(owner, name, value)


def _build_rank(cfg: Config, world_size: int, rank: int) -> tuple[list[_RecordedDDP], dict[str, int]]:
    """This rank's recorded DDP chunks and its coordinates, inside a fake world."""
    from megatron.core import parallel_state as ps

    from megafusion.model.transformer_config import build_transformer_config
    from megafusion.parallel.setup import ParallelEnv
    from megafusion.recipes import get_provider
    from megafusion.training.loop import build_model_chunks

    # The CPU flavour of the config (use_cpu_initialization: no CUDA device asked for);
    # every weight lands on meta anyway, and no initial values are drawn.
    transformer_config = build_transformer_config(cfg, torch.device("cpu"))
    transformer_config.perform_initialization = False
    provider = get_provider(cfg, transformer_config)
    coords = dict(tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
                  dp_rank=ps.get_data_parallel_rank(), ep_rank=ps.get_expert_model_parallel_rank())
    env = ParallelEnv(rank=rank, world_size=world_size, device=META, tp_rank=coords["tp_rank"],
                      pp_rank=coords["pp_rank"], dp_rank=coords["dp_rank"],
                      dp_size=ps.get_data_parallel_world_size())
    with _meta_build():
        chunks = build_model_chunks(cfg, transformer_config, provider, env)
    coords["dp_size"] = env.dp_size
    coords["expert_dp_size"] = ps.get_expert_data_parallel_world_size()
    return chunks, coords


# --------------------------------------------------------------------------- counting


def _is_embedding(name: str) -> bool:
    return name.endswith(("word_embeddings.weight", "output_layer.weight"))


def _is_expert(name: str) -> bool:
    return ".mlp.experts." in name


def _buffer_layouts(ddp: _RecordedDDP, pp_rank: int):
    """[(BufferKey, PerBufferParamLayout, dp group size)] as megatron's DDP lays out this chunk's
    buffers (megatron-core 0.19: DistributedDataParallel.__init__ and _ParamAndGradBuffer)."""
    from megatron.core.distributed.param_and_grad_buffer import (_compute_default_per_buffer_param_layout,
                                                                 group_params_for_buffers)
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.process_groups_config import ProcessGroupCollection

    ddp_config = ddp.ddp_config
    groups = ProcessGroupCollection.setup_process_groups_for_ddp(None, ddp.module.config, ddp_config)
    bucket_size = ddp_config.bucket_size
    if bucket_size is None:
        bucket_size = max(40_000_000, 1_000_000 * groups["dp_group"].size())
    if not ddp_config.overlap_grad_reduce or ddp.disable_bucketing or pp_rank > 0:
        bucket_size = None
    dense_dp, expert_dp = groups["intra_dp_cp_group"].size(), groups["intra_expt_dp_group"].size()
    params = [p for p in ddp.module.parameters() if p.requires_grad]
    if ddp_config.use_distributed_optimizer:
        full = DistributedOptimizer.compute_full_param_layout(params, bucket_size, dense_dp, ddp_config,
                                                              expert_data_parallel_world_size=expert_dp)
        layouts = full.layouts.items()
    else:
        layouts = [(key, _compute_default_per_buffer_param_layout(group, bucket_size))
                   for key, (group, _) in group_params_for_buffers(params, ddp_config.grad_reduce_in_fp32).items()]
    return [(key, layout, expert_dp if key.is_expert_parallel else dense_dp) for key, layout in layouts]


def _optimizer_bytes_per_element(param: torch.Tensor) -> int:
    """Adam's two fp32 moments, plus an fp32 main copy of a 16-bit weight."""
    return 8 + (4 if param.dtype in (torch.bfloat16, torch.float16) else 0)


def _chunk_report(ddp: _RecordedDDP, vp_stage: int | None, pp_rank: int, dp_rank: int, expert_dp_rank: int
                  ) -> ChunkReport:
    named = list(ddp.module.named_parameters())
    grad_numel = grad_bytes = opt_dist = 0
    for key, layout, dp_size in _buffer_layouts(ddp, pp_rank):
        numel = layout.bucket_indices[-1][1]
        grad_numel += numel
        grad_bytes += numel * torch.empty((), dtype=key.grad_dtype, device=META).element_size()
        # The distributed optimizer cuts each bucket into dp_size equal ranges; this rank owns
        # range number (its rank in the buffer's DP group) and keeps state for the parameter
        # elements inside it (padding has none).
        r = expert_dp_rank if key.is_expert_parallel else dp_rank
        shards = {}
        for b, (start, end) in enumerate(layout.bucket_indices):
            size = (end - start) // dp_size
            shards[b] = (start + r * size, start + (r + 1) * size)
        for param, (start, end, bucket) in layout.param_index_map.items():
            lo, hi = shards[bucket]
            owned = max(0, min(end, hi) - max(start, lo))
            opt_dist += owned * _optimizer_bytes_per_element(param)
    trainable = [p for _, p in named if p.requires_grad]
    return ChunkReport(
        vp_stage=vp_stage,
        params=sum(p.numel() for _, p in named),
        embedding_params=sum(p.numel() for n, p in named if _is_embedding(n)),
        expert_params=sum(p.numel() for n, p in named if _is_expert(n)),
        param_bytes=sum(p.numel() * p.element_size() for _, p in named),
        grad_buffer_numel=grad_numel,
        grad_buffer_bytes=grad_bytes,
        optimizer_bytes=sum(p.numel() * _optimizer_bytes_per_element(p) for p in trainable),
        optimizer_bytes_distributed=opt_dist,
    )


def _activation_bytes(cfg: Config, world_size: int, pp_rank: int) -> int:
    """One rank's stored activations at the 1F1B peak (megafusion.scaling.activations), on a GPU."""
    from megafusion.scaling.activations import activation_memory

    micro_batches = cfg.train.micro_batches(data_parallel_size(cfg, world_size))
    return int(activation_memory(cfg, pp_rank=pp_rank, device_type="cuda", num_microbatches=micro_batches).total)


def rank_report(cfg: Config, world_size: int, rank: int) -> RankReport:
    """Builds global rank ``rank`` of a ``world_size`` world on the meta device and counts it.

    Needs the CPU compatibility layer active (``cpu_compat.applied("cpu")``) and no process
    group in this process; both are left as they were.
    """
    from megatron.core import parallel_state as ps

    from megafusion.parallel.setup import fake_world

    with fake_world(cfg, world_size, rank):
        chunks, c = _build_rank(cfg, world_size, rank)
        expert_dp_rank = ps.get_expert_data_parallel_rank()
        stages = [None] if cfg.parallel.vpp is None else list(range(cfg.parallel.vpp))
        reports = [_chunk_report(ddp, vp, c["pp_rank"], c["dp_rank"], expert_dp_rank)
                   for ddp, vp in zip(chunks, stages)]
    total = lambda attr: sum(getattr(r, attr) for r in reports)  # noqa: E731
    report = RankReport(rank=rank, tp_rank=c["tp_rank"], pp_rank=c["pp_rank"], dp_rank=c["dp_rank"],
                        ep_rank=c["ep_rank"], chunks=reports,
                        **{f: total(f) for f in ("params", "embedding_params", "expert_params", "param_bytes",
                                                 "grad_buffer_numel", "grad_buffer_bytes", "optimizer_bytes",
                                                 "optimizer_bytes_distributed")})
    report.activation_bytes = _activation_bytes(cfg, world_size, c["pp_rank"])
    optimizer = report.optimizer_bytes_distributed if cfg.parallel.distributed_optimizer else report.optimizer_bytes
    report.total_bytes = (report.param_bytes + report.grad_buffer_bytes + optimizer
                          + (report.activation_bytes or 0))
    return report


def representative_ranks(cfg: Config, world_size: int) -> list[int]:
    """One global rank per pipeline stage: TP, DP and EP rank 0 (megatron's default rank
    order tp-cp-ep-dp-pp puts the pipeline rank outermost)."""
    return [stage * (world_size // cfg.parallel.pp) for stage in range(cfg.parallel.pp)]


def dry_run(cfg: Config, world_size: int, rank: int | None = None, *, config_name: str = "",
            gpu_memory_gb: float = 80.0, hardware: Hardware | None = None) -> DryRun:
    """The dry run of ``cfg`` (validated for ``world_size``) for ``rank``, or for one rank of
    every pipeline stage (TP/EP ranks of a stage hold equal shards; DP ranks hold the same
    model and, under the distributed optimizer, shards that differ only by padding).
    With ``hardware``, also the estimated step time (``megafusion.scaling.step_time``, on the
    packing of the config's own data)."""
    p, t = cfg.parallel, cfg.train
    ranks = [rank] if rank is not None else representative_ranks(cfg, world_size)
    reports = [rank_report(cfg, world_size, r) for r in ranks]
    for r, report in zip(ranks, reports):  # the representative ranks are what they claim
        if rank is None and (report.tp_rank, report.dp_rank, report.ep_rank) != (0, 0, 0):
            raise RuntimeError(f"dry run: rank {r} is at tp/dp/ep rank {report.tp_rank}/{report.dp_rank}/"
                               f"{report.ep_rank}, not 0/0/0: has megatron's rank order changed?")
    dp = world_size // (p.tp * p.pp)
    layout = dict(tp=p.tp, pp=p.pp, vpp=p.vpp, ep=p.ep, sp=p.sp, dp=dp, expert_dp=world_size // (p.pp * p.ep * p.tp),
                  distributed_optimizer=p.distributed_optimizer, precision=t.precision)
    notes = []
    if rank is None:
        notes.append("one rank per pipeline stage (tp/dp/ep rank 0): the TP and EP ranks of a stage hold equal "
                     "shards, DP ranks the same model (distributed-optimizer shards differ by padding only)")
    notes.append(f"total = weights + gradient buffer + {'distributed' if p.distributed_optimizer else 'replicated'} "
                 "optimizer state (the config's parallel.distributed_optimizer) + activations")
    notes.append("activations: megafusion.scaling.activations, one rank's stored activations at the 1F1B peak "
                 "(GPU attention kernels; validated against counted bytes on CPU)")
    step = None
    if hardware is not None:
        from megafusion.scaling.plan import packing_of, shape_of_config
        from megafusion.scaling.step_time import estimate_step_time

        tree = cfg.to_dict()
        step = estimate_step_time(cfg, shape_of_config(tree), packing_of(tree), world_size, hardware,
                                  params_per_rank=max(r.params for r in reports),
                                  expert_params_per_rank=max(r.expert_params for r in reports))
    return DryRun(config=config_name, world_size=world_size, layout=layout, gpu_memory_gb=gpu_memory_gb,
                  ranks=reports, notes=notes, step_time=step)


# --------------------------------------------------------------------------- printing


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def format_table(run: DryRun) -> str:
    """The fixed-width table: one line per rank (and per vpp chunk), GiB against the GPU."""
    lay = run.layout
    head = (f"dry run: {run.config or 'config'} at world size {run.world_size}: tp {lay['tp']} pp {lay['pp']}"
            f"{'' if lay['vpp'] is None else ' vpp ' + str(lay['vpp'])} ep {lay['ep']} dp {lay['dp']}"
            f" (expert dp {lay['expert_dp']}), sp {str(lay['sp']).lower()}, {lay['precision']},"
            f" distributed optimizer {str(lay['distributed_optimizer']).lower()}")
    cols = ("rank", "pp", "chunk", "params", "embed", "experts", "weights", "grads", "optim", "optim-dist",
            "activ", "total", f"of {run.gpu_memory_gb:g}")
    widths = (6, 3, 5, 9, 9, 9, 8, 8, 8, 10, 7, 8, 7)
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [head, "memory in GiB per rank", line(cols), line(["-" * w for w in widths])]
    for r in run.ranks:
        share = f"{100 * r.total_bytes / (run.gpu_memory_gb * GIB):.0f}%"
        out.append(line([r.rank, r.pp_rank, "all", _count(r.params), _count(r.embedding_params),
                         _count(r.expert_params), _gib(r.param_bytes), _gib(r.grad_buffer_bytes),
                         _gib(r.optimizer_bytes), _gib(r.optimizer_bytes_distributed), _gib(r.activation_bytes),
                         _gib(r.total_bytes), share]))
        if len(r.chunks) > 1:
            for c in r.chunks:
                out.append(line(["", "", c.vp_stage, _count(c.params), _count(c.embedding_params),
                                 _count(c.expert_params), _gib(c.param_bytes), _gib(c.grad_buffer_bytes),
                                 _gib(c.optimizer_bytes), _gib(c.optimizer_bytes_distributed), "", "", ""]))
    out += [f"note: {n}" for n in run.notes]
    too_big = [r.rank for r in run.ranks if r.total_bytes > run.gpu_memory_gb * GIB]
    out.append(f"DOES NOT FIT: rank(s) {', '.join(map(str, too_big))} exceed {run.gpu_memory_gb:g} GiB (see "
               "docs/scaling.md, 'When a layout does not fit')" if too_big
               else f"fits: every reported rank is within {run.gpu_memory_gb:g} GiB")
    if run.step_time is not None:
        out += ["", "estimated step time (megafusion.scaling.step_time)", run.step_time.table()]
    return "\n".join(out)


def write_json(run: DryRun, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run.to_json())
