"""Run megatron-core on CPU (gloo) by rerouting its CUDA-only calls.

megatron-core assumes a CUDA device in a few dozen places: it asks
``torch.cuda.current_device()`` for where to allocate, creates tensors with a
literal ``device="cuda"`` or ``.cuda()``, asserts ``param.type() ==
"torch.cuda.FloatTensor"``, keeps its model-parallel RNG streams in the CUDA
generator, orders work with CUDA streams/events, and passes all-to-all split
sizes as tensors (which gloo rejects). This module makes exactly those sites
work on CPU, for the one megatron-core version it was written against, and
nothing else:

* **module-local torch** - each megatron module listed in ``_MEGATRON_MODULES``
  gets its module-global name ``torch`` rebound to a stand-in that is the real
  ``torch`` except for ``torch.cuda`` (current device = CPU, streams/events/
  synchronize are no-ops, the "CUDA" RNG is the CPU generator) and the tensor
  factories (``device="cuda"`` becomes ``"cpu"``). Code outside those modules,
  and ``torch`` itself, is untouched.
* **RNG tracker** - ``tensor_parallel.random``'s state get/set helpers and
  ``CudaRNGStatesTracker.fork`` use the CPU default generator, so forked
  streams (TP-region dropout, per-rank init) keep their meaning on CPU.
* **CUDA tensor methods** - the few megatron functions that call
  ``Tensor.type()`` or ``Tensor.cuda()`` run inside a context in which a CPU
  tensor reports CUDA type names and ``.cuda()`` returns the tensor itself.
  Those are set-up functions plus the gradient clip (one attribute swap per step).
* **gloo collectives** - ``tensor_parallel.all_to_all`` turns tensor or numpy
  split sizes into Python lists (gloo takes only lists), and the uneven
  all-gather / reduce-scatter of ``tensor_parallel.mappings`` (expert TP with
  the alltoall dispatcher), which gloo lacks, become pad-and-gather and
  all-reduce-and-slice. Batched pipeline send/recv get a tag per direction:
  with two pipeline ranks and virtual stages each rank's previous stage is also
  its next, and gloo would pair an activation with a gradient of the same shape.
* **distributed optimizer checkpoints** - three bugs of megatron-core's torch-Adam
  path (taken whenever TE/Apex are absent, as on every CPU) are fixed; see
  ``_patch_distributed_optimizer_torch_adam_checkpoint``. A GPU machine without TE and
  Apex takes the same path, so ``apply("cuda")`` applies these fixes (and nothing else)
  there too; whether TE/Apex are present is megatron's own answer
  (``distrib_optimizer.HAVE_APEX_OR_TE``), so this module never imports TE itself.

Cost: a tensor factory called from a patched module takes ~0.8 us longer (2.1 -> 2.9 us,
measured); nothing else runs per step, against ~100 ms steps of the smallest CPU model.

Who applies it: the entry points (``megafusion train`` / ``python -m megafusion.train`` and
its torchrun workers, ``generate``, ``eval``, ``export``, ``import``, ``bench``,
``quickstart``), for as long as they run, and nothing else; ``init_parallel`` refuses a
CPU device without it. From Python, around any code that builds megatron models::

    from megafusion.parallel import cpu_compat
    with cpu_compat.applied(device):   # a no-op for a CUDA device, or when already active
        ...                            # init_parallel, load_run, build_model_chunks, ...

``applied`` removes the layer on exit only if it applied it, so entry points nest (the
quickstart runs training and evaluation in-process). ``apply("cpu")`` / ``remove()`` are
the unscoped forms (``apply("cuda")`` returns False).

On a GPU run nothing here is applied but the torch-Adam checkpoint fixes, and those only
when neither TE nor Apex is installed (megatron then wraps torch's Adam exactly as on CPU)
and megatron-core is ``SUPPORTED_MEGATRON_CORE`` (they fix that version's code; another
version runs unpatched). ``apply("cpu")`` refuses any megatron-core other than
``SUPPORTED_MEGATRON_CORE``: the sites above are version specific.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
from typing import Any, Callable, Iterator

import torch

SUPPORTED_MEGATRON_CORE = "0.19.2"

# Megatron modules whose global `torch` is replaced by the CPU stand-in. Each
# calls torch.cuda.* or creates device="cuda" tensors on a path a CPU run takes.
_MEGATRON_MODULES = (
    "megatron.core.utils",
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.module",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.async_utils",
)


class MegatronVersionError(RuntimeError):
    """The installed megatron-core is not the version this layer was written for."""


_active = False
_torch_adam_fixed = False  # the torch-Adam checkpoint fixes are applied (CPU layer, or a GPU without TE/Apex)
# (owner, attribute name, original value) for every patch, in application order.
_patches: list[tuple[Any, str, Any]] = []


def installed_megatron_version() -> str:
    """The installed megatron-core version string, e.g. ``'0.19.2+f6a5b40'``."""
    import megatron.core

    return str(megatron.core.__version__)


def check_megatron_version() -> None:
    """Raise MegatronVersionError unless megatron-core is ``SUPPORTED_MEGATRON_CORE``.

    A local build suffix (``0.19.2+f6a5b40``) is ignored.
    """
    installed = installed_megatron_version()
    if installed.split("+", 1)[0] != SUPPORTED_MEGATRON_CORE:
        raise MegatronVersionError(
            f"megafusion's CPU compatibility layer supports megatron-core=={SUPPORTED_MEGATRON_CORE}"
            f" but megatron-core {installed} is installed. The CUDA call sites it reroutes"
            f" differ between versions, so it refuses to guess. Fix: "
            f"pip install --no-deps --ignore-requires-python megatron-core=={SUPPORTED_MEGATRON_CORE}"
            f" (or run on a GPU, where this layer is not used)."
        )


def is_active() -> bool:
    """Whether ``apply("cpu")`` has patched megatron-core in this process."""
    return _active


def torch_adam_fixes_active() -> bool:
    """Whether the distributed optimizer's torch-Adam checkpoint fixes are applied."""
    return _torch_adam_fixed


def _megatron_wraps_torch_adam() -> bool:
    """Whether megatron-core's distributed optimizer wraps torch's Adam: neither Transformer
    Engine nor Apex could be imported (megatron's own flag; nothing is imported here but
    megatron's optimizer module, which a training run imports anyway)."""
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def apply(device: str | torch.device = "cpu") -> bool:
    """Make megatron-core run on ``device``; returns whether the CPU layer is active.

    ``"cuda"`` (any CUDA device) returns False and patches nothing but the torch-Adam
    checkpoint fixes, and those only when TE and Apex are both absent and megatron-core is
    ``SUPPORTED_MEGATRON_CORE`` (``remove`` undoes them). ``"cpu"`` checks the megatron-core
    version, patches once (later calls are no-ops) and returns True.
    """
    global _active
    device_type = torch.device(device).type
    if device_type == "cuda":
        if (not _torch_adam_fixed and installed_megatron_version().split("+", 1)[0] == SUPPORTED_MEGATRON_CORE
                and _megatron_wraps_torch_adam()):
            _patch_distributed_optimizer_torch_adam_checkpoint()
        return False
    if device_type != "cpu":
        raise ValueError(f"cpu_compat.apply: device {device!r} is neither 'cpu' nor 'cuda'")
    if _active:
        return True
    check_megatron_version()
    try:
        _patch_module_torch()
        _patch_rng_tracker()
        _patch_cuda_tensor_methods()
        _patch_all_to_all()
        _patch_distributed_optimizer_torch_adam_checkpoint()
        _patch_batched_p2p_tags()
    except BaseException:
        remove()
        raise
    _active = True
    return True


def remove() -> None:
    """Undo ``apply`` (prefer ``applied``, which removes only what it applied)."""
    global _active, _torch_adam_fixed
    while _patches:
        owner, name, original = _patches.pop()
        if original is _ABSENT:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    _active = False
    _torch_adam_fixed = False


@contextlib.contextmanager
def applied(device: str | torch.device = "cpu") -> Iterator[bool]:
    """The layer for ``device`` during the ``with`` block; yields ``apply(device)`` (True on
    CPU, False for a CUDA device).

    A CPU device applies it unless it is already active; a CUDA device changes nothing
    (any other device is refused, as by ``apply``). On exit it is removed only if this
    block applied it: an entry point called from another one (the quickstart runs
    training and evaluation in-process) leaves the outer one's layer in place.
    """
    was_active, was_fixed = _active, _torch_adam_fixed
    active = apply(device)
    try:
        yield active
    finally:
        if (active and not was_active) or (_torch_adam_fixed and not was_fixed):
            remove()


_ABSENT = object()


def _patch(owner: Any, name: str, value: Any) -> None:
    # Classes: keep the raw __dict__ entry (a classmethod stays a classmethod).
    original = owner.__dict__.get(name, _ABSENT) if isinstance(owner, type) else getattr(owner, name)
    _patches.append((owner, name, original))
    setattr(owner, name, value)


# --------------------------------------------------------------------------- torch stand-in


class _CpuStream:
    """A CUDA stream stand-in: CPU work is already ordered, so every call is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    @staticmethod
    def priority_range() -> tuple[int, int]:
        return (0, 0)

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "_CpuEvent":
        return event if event is not None else _CpuEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _CpuEvent:
    """A CUDA event stand-in: always complete."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event: Any) -> float:
        return 0.0


_CPU_STREAM = _CpuStream()
_CPU = torch.device("cpu")


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int)  # a bare index means a CUDA device to torch


def _factory_on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(factory)
    def on_cpu(*args: Any, **kwargs: Any) -> torch.Tensor:
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs["device"] = _CPU
        return factory(*args, **kwargs)

    return on_cpu


def _autocast_on_cpu(device_type: str, *args: Any, **kwargs: Any) -> torch.autocast:
    return torch.autocast("cpu" if device_type == "cuda" else device_type, *args, **kwargs)


def _module_forwarding_to(real: types.ModuleType, name: str) -> types.ModuleType:
    """A new module object with a snapshot of ``real``'s attributes; later or lazy
    attributes are looked up on ``real``."""
    shim = types.ModuleType(name)
    shim.__dict__.update(real.__dict__)
    shim.__dict__["__getattr__"] = lambda attr: getattr(real, attr)
    return shim


def _build_cpu_cuda_namespace() -> types.ModuleType:
    cuda = _module_forwarding_to(torch.cuda, "torch.cuda")
    cuda.current_device = lambda: _CPU
    cuda.current_stream = lambda device=None: _CPU_STREAM
    cuda.default_stream = lambda device=None: _CPU_STREAM
    cuda.Stream = _CpuStream
    cuda.Event = _CpuEvent
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.is_current_stream_capturing = lambda: False
    # The "CUDA" generator megatron seeds and forks is the CPU default generator:
    # on CPU that is the one dropout and init draw from.
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = cuda.manual_seed
    return cuda


def _build_cpu_torch() -> types.ModuleType:
    shim = _module_forwarding_to(torch, "torch")
    shim.cuda = _build_cpu_cuda_namespace()
    for name in ("tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn",
                 "randint", "zeros_like", "ones_like", "empty_like", "full_like"):
        setattr(shim, name, _factory_on_cpu(getattr(torch, name)))
    shim.autocast = _autocast_on_cpu
    return shim


def _patch_module_torch() -> None:
    cpu_torch = _build_cpu_torch()
    for module_name in _MEGATRON_MODULES:
        module = importlib.import_module(module_name)
        if getattr(module, "torch", None) is not torch:
            raise MegatronVersionError(
                f"{module_name} has no module-global 'torch'; megatron-core does not look like "
                f"{SUPPORTED_MEGATRON_CORE}"
            )
        _patch(module, "torch", cpu_torch)


# --------------------------------------------------------------------------- RNG tracker


def _get_cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random

    default_name = random._MODEL_PARALLEL_RNG_TRACKER_NAME

    @contextlib.contextmanager
    def fork(self: random.CudaRNGStatesTracker, name: str = default_name):
        """CudaRNGStatesTracker.fork on the CPU generator (megatron's version also
        warns whenever the CPU state changes inside the fork, which on CPU is always)."""
        if name not in self.states_:
            raise Exception(f"cuda rng state {name} is not added")
        outer_state = torch.get_rng_state()
        outer_name = self._current_state_name
        if outer_name != "default-rng":
            self.states_[outer_name] = outer_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            if self._current_state_name != name:
                raise Exception(
                    f"current state name {self._current_state_name} is not the same as the "
                    f"desired state name {name}."
                )
            self.states_[name] = torch.get_rng_state()
            if outer_name != "default-rng":
                outer_state = self.states_[outer_name]
            torch.set_rng_state(outer_state)
            self._current_state_name = outer_name

    _patch(random, "_get_cuda_rng_state", _get_cpu_rng_state)
    _patch(random, "_set_cuda_rng_state", _set_cpu_rng_state)
    _patch(random.CudaRNGStatesTracker, "fork", fork)


# --------------------------------------------------------------------------- Tensor.type / .cuda


def _type_reporting_cuda(original: Callable[..., Any]) -> Callable[..., Any]:
    def type_(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
        result = original(self, dtype, non_blocking, **kwargs)
        if dtype is None and self.device.type == "cpu":
            return "torch.cuda." + result[len("torch."):]
        return result

    return type_


def _cuda_returning_self(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return self


_look_like_cuda_depth = 0  # the wrapped functions nest (DistributedOptimizer.__init__)


@contextlib.contextmanager
def _cpu_tensors_look_like_cuda():
    """Within: ``t.type()`` of a CPU tensor says ``torch.cuda.*`` and ``t.cuda()`` is ``t``."""
    global _look_like_cuda_depth
    if _look_like_cuda_depth:
        yield
        return
    original_type, original_cuda = torch.Tensor.type, torch.Tensor.cuda
    torch.Tensor.type = _type_reporting_cuda(original_type)
    torch.Tensor.cuda = _cuda_returning_self
    _look_like_cuda_depth = 1
    try:
        yield
    finally:
        _look_like_cuda_depth = 0
        torch.Tensor.type, torch.Tensor.cuda = original_type, original_cuda


def _with_cpu_tensors_looking_like_cuda(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _cpu_tensors_look_like_cuda():
            return function(*args, **kwargs)

    return wrapped


def _patch_cuda_tensor_methods() -> None:
    from megatron.core import utils
    from megatron.core.dist_checkpointing import exchange_utils
    from megatron.core.models.common.language_module import language_module
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    clip = _with_cpu_tensors_looking_like_cuda(clip_grads.clip_grad_by_total_norm_fp32)
    _patch(clip_grads, "clip_grad_by_total_norm_fp32", clip)
    _patch(optimizer, "clip_grad_by_total_norm_fp32", clip)  # `from .clip_grads import` copy

    fp16 = optimizer.Float16OptimizerWithFloat16Params
    _patch(fp16, "__init__", _with_cpu_tensors_looking_like_cuda(fp16.__init__))

    dist = distrib_optimizer.DistributedOptimizer
    _patch(dist, "__init__", _with_cpu_tensors_looking_like_cuda(dist.__init__))
    build = dist.__dict__["_build_model_and_main_param_groups"].__func__
    _patch(dist, "_build_model_and_main_param_groups",
           classmethod(_with_cpu_tensors_looking_like_cuda(build)))

    lm = language_module.LanguageModule
    _patch(lm, "setup_embeddings_and_output_layer",
           _with_cpu_tensors_looking_like_cuda(lm.setup_embeddings_and_output_layer))
    _patch(dist, "get_parameter_state_dp_zero",  # distributed-optimizer checkpoint save
           _with_cpu_tensors_looking_like_cuda(dist.get_parameter_state_dp_zero))
    _patch(utils, "check_param_hashes_across_dp_replicas",
           _with_cpu_tensors_looking_like_cuda(utils.check_param_hashes_across_dp_replicas))
    for name in ("exchange_loaded_tensors_gather_rounds", "exchange_loaded_tensors_broadcast"):
        _patch(exchange_utils, name,  # fully parallel checkpoint load
               _with_cpu_tensors_looking_like_cuda(getattr(exchange_utils, name)))


# --------------------------------------------------------------------------- all-to-all


def _as_split_list(sizes: Any) -> Any:
    if sizes is None or isinstance(sizes, list):
        return sizes
    if hasattr(sizes, "tolist"):  # torch.Tensor or numpy.ndarray
        return [int(s) for s in sizes.tolist()]
    return [int(s) for s in sizes]


def _patch_all_to_all() -> None:
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.moe import token_dispatcher

    original = mappings.all_to_all

    @functools.wraps(original)
    def all_to_all(group, input_, output_split_sizes_=None, input_split_sizes=None,
                   use_nccl_stream=False):
        # On GPU megatron moves split sizes to host numpy; on CPU they stay tensors,
        # and gloo's all_to_all_single accepts only lists of ints.
        return original(group, input_, _as_split_list(output_split_sizes_),
                        _as_split_list(input_split_sizes), use_nccl_stream)

    for owner in (mappings, tensor_parallel, token_dispatcher):
        _patch(owner, "all_to_all", all_to_all)

    # Uneven all-gather / reduce-scatter (the alltoall dispatcher with expert TP > 1): NCCL
    # takes per-rank sizes, gloo only equal ones. Pad-and-gather / all-reduce-and-slice instead.
    original_gather = mappings._gather_along_first_dim
    original_reduce_scatter = mappings._reduce_scatter_along_first_dim

    @functools.wraps(original_gather)
    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original_gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = _as_split_list(output_split_sizes)
        longest = max(sizes)
        padded = input_.new_zeros((longest,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = input_.new_empty((longest * len(sizes),) + tuple(input_.shape[1:]))
        torch.distributed.all_gather_into_tensor(gathered, padded, group=group)
        return torch.cat([gathered[r * longest: r * longest + n] for r, n in enumerate(sizes)])

    @functools.wraps(original_reduce_scatter)
    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None,
                                       use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return original_reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        sizes = _as_split_list(input_split_sizes)
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        start = sum(sizes[: group.rank()])
        return total[start: start + sizes[group.rank()]].clone()

    _patch(mappings, "_gather_along_first_dim", gather_along_first_dim)
    _patch(mappings, "_reduce_scatter_along_first_dim", reduce_scatter_along_first_dim)


# --------------------------------------------------------------------------- DistributedOptimizer


def _patch_distributed_optimizer_torch_adam_checkpoint() -> None:
    """Without TE/Apex (always so on CPU) the distributed optimizer wraps torch Adam, whose
    per-parameter state holds a tensor 'step'. megatron-core 0.19.2 mishandles that twice when
    loading a checkpoint: ``state_dict()`` asserts on a fresh optimizer (no 'step' yet), and
    the param-state loader looks for a 'step' shard that is never saved (megatron restores
    'step' from the param groups instead), and ``load_state_dict`` gives every parameter the
    *same* 'step' tensor, which torch's foreach Adam then increments once per parameter.

    Applied by ``apply("cpu")`` and, on a GPU machine without TE/Apex, by ``apply("cuda")``."""
    global _torch_adam_fixed
    from megatron.core.optimizer import distrib_optimizer

    dist = distrib_optimizer.DistributedOptimizer
    if _torch_adam_fixed or not _megatron_wraps_torch_adam():
        return
    original_sharded_state_dict = dist.sharded_state_dict
    original_set_states = dist._set_main_param_and_optimizer_states

    @functools.wraps(original_sharded_state_dict)
    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading=False, *args, **kwargs):
        if is_loading and len(self.optimizer.state) == 0:
            # Allocate Adam states (a zero-gradient step); the load overwrites them and the params.
            self._init_optimizer_states_with_dummy_values()
        if model_sharded_state_dict is None:
            model_sharded_state_dict = {}
        return original_sharded_state_dict(self, model_sharded_state_dict, is_loading, *args, **kwargs)

    @functools.wraps(original_set_states)
    def set_states(self, model_param, tensors):
        # None = "keep": the loader skips non-tensors, and load_state_dict already set 'step'.
        return original_set_states(self, model_param, {"step": None, **tensors})

    original_load_state_dict = dist.load_state_dict

    @functools.wraps(original_load_state_dict)
    def load_state_dict(self, state_dict):
        original_load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()  # one counter per parameter

    _patch(dist, "sharded_state_dict", sharded_state_dict)
    _patch(dist, "load_state_dict", load_state_dict)
    _patch(dist, "_set_main_param_and_optimizer_states", set_states)
    _torch_adam_fixed = True


# --------------------------------------------------------------------------- pipeline p2p

_TAG_TOWARD_NEXT = 1  # activations (send_next pairs with the peer's recv_prev)
_TAG_TOWARD_PREV = 2  # gradients (send_prev pairs with the peer's recv_next)


def _patch_batched_p2p_tags() -> None:
    """megatron's ``_batched_p2p_ops`` with a tag per direction. NCCL pairs the ops of one
    batch by position; gloo pairs by (peer, tag) in posting order, so with 2 pipeline ranks
    under the interleaved schedule (previous rank == next rank) an activation and a gradient
    of the same shape could swap silently."""
    from megatron.core.pipeline_parallel import p2p_communication

    def batched_p2p_ops(*, tensor_send_prev, tensor_recv_prev, tensor_send_next, tensor_recv_next,
                        group, prev_pipeline_rank, next_pipeline_rank):
        dist = torch.distributed
        ops = [
            dist.P2POp(op, tensor, peer, group, tag)
            for op, tensor, peer, tag in (
                (dist.isend, tensor_send_prev, prev_pipeline_rank, _TAG_TOWARD_PREV),
                (dist.irecv, tensor_recv_prev, prev_pipeline_rank, _TAG_TOWARD_NEXT),
                (dist.isend, tensor_send_next, next_pipeline_rank, _TAG_TOWARD_NEXT),
                (dist.irecv, tensor_recv_next, next_pipeline_rank, _TAG_TOWARD_PREV),
            )
            if tensor is not None
        ]
        return dist.batch_isend_irecv(ops) if ops else []

    _patch(p2p_communication, "_batched_p2p_ops", batched_p2p_ops)
