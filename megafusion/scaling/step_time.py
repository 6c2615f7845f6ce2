"""How long one training step of a layout will take: an estimate with its assumptions stated.

    step time = compute + pipeline bubble + exposed communication (TP, EP, PP, DP)

- **Compute**: the model FLOPs of one global batch (``megafusion.scaling.flops``, mask-aware,
  on the packing the config trains on) split evenly over the GPUs, at ``mfu`` x the GPU's
  dense peak for the matmul dtype. The MFU is an assumption the user sets (40% is what a
  well-tuned dense bf16 run reaches on H100s; measure yours with ``megafusion bench``).
- **Pipeline bubble**: 1F1B idles each stage for ``(pp - 1) / (m * vpp)`` of the compute
  time, with ``m`` micro-batches per pipeline per step (Narayanan et al. 2021, section 2.2).
- **Tensor parallelism**: per layer and micro-batch, two all-reduces of the layer's
  activations forward and two backward (with sequence parallelism the same bytes move as
  all-gathers and reduce-scatters); full recompute repeats the forward's. A ring moves
  ``2 (t - 1) / t`` of the message per GPU. None of it is overlapped: megatron overlaps TP
  communication only with Transformer Engine's userbuffers, which megafusion does not set up.
- **Expert parallelism**: per MoE layer and micro-batch, the all-to-all dispatch and
  combine forward and both again backward, each moving ``top_k`` copies of the rank's
  tokens, of which ``(ep - 1) / ep`` leave the GPU (balanced routing), not overlapped.
- **Pipeline parallelism**: per micro-batch one activation forward and one gradient backward
  per stage boundary; only the first and last micro-batch's transfers are exposed.
- **Data parallelism**: megafusion's DDP reduces the gradients after the last micro-batch
  (``overlap_grad_reduce`` off): an all-reduce of the fp32 gradient buffer, or with the
  distributed optimizer a reduce-scatter of it plus an all-gather of the 16-bit weights;
  routed experts over their expert-data-parallel group.

A collective runs at NVLink speed when its group fits in one node (``gpus_per_node``), else
at the InfiniBand figure per GPU; latency and congestion are ignored, so communication is a
lower bound. The group strides follow megatron's default order ``tp-cp-ep-dp-pp``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from megafusion.scaling.flops import ModelShape, matmul_dtype, peak_flops
from megafusion.scaling.plan import Packing


@dataclass(frozen=True)
class Hardware:
    """What the estimate assumes about the cluster. Bandwidths are per GPU and direction, GB/s
    (10^9 bytes per second)."""

    gpu: str = "H100 SXM"  # a GPU of megafusion.scaling.flops's peak table
    mfu: float = 0.40  # the fraction of the dense peak the matmuls reach
    nvlink_gb_s: float = 450.0  # H100 SXM NVLink 4: 900 GB/s both directions together
    ib_gb_s: float = 50.0  # one 400 Gb/s NDR InfiniBand port per GPU
    gpus_per_node: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.mfu <= 1:
            raise ValueError(f"mfu = {self.mfu} must be in (0, 1] (a fraction of the GPU's peak, e.g. 0.4)")
        for name in ("nvlink_gb_s", "ib_gb_s", "gpus_per_node"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} = {getattr(self, name)} must be positive")

    def link(self, group_span: int) -> float:
        """Bytes/s of a collective whose ranks lie within ``group_span`` consecutive GPUs."""
        return 1e9 * (self.nvlink_gb_s if group_span <= self.gpus_per_node else self.ib_gb_s)


@dataclass(frozen=True)
class StepTimeEstimate:
    """Seconds of one optimizer step (all GPUs in lock step) and what they are made of."""

    compute_s: float
    bubble_s: float
    tp_comm_s: float
    ep_comm_s: float
    pp_comm_s: float
    dp_comm_s: float
    flops_per_step: float  # model FLOPs of the global batch (fwd + bwd)
    positions_per_step: float  # sequence positions of the global batch, padding included
    useful_positions_per_step: float  # the same without padding
    world_size: int
    assumed_mfu: float  # Hardware.mfu
    assumptions: list[str] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return (self.compute_s + self.bubble_s + self.tp_comm_s + self.ep_comm_s + self.pp_comm_s
                + self.dp_comm_s)

    @property
    def tokens_per_s(self) -> float:
        """Positions trained per second over the whole cluster (text tokens and latent patches)."""
        return self.positions_per_step / self.total_s

    @property
    def effective_mfu(self) -> float:
        """Model FLOPs per second over the peak, bubble and communication included."""
        return self.compute_s / self.total_s * self.assumed_mfu

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(total_s=self.total_s, tokens_per_s=self.tokens_per_s,
                   tokens_per_s_per_gpu=self.tokens_per_s / self.world_size, effective_mfu=self.effective_mfu)
        return out

    def table(self) -> str:
        rows = [("compute", self.compute_s), ("pipeline bubble", self.bubble_s), ("TP communication", self.tp_comm_s),
                ("EP communication", self.ep_comm_s), ("PP communication", self.pp_comm_s),
                ("DP gradient sync", self.dp_comm_s), ("step", self.total_s)]
        lines = [f"{name:<20} {seconds * 1e3:>12,.1f} ms" for name, seconds in rows]
        lines.append(f"{'tokens/s':<20} {self.tokens_per_s:>15,.0f}  "
                     f"({self.tokens_per_s / self.world_size:,.0f} per GPU, effective MFU "
                     f"{100 * self.effective_mfu:.1f}%)")
        lines += ["assumed: " + a for a in self.assumptions]
        return "\n".join(lines)


def _ring(bytes_: float, ranks: int, bandwidth: float, all_reduce: bool) -> float:
    """Seconds of a ring collective over ``ranks`` GPUs moving ``bytes_`` per GPU (the full
    message); an all-reduce moves twice what an all-gather or reduce-scatter does."""
    if ranks <= 1:
        return 0.0
    return (2 if all_reduce else 1) * (ranks - 1) / ranks * bytes_ / bandwidth


def estimate_step_time(cfg, shape: ModelShape, packing: Packing, world_size: int, hardware: Hardware = Hardware(),
                       params_per_rank: int | None = None, expert_params_per_rank: int = 0) -> StepTimeEstimate:
    """The step time of ``cfg`` (a validated ``megafusion.config.Config``) at ``world_size`` GPUs.

    ``shape``: the model's sizes (``megafusion.scaling.plan.shape_of_config``); ``packing``:
    the sequences it trains on (``megafusion.scaling.plan.packing_of``); ``params_per_rank``:
    the parameters one rank holds (the dry run's exact count; default: the transformer's
    parameters split over tp x pp), ``expert_params_per_rank`` the routed-expert part of them.
    """
    from megafusion.config import data_parallel_size
    from megafusion.scaling.flops import params as count_params

    p, t, m = cfg.parallel, cfg.train, cfg.model
    dp = data_parallel_size(cfg, world_size)  # world / (tp * pp): the batch's split, not the expert DP
    vpp = p.vpp or 1
    micro_batches = t.micro_batches(dp)  # per pipeline, per step
    dtype = matmul_dtype(t.precision, t.fp8)
    peak = peak_flops(hardware.gpu, dtype)
    if peak is None:
        raise ValueError(f"no documented {dtype} peak for GPU {hardware.gpu!r}; name one of the GPUs in "
                         "megafusion/scaling/flops.py's peak table (e.g. 'H100 SXM', 'H200 SXM', 'A100')")

    flops_per_step = packing.training_flops_per_sequence(shape) * t.global_batch_size
    compute = flops_per_step / world_size / (peak * hardware.mfu)
    bubble = compute * (p.pp - 1) / (micro_batches * vpp)

    act_bytes = 2 if t.precision in ("bf16", "fp16") else 4
    s, b, h = m.seq_length, t.micro_batch_size, m.hidden_size
    layers_per_rank = m.num_layers // p.pp
    message = s * b * h * act_bytes  # one layer's activations, the whole sequence
    passes = 3 if t.recompute == "full" else 2  # forward (again when recomputing) and backward
    tp_link = hardware.link(p.tp)
    tp_comm = (micro_batches * layers_per_rank * passes * 2 * _ring(message, p.tp, tp_link, all_reduce=True))

    ep_comm = 0.0
    if m.moe.num_experts and p.ep > 1:
        # tokens of one rank: the TP group shares a sequence; with SP each holds s / tp of it
        tokens = s * b / (p.tp if p.sp else 1)
        moved = tokens * m.moe.top_k * h * act_bytes * (p.ep - 1) / p.ep
        ep_link = hardware.link(p.tp * p.ep)
        ep_comm = micro_batches * layers_per_rank * passes * 2 * moved / ep_link

    pp_comm = 0.0
    if p.pp > 1:  # the fill and drain transfers; the rest overlap with other micro-batches' compute
        boundary = message / (p.tp if p.sp else 1)
        pp_comm = 2 * (p.pp - 1) * boundary / hardware.link(world_size)  # stages are world / pp ranks apart

    if params_per_rank is None:
        params_per_rank = count_params(shape).total // (p.tp * p.pp)
    # dense parameters sync over the DP group, routed experts over the expert-DP group
    # (world / (pp * ep * tp) ranks); both groups span the tp * dp ranks of a stage
    groups = [(params_per_rank - expert_params_per_rank, dp),
              (expert_params_per_rank, world_size // (p.pp * p.ep * p.tp))]
    dp_link = hardware.link(world_size // p.pp)
    dp_comm = 0.0
    for count, ranks in groups:
        if p.distributed_optimizer:  # reduce-scatter fp32 gradients, all-gather 16-bit weights
            dp_comm += (_ring(count * 4, ranks, dp_link, all_reduce=False)
                        + _ring(count * act_bytes, ranks, dp_link, all_reduce=False))
        else:
            dp_comm += _ring(count * 4, ranks, dp_link, all_reduce=True)

    per_sequence = packing.by_modality
    positions = s * t.global_batch_size
    useful = positions - per_sequence.get("padding", 0.0) * t.global_batch_size
    assumptions = [
        f"{hardware.gpu}: {peak / 1e12:,.0f} TFLOP/s dense {dtype} peak, MFU {hardware.mfu:.0%} on the matmuls",
        f"NVLink {hardware.nvlink_gb_s:g} GB/s within {hardware.gpus_per_node}-GPU nodes, InfiniBand "
        f"{hardware.ib_gb_s:g} GB/s per GPU between them; no latency, no overlap of TP/EP/DP communication",
        f"{micro_batches} micro-batches of {b} per pipeline per step (global batch {t.global_batch_size}, "
        f"dp {dp}); packing: {packing.source}",
    ]
    return StepTimeEstimate(compute, bubble, tp_comm, ep_comm, pp_comm, dp_comm, flops_per_step, positions, useful,
                            world_size, hardware.mfu, assumptions)
