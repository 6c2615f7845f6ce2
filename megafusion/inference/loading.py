"""Load a trained model from a run directory, in one process, for generation and evaluation.

    loaded = load_run("runs/tiny_transfusion")          # latest checkpoint
    loaded = load_run("runs/tiny_transfusion", step=20)  # a given one
    loaded.model, loaded.cfg, loaded.provider, loaded.step, loaded.device
    ...
    close()                                             # tears the process groups down

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

from dataclasses import dataclass, replace
from pathlib import Path

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


# How many loaded models share the process groups this module started (``close`` tears
# them down when the last one is closed).
_users = 0


def _start_world_of_one(cfg: Config) -> torch.device:
    """Starts torch.distributed + megatron's groups for one process, or reuses the ones a
    previous ``build_model`` started (several models loaded in one process)."""
    global _users
    from megatron.core import parallel_state as ps

    from megafusion.parallel.setup import init_parallel, resolve_device

    if _users > 0 and ps.model_parallel_is_initialized():
        _users += 1
        return resolve_device(cfg.train.device)
    if ps.model_parallel_is_initialized():
        raise RuntimeError("megatron's model-parallel groups are already initialised by someone else; "
                           "load the model in a fresh process (or shut the other world down first)")
    env = init_parallel(cfg)
    _users = 1
    return env.device


def build_model(cfg: Config, device: str | None = None) -> LoadedRun:
    """Starts a world of one and builds ``cfg``'s model, freshly initialised (no checkpoint).
    Call ``close()`` once per ``build_model`` / ``load_run`` when done."""
    from megafusion.model.transformer_config import build_transformer_config
    from megafusion.recipes import get_provider

    cfg = single_process_config(cfg, device)
    dev = _start_world_of_one(cfg)
    transformer_config = build_transformer_config(cfg, dev)
    provider = get_provider(cfg, transformer_config)
    model = provider.build(pre_process=True, post_process=True, vp_stage=None).to(dev)
    model.eval()
    return LoadedRun(cfg, model, provider, None, dev, None)


def _check_kind(cfg: Config, kinds: tuple[str, ...] | None, where: Path) -> None:
    if kinds is not None and cfg.model.kind not in kinds:
        raise ConfigError(f"{where}: model.kind = {cfg.model.kind!r}; generation and ShapesWorld "
                          "evaluation need a Transfusion model (model.kind: transfusion)")


def load_run(run_dir: str | Path, step: int | None = None, device: str | None = None,
             kinds: tuple[str, ...] | None = ("transfusion",)) -> LoadedRun:
    """Builds the run's model at world size 1 and loads its checkpoint's weights.

    ``device``: "cpu", "cuda" or "auto"; default: the run's ``train.device``.
    ``kinds``: the model kinds the caller can use (generation and evaluation need a
    Transfusion model); None accepts any.
    """
    from megatron.core import dist_checkpointing

    from megafusion.interop.safetensors_io import is_export
    from megafusion.training.checkpoint import unwrap
    from megafusion.training.safe_load import restricted_loading

    run_dir = Path(run_dir)
    if is_export(run_dir):
        return load_export(run_dir, step, device, kinds)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"'{config_file}' does not exist: --run-dir must be a directory written by "
                                "`megafusion train` (it holds config.yaml and checkpoints/) or by "
                                "`megafusion export` (config.json and model.safetensors)")
    cfg = load_config(config_file)
    _check_kind(cfg, kinds, config_file)
    ckpt_step, path = checkpoint_path(run_dir, step)
    loaded = build_model(cfg, device)
    try:
        model = unwrap(loaded.model)
        with restricted_loading():  # .metadata and stored objects: checkpoint data only, never code
            state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
        model.load_state_dict(state["model"], strict=True)
        model.eval()
    except BaseException:
        close()
        raise
    loaded.step, loaded.run_dir = ckpt_step, run_dir
    return loaded


def load_export(export_dir: str | Path, step: int | None = None, device: str | None = None,
                kinds: tuple[str, ...] | None = ("transfusion",)) -> LoadedRun:
    """``load_run`` for a ``megafusion export`` directory (one step: the exported one)."""
    from megafusion.interop.safetensors_io import load_strict, read_config, read_tensors

    export_dir = Path(export_dir)
    cfg, raw = read_config(export_dir)
    _check_kind(cfg, kinds, export_dir / "config.json")
    exported_step = int(raw.get("step") or 0)
    if step is not None and step != exported_step:
        raise FileNotFoundError(f"'{export_dir}' is an export of step {exported_step} only; drop --step "
                                f"or export step {step} from its run dir")
    tensors = read_tensors(export_dir)
    loaded = build_model(cfg, device)
    try:
        from megafusion.training.checkpoint import unwrap

        load_strict(unwrap(loaded.model), tensors, export_dir, raw.get("dtype"))
        loaded.model.eval()
    except BaseException:
        close()
        raise
    loaded.step, loaded.run_dir = exported_step, export_dir
    return loaded


def close() -> None:
    """Releases one ``build_model`` / ``load_run``; the last one destroys the process groups."""
    global _users
    from megafusion.parallel.setup import shutdown

    if _users <= 0:
        return
    _users -= 1
    if _users == 0:
        shutdown()
