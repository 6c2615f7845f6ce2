"""``megafusion import``: an exported directory -> a megafusion run dir that training resumes from.

    megafusion import --from exported/tiny --run-dir runs/tiny_imported

Reads ``config.json`` and the safetensors file(s) (safetensors only, never pickle), loads
them strictly into the model built at world size 1, and writes ``config.yaml`` and
``checkpoints/step_00000000`` (fresh optimizer and LR schedule), stored with global shapes.

The checkpoint holds no optimizer state (a never-stepped optimizer has none, and
megatron-core drops an optimizer step of 0 when saving), so ``megafusion train`` on the
run dir resumes the weights at any layout with a fresh optimizer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from megafusion.interop import names


class ImportError_(ValueError):
    """An exported directory that cannot be imported (the message says which file/tensor)."""


def read_config(src: Path):
    """(Config, raw json) from ``src/config.json``; unknown or bad fields raise ConfigError."""
    from megafusion.config import load_config

    path = src / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' does not exist: --from must be a directory written by `megafusion export`")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ImportError_(f"'{path}' is not valid JSON: {err}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("config"), dict):
        raise ImportError_(f"'{path}' has no \"config\" mapping (the run's config as written by `megafusion export`)")
    tree = raw["config"]
    tokenizer = (tree.get("data") or {}).get("tokenizer")
    if tokenizer and not Path(tokenizer).is_absolute():
        tree["data"]["tokenizer"] = str((src / tokenizer).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        yaml_path = Path(tmp) / "config.yaml"
        yaml_path.write_text(yaml.safe_dump(tree, sort_keys=False))
        try:
            cfg = load_config(yaml_path)
        except Exception as err:
            raise type(err)(str(err).replace(str(yaml_path), str(path))) from None
    return cfg, raw


def read_tensors(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the export (one file or the shards named by the index), by exported name."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (src / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"'{src}' has neither model.safetensors nor model.safetensors.index.json")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            part = load_file(str(src / name))
        except (SafetensorError, OSError, ValueError) as err:
            raise ImportError_(f"'{src / name}' is not a readable safetensors file ({err}); "
                               "it may be truncated or corrupt: export it again") from None
        tensors.update(part)
    return tensors


def load_strict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], src: Path) -> None:
    """Copies ``tensors`` into ``model``: every parameter/buffer exactly once, with its shape."""
    expected = names.export_state(model.state_dict())
    given = {names.to_megafusion(k): v for k, v in tensors.items()}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    problems = [f"missing tensor '{k}' (model expects shape {tuple(expected[k].shape)})" for k in missing]
    problems += [f"unexpected tensor '{k}' (shape {tuple(given[k].shape)}; the model has no such entry)"
                 for k in unexpected]
    problems += [f"tensor '{k}' has shape {tuple(given[k].shape)} in the export but the model expects "
                 f"{tuple(expected[k].shape)}" for k in sorted(set(expected) & set(given))
                 if tuple(given[k].shape) != tuple(expected[k].shape)]
    if problems:
        raise ImportError_(f"'{src}' does not match the model its config.json describes:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for k, target in expected.items():
            target.copy_(given[k].to(target.dtype))


def import_export(src: str | Path, run_dir: str | Path) -> Path:
    """Writes ``run_dir`` (config.yaml + checkpoints/step_00000000) from the export ``src``."""
    import torch.distributed as dist

    from megafusion.config import save_config
    from megafusion.inference.loading import single_process_config
    from megafusion.model.provider import build_transformer_config, get_provider
    from megafusion.parallel.setup import init_parallel, shutdown
    from megafusion.training.checkpoint import Checkpointer, unwrap
    from megafusion.training.loop import build_model_chunks
    from megafusion.training.optim import build_optimizer, build_scheduler

    src, run_dir = Path(src), Path(run_dir)
    cfg, _ = read_config(src)
    tensors = read_tensors(src)
    if (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        raise FileExistsError(f"'{run_dir}' already has checkpoints; import into a new --run-dir")
    if cfg.data.tokenizer:
        run_dir.mkdir(parents=True, exist_ok=True)
        target = run_dir / Path(cfg.data.tokenizer).name
        shutil.copy2(cfg.data.tokenizer, target)
        from dataclasses import replace
        cfg = replace(cfg, data=replace(cfg.data, tokenizer=str(target.resolve())))
    world_of_one = single_process_config(cfg, "cpu")
    env = init_parallel(world_of_one)
    try:
        transformer_config = build_transformer_config(world_of_one, env.device)
        provider = get_provider(world_of_one, transformer_config)
        chunks = build_model_chunks(world_of_one, transformer_config, provider, env)
        load_strict(unwrap(chunks[0]), tensors, src)
        optimizer = build_optimizer(world_of_one, chunks)
        scheduler = build_scheduler(world_of_one, optimizer)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")  # the exported run's own layout
        Checkpointer(run_dir, cfg.checkpoint.keep, False, env.device).save(
            0, chunks, optimizer, scheduler, data_state={"step": 0}, with_optimizer=False)
        dist.barrier()
    finally:
        shutdown()
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megafusion import", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="src", required=True, help="directory written by `megafusion export`")
    parser.add_argument("--run-dir", required=True, help="new run directory to write")
    args = parser.parse_args(argv)
    run_dir = import_export(args.src, args.run_dir)
    print(f"[megafusion] imported {args.src} into {run_dir} (checkpoints/step_00000000)")
    return 0
