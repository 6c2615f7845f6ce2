"""``model.moe.experts: grouped`` - the routed experts as one grouped MLP instead of a loop of MLPs.

megatron-core's local spec runs the experts as ``SequentialMLP``: one ``MLP`` module (two
parallel linears) per local expert and a Python loop over them. :class:`GroupedExperts` holds
the same weights stacked per projection and runs all local experts with
:func:`megafusion_kernels.grouped_mlp.grouped_mlp` (one ``torch._grouped_mm`` per projection on
a Hopper GPU in bf16, one matmul per expert elsewhere)::

    weight1 [E_local, fc1_out, Hd]   fc1_out = 2F (gate rows first, then up) with a GLU, else F
    weight2 [E_local, Hd, F]

Each slice ``weight1[i]`` / ``weight2[i]`` is exactly expert i's ``linear_fc1.weight`` /
``linear_fc2.weight`` of SequentialMLP (``nn.Linear`` layout [out, in]), so:

* ``state_dict()`` has SequentialMLP's keys (``local_experts.<i>.linear_fc1.weight``,
  ``..._extra_state`` = None) and ``load_state_dict`` takes them (or the stacked
  ``weight1`` / ``weight2``): interop export/import and plain state dicts are unchanged;
* ``sharded_state_dict()`` describes the same global tensors, keys, offsets and replica ids
  as SequentialMLP's (per expert, the GLU weight split in its two halves), wrapped in one
  ``ShardedTensorFactory`` per projection whose ``data`` is the stacked parameter (megatron's
  optimizer maps its state to parameters by identity): distributed checkpoints of either
  module load into the other, and the layout-independent init (``megafusion.model.init``)
  draws the same initial weights.

Expert parallelism: each EP rank holds ``num_moe_experts / ep`` experts (megatron's MoELayer
picks which); the parameters carry megatron's expert flags (``allreduce = False`` under EP) so
DDP and the optimizer reduce them over the expert-data-parallel group. Refused with a clear
error: expert tensor parallelism (``parallel.tp > 1`` gives experts TP too; use
``model.moe.experts = megatron``), biases, FP8/FP4, delayed weight gradients, activations
other than swiglu / silu / gelu / relu.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_object_for_checkpoint

from megafusion_kernels.grouped_mlp import grouped_mlp

__all__ = ["EXPERTS_CHOICES", "GroupedExperts"]

EXPERTS_CHOICES = ("megatron", "grouped")
_PROJECTIONS = (("weight1", "linear_fc1"), ("weight2", "linear_fc2"))
_EXTRA_STATE = "_extra_state"


def _activation_name(config) -> str:
    act = config.activation_func
    if config.gated_linear_unit:
        if act is F.silu:
            return "swiglu"
        raise ValueError(f"model.moe.experts = grouped supports the gated activation silu (swiglu), not "
                         f"{getattr(act, '__name__', act)}; use model.moe.experts = megatron")
    names = {F.silu: "silu", F.gelu: "gelu", F.relu: "relu"}
    if act not in names:
        raise ValueError(f"model.moe.experts = grouped supports silu / gelu / relu, not "
                         f"{getattr(act, '__name__', act)}; use model.moe.experts = megatron")
    return names[act]


def _check_supported(config, expt_tp_size: int) -> None:
    if expt_tp_size > 1:
        raise ValueError(
            f"model.moe.experts = grouped does not shard experts with tensor parallelism (expert TP size "
            f"{expt_tp_size}, from parallel.tp); use model.moe.experts = megatron with parallel.tp > 1, "
            "or parallel.tp = 1 (parallel.ep shards the experts)")
    refused = {
        "add_bias_linear": "biases in the expert linears",
        "fp8": "FP8", "fp4": "FP4",
        "delay_wgrad_compute": "delayed weight-gradient computation",
        "use_te_activation_func": "Transformer Engine's activation modules",
    }
    for field, what in refused.items():
        if getattr(config, field, None):
            raise ValueError(f"model.moe.experts = grouped does not support {what} (TransformerConfig.{field} = "
                             f"{getattr(config, field)!r}); use model.moe.experts = megatron")
    if getattr(config, "activation_func_clamp_value", None) is not None or getattr(config, "glu_linear_offset", 0.0):
        raise ValueError("model.moe.experts = grouped does not support activation_func_clamp_value / "
                         "glu_linear_offset; use model.moe.experts = megatron")


class GroupedExperts(MegatronModule):
    """All local routed experts of a MoE layer as one grouped MLP (see the module docstring).

    Built by megatron's MoELayer like SequentialMLP:
    ``GroupedExperts(num_local_experts, config, pg_collection=..., name=...)``.

    Forward: (x_perm [N, Hd] rows grouped by local expert, tokens_per_expert [E_local],
    permuted_probs [N]) -> (y_perm [N, Hd], None); row r is scaled by permuted_probs[r] after
    the activation, as megatron's experts do.
    """

    def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None,
                 name: Optional[str] = None):
        super().__init__(config=config)
        del submodules  # SequentialMLP's linear classes: the grouped kernel replaces them
        if pg_collection is None:
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            pg_collection = get_default_pg_collection()
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        _check_supported(config, self.tp_group.size())
        self.activation = _activation_name(config)
        self.num_local_experts = num_local_experts
        hidden = config.hidden_size
        ffn = config.moe_ffn_hidden_size
        fc1_out = 2 * ffn if config.gated_linear_unit else ffn
        device = torch.device("cpu") if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight1 = torch.nn.Parameter(torch.empty(num_local_experts, fc1_out, hidden, device=device,
                                                      dtype=config.params_dtype))
        self.weight2 = torch.nn.Parameter(torch.empty(num_local_experts, hidden, ffn, device=device,
                                                      dtype=config.params_dtype))
        # the attributes ColumnParallelLinear / RowParallelLinear give expert weights
        expert_pgs = config.expert_model_parallel_size > 1 or (
            config.expert_tensor_parallel_size != config.tensor_model_parallel_size)
        for weight, partition_dim, stride in ((self.weight1, 1, 2 if config.gated_linear_unit else 1),
                                              (self.weight2, 2, 1)):
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=partition_dim, stride=stride)
            weight.allreduce = not expert_pgs
        if config.perform_initialization:
            self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Per expert, what megatron's linears draw (megafusion re-initialises layout-independently)."""
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, get_expert_parallel_rng_tracker_name

        fc2_init = self.config.output_layer_init_method or self.config.init_method
        with get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()):
            for i in range(self.num_local_experts):
                self.config.init_method(self.weight1[i])
                fc2_init(self.weight2[i])

    # ------------------------------------------------------------------ forward

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        x = permuted_local_hidden_states
        if self.config.moe_apply_probs_on_input:
            # megatron: the probabilities scale the input (top-1 only) and not the activation
            x = (permuted_probs.unsqueeze(-1) * x).to(x.dtype)
            permuted_probs = torch.ones_like(permuted_probs)
        out = grouped_mlp(x, tokens_per_expert, self.weight1.transpose(1, 2), self.weight2.transpose(1, 2),
                          self.activation, row_scale=permuted_probs)
        return out, None

    # ------------------------------------------------------------------ plain state dict

    def _expert_key(self, prefix: str, i: int, linear: str, leaf: str) -> str:
        return f"{prefix}local_experts.{i}.{linear}.{leaf}"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # SequentialMLP's keys and order: per expert fc1 weight, fc1 extra state, fc2 ...
        for i in range(self.num_local_experts):
            for param_name, linear in _PROJECTIONS:
                w = getattr(self, param_name)[i]
                destination[self._expert_key(prefix, i, linear, "weight")] = w if keep_vars else w.detach()
                destination[self._expert_key(prefix, i, linear, _EXTRA_STATE)] = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        expected = set()
        for param_name, linear in _PROJECTIONS:
            param = getattr(self, param_name)
            stacked_key = prefix + param_name
            expected.add(stacked_key)
            per_expert = [self._expert_key(prefix, i, linear, "weight") for i in range(self.num_local_experts)]
            expected.update(per_expert)
            expected.update(self._expert_key(prefix, i, linear, _EXTRA_STATE) for i in range(self.num_local_experts))
            if stacked_key in state_dict:  # what sharded_state_dict's factories load back
                self._copy_into(param, state_dict[stacked_key], stacked_key, error_msgs)
                continue
            for i, key in enumerate(per_expert):
                if key in state_dict:
                    self._copy_into(param[i], state_dict[key], key, error_msgs)
                elif strict:
                    missing_keys.append(key)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in expected)

    @staticmethod
    def _copy_into(target: torch.Tensor, value, key: str, error_msgs: list) -> None:
        if not isinstance(value, torch.Tensor) or value.shape != target.shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {shape}, "
                              f"the shape in current model is {tuple(target.shape)}.")
            return
        with torch.no_grad():
            target.copy_(value)

    # ------------------------------------------------------------------ distributed checkpoint

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """SequentialMLP's sharded tensors and objects, built from the stacked parameters."""
        singleton = (metadata or {}).get("singleton_local_shards", False)
        ep_rank, ep_size = self.ep_group.rank(), self.ep_group.size()
        num_global = ep_size * self.num_local_experts
        first_global = ep_rank * self.num_local_experts
        replica_id = (0, 0, self.dp_group.rank())  # SequentialMLP: (PP, TP, expert-DP rank)

        def expert_layout(i: int) -> tuple[str, tuple]:
            """(checkpoint key prefix, offsets) of local expert i, as SequentialMLP names it."""
            g = first_global + i
            if singleton:
                return f"{prefix}experts.{g}.", tuple(sharded_offsets)
            return f"{prefix}experts.", (*sharded_offsets, (len(sharded_offsets), g, num_global))

        def build(linear: str, glu: bool):
            suffix = f"experts.{linear}.weight"

            def build_fn(key, t, replica_id, flattened_range):
                # ``key`` is the factory's, after the enclosing modules renamed prefixes
                # (the block maps ``decoder.layers.<i>.`` to ``decoder.layers.``)
                if flattened_range is not None:
                    raise NotImplementedError("GroupedExperts: flattened (distributed-optimizer model-space) "
                                              "checkpoint shards are not supported; use fully_reshardable")
                if not key.endswith(suffix):
                    raise ValueError(f"GroupedExperts: factory key {key!r} does not end with {suffix!r}")
                base = key[: -len(suffix)]
                pieces = []
                for i in range(self.num_local_experts):
                    _, offsets = expert_layout(i)
                    ckpt_key = f"{base}experts.{first_global + i}.{linear}.weight" if singleton else key
                    axis = len(offsets)  # first axis of the [out, in] weight in the global tensor
                    if glu:  # megatron's apply_swiglu_sharded_factory at TP 1: the two halves
                        w, v = torch.chunk(t[i], 2, dim=0)
                        keys = (f"{ckpt_key}_w", f"{ckpt_key}_v") if singleton else (ckpt_key, ckpt_key)
                        frag = ((axis, 0, 1), (axis, 0, 1)) if singleton else ((axis, 0, 2), (axis, 1, 2))
                        pieces.append([ShardedTensor.from_rank_offsets(k, half, *offsets, f, replica_id=replica_id,
                                                                       prepend_axis_num=len(offsets))
                                       for k, half, f in zip(keys, (w, v), frag)])
                    else:
                        tp_axis = axis + (0 if linear == "linear_fc1" else 1)
                        pieces.append(ShardedTensor.from_rank_offsets(ckpt_key, t[i], *offsets, (tp_axis, 0, 1),
                                                                      replica_id=replica_id,
                                                                      prepend_axis_num=len(offsets)))
                return pieces

            def merge_fn(loaded):
                return torch.stack([torch.cat(p, dim=0) if glu else p for p in loaded])

            return build_fn, merge_fn

        out = {}
        for param_name, linear in _PROJECTIONS:
            glu = linear == "linear_fc1" and self.config.gated_linear_unit
            build_fn, merge_fn = build(linear, glu)
            out[prefix + param_name] = ShardedTensorFactory(f"{prefix}experts.{linear}.weight", getattr(self, param_name),
                                                            build_fn, merge_fn, replica_id)
            for i in range(self.num_local_experts):
                key_prefix, offsets = expert_layout(i)
                out[self._expert_key(prefix, i, linear, _EXTRA_STATE)] = make_sharded_object_for_checkpoint(
                    None, f"{key_prefix}{linear}.{_EXTRA_STATE}", offsets, replica_id)
        return out

    def extra_repr(self) -> str:
        e, fc1_out, hidden = self.weight1.shape
        return (f"num_local_experts={e}, hidden={hidden}, ffn={self.weight2.shape[2]}, "
                f"activation={self.activation}, fc1_out={fc1_out}")
