"""Load a trained model from a run directory, in one process, for generation and evaluation.

    with cpu_compat.applied(run_device("runs/tiny_transfusion")):     # on CPU: the layer
        with load_run("runs/tiny_transfusion") as loaded:              # latest checkpoint
            loaded.model, loaded.cfg, loaded.provider, loaded.step, loaded.device
        # leaving the block tears down the process groups it started

    with load_run("runs/tiny_transfusion", step=20) as loaded: ...   # a given checkpoint
    with build_model(cfg, "cpu") as loaded: ...   # cfg's model, freshly initialised

``load_run``, ``load_export`` and ``build_model`` are context managers. When megatron's
model-parallel groups are not initialised, the block starts a world of one and shuts it down
on exit; when they are and form a world of one (a second model loaded inside the first's
block, e.g. a run and its export side by side), it reuses them and leaves them up. Any other
initialised layout is refused. On a CPU device megatron-core needs
``megafusion.parallel.cpu_compat``, which the entry points (``megafusion generate``,
``eval``, ``export``) apply around the whole command; ``run_device`` says which device a
run loads on before anything is built.

The run's ``config.yaml`` is read back and its parallel layout forced to a world of one
(TP = PP = EP = 1, no SP, no VPP): dist_checkpointing stores tensors with their global
shapes, so a checkpoint saved at any layout loads here. Only the model's weights are read
(the checkpoint's optimizer and RNG entries are left on disk).

``load_run`` also takes a directory written by ``megafusion export`` (``config.json`` +
``model.safetensors`` or its sharded index + tokenizer/representation): the same model is
built from ``config.json`` and its weights read from safetensors only, strictly (every
tensor by the names of ``megafusion.interop.names``, with its shape).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch

from megafusion.config import Config, ConfigError, load_config


@dataclass
class LoadedRun:
    """A trained model ready for inference (eval mode, no gradients needed)."""

    cfg: Config
    model: torch.nn.Module   # the unwrapped TransfusionModel (pre_process = post_process = True)
    provider: object         # the model.kind provider (tokenizer, representation via provider.stream)
    step: int | None         # checkpoint step, None for an untrained (freshly initialised) model
    device: torch.device
    run_dir: Path | None


def single_process_config(cfg: Config, device: str | None = None) -> Config:
    """``cfg`` with the parallel layout of a world of one (and ``train.device`` if given).

    The ``triton`` attention kernel needs as many queries as keys, which KV-cached decoding
    does not have; such runs decode with ``sdpa`` (same weights, same rule, the reference).
    """
    parallel = replace(cfg.parallel, tp=1, pp=1, ep=1, sp=False, vpp=None, distributed_optimizer=False)
    train = replace(cfg.train, device=device) if device is not None else cfg.train
    model = replace(cfg.model, attention="sdpa") if cfg.model.attention == "triton" else cfg.model
    return replace(cfg, parallel=parallel, train=train, model=model)


def checkpoint_path(run_dir: Path, step: int | None) -> tuple[int, Path]:
    """(step, directory) of the requested checkpoint, or of the newest one that verifies.

    Checkpoints are checked against their manifest (``training.checkpoint.select_checkpoint``):
    a corrupt latest one is skipped with a line saying why; a corrupt requested ``step``, or
    a run with no checkpoint that verifies, raises ``CheckpointError`` (a ValueError).
    """
    from megafusion.training.checkpoint import complete_checkpoints, select_checkpoint

    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"run dir '{run_dir}' is not a directory")
    found = complete_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"run dir '{run_dir}' has no complete checkpoint under checkpoints/ "
                                "(train it with `megafusion train ... --run-dir` first; checkpoint.save_final "
                                "writes one at the end)")
    chosen = select_checkpoint(run_dir, step)
    if chosen is None:
        raise FileNotFoundError(f"run dir '{run_dir}' has no checkpoint for step {step}; available steps: "
                                f"{[s for s, _ in found]}")
    return chosen


def _is_world_of_one() -> bool:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    return (dist.is_initialized() and dist.get_world_size() == 1
            and ps.get_tensor_model_parallel_world_size() == 1
            and ps.get_pipeline_model_parallel_world_size() == 1
            and ps.get_expert_model_parallel_world_size() == 1)


@contextlib.contextmanager
def _world_of_one(cfg: Config) -> Iterator[torch.device]:
    """torch.distributed + megatron's groups for one process during the block (yields the
    device): started here and shut down on exit, or, when a world of one is already up (a
    model loaded inside another's block), reused and left up."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megafusion.parallel.setup import init_parallel, resolve_device, shutdown

    if ps.model_parallel_is_initialized():
        if not _is_world_of_one():
            raise RuntimeError("megatron's model-parallel groups are already initialised for more than one "
                               "process; load the model in a fresh process (or shut the other world down first)")
        device = resolve_device(cfg.train.device)
        backend = dist.get_backend()
        if (device.type == "cuda") != (backend == "nccl"):
            raise RuntimeError(f"a world of one is already up with the {backend} backend, which cannot "
                               f"serve a model on {device}; load it with the same device as the first one")
        yield device
        return
    env = init_parallel(cfg)
    try:
        yield env.device
    finally:
        shutdown()


@contextlib.contextmanager
def build_model(cfg: Config, device: str | None = None) -> Iterator[LoadedRun]:
    """``cfg``'s model at world size 1, freshly initialised (no checkpoint), for the block."""
    from megafusion.model.transformer_config import build_transformer_config
    from megafusion.recipes import get_provider

    cfg = single_process_config(cfg, device)
    with _world_of_one(cfg) as dev:
        transformer_config = build_transformer_config(cfg, dev)
        provider = get_provider(cfg, transformer_config)
        model = provider.build(pre_process=True, post_process=True, vp_stage=None).to(dev)
        model.eval()
        yield LoadedRun(cfg, model, provider, None, dev, None)


def _check_kind(cfg: Config, kinds: tuple[str, ...] | None, where: Path) -> None:
    if kinds is not None and cfg.model.kind not in kinds:
        raise ConfigError(f"{where}: model.kind = {cfg.model.kind!r}; generation and ShapesWorld "
                          "evaluation need a Transfusion model (model.kind: transfusion)")


def _run_config(run_dir: Path) -> Path:
    """The config file of a run dir written by ``megafusion train`` (FileNotFoundError otherwise)."""
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"'{config_file}' does not exist: --run-dir must be a directory written by "
                                "`megafusion train` (it holds config.yaml and checkpoints/) or by "
                                "`megafusion export` (config.json and model.safetensors)")
    return config_file


def run_device(run_dir: str | Path, device: str | None = None) -> torch.device:
    """The device ``load_run(run_dir, device=device)`` loads on: ``device`` ("cpu", "cuda",
    "auto") or else the run's (or export's) ``train.device``. Reads only the config, so an
    entry point can apply ``cpu_compat.applied(run_device(...))`` before loading."""
    from megafusion.interop.safetensors_io import is_export, read_config
    from megafusion.parallel.setup import resolve_device

    if device is None:
        run_dir = Path(run_dir)
        cfg = read_config(run_dir)[0] if is_export(run_dir) else load_config(_run_config(run_dir))
        device = cfg.train.device
    return resolve_device(device)


@contextlib.contextmanager
def load_run(run_dir: str | Path, step: int | None = None, device: str | None = None,
             kinds: tuple[str, ...] | None = ("transfusion",)) -> Iterator[LoadedRun]:
    """The run's model at world size 1 with its checkpoint's weights, for the ``with`` block.

    ``device``: "cpu", "cuda" or "auto"; default: the run's ``train.device``.
    ``kinds``: the model kinds the caller can use (generation and evaluation need a
    Transfusion model); None accepts any. A missing or unusable run raises on entering
    the block, before any process group starts.
    """
    from megatron.core import dist_checkpointing

    from megafusion.interop.safetensors_io import is_export
    from megafusion.training.checkpoint import unwrap
    from megafusion.training.safe_load import restricted_loading

    run_dir = Path(run_dir)
    if is_export(run_dir):
        with load_export(run_dir, step, device, kinds) as loaded:
            yield loaded
        return
    config_file = _run_config(run_dir)
    cfg = load_config(config_file)
    _check_kind(cfg, kinds, config_file)
    ckpt_step, path = checkpoint_path(run_dir, step)
    with build_model(cfg, device) as loaded:
        model = unwrap(loaded.model)
        with restricted_loading():  # .metadata and stored objects: checkpoint data only, never code
            state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
        model.load_state_dict(state["model"], strict=True)
        model.eval()
        loaded.step, loaded.run_dir = ckpt_step, run_dir
        yield loaded


@contextlib.contextmanager
def load_export(export_dir: str | Path, step: int | None = None, device: str | None = None,
                kinds: tuple[str, ...] | None = ("transfusion",)) -> Iterator[LoadedRun]:
    """``load_run`` for a ``megafusion export`` directory (one step: the exported one)."""
    from megafusion.interop.safetensors_io import load_strict, read_config, read_tensors
    from megafusion.training.checkpoint import unwrap

    export_dir = Path(export_dir)
    cfg, raw = read_config(export_dir)
    _check_kind(cfg, kinds, export_dir / "config.json")
    exported_step = int(raw.get("step") or 0)
    if step is not None and step != exported_step:
        raise FileNotFoundError(f"'{export_dir}' is an export of step {exported_step} only; drop --step "
                                f"or export step {step} from its run dir")
    tensors = read_tensors(export_dir)
    with build_model(cfg, device) as loaded:
        load_strict(unwrap(loaded.model), tensors, export_dir, raw.get("dtype"))
        loaded.model.eval()
        loaded.step, loaded.run_dir = exported_step, export_dir
        yield loaded
