"""``megafusion import``: an exported directory -> a megafusion run dir that training resumes from.

    megafusion import --from exported/tiny --run-dir runs/tiny_imported [--keep-step]
    megafusion import --from exported/tiny --run-dir runs/finetune --config finetune.yaml --set parallel.ep=2

Reads ``config.json`` and the safetensors file(s) (safetensors only, never pickle), loads
them strictly into the model built at world size 1, and writes ``config.yaml`` and
``checkpoints/step_00000000`` (fresh optimizer and LR schedule; ``--keep-step``: at the
exported step, the LR schedule advanced to it), stored with global shapes. A run config of
its own (``--config``, or a ``config.yaml`` already in the run dir) must agree with the
export on every field that shapes the weights (``megafusion.interop.architecture``): a
disagreement is an error naming the field and both values.

The checkpoint holds no optimizer state (a never-stepped optimizer has none, and
megatron-core drops an optimizer step of 0 when saving), so ``megafusion train`` on the
run dir resumes the weights at any layout with a fresh optimizer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from megafusion.interop import names


class ImportError_(ValueError):
    """An exported directory that cannot be imported (the message says which file/tensor)."""


# Top-level entries of config.json (``architecture`` may be left out of hand-written ones).
CONFIG_JSON_FIELDS = ("format", "step", "dtype", "architecture", "config")


def is_export(path: str | Path) -> bool:
    """Whether ``path`` looks like a directory written by ``megafusion export`` (config.json, no config.yaml)."""
    path = Path(path)
    return (path / "config.json").is_file() and not (path / "config.yaml").is_file()


def read_config(src: Path, overrides: list[str] | tuple[str, ...] = ()):
    """(Config, raw json) from ``src/config.json`` (plus ``key=value`` overrides).

    Unknown or bad fields raise ConfigError naming the field; paths to the tokenizer and the
    representation are relative to ``src``; the ``architecture`` block must be what the
    config describes (``megafusion.interop.architecture``).
    """
    from megafusion.config import ConfigError, load_config
    from megafusion.interop.architecture import check_compatible, describe, differences
    from megafusion.interop.export import FORMAT

    src = Path(src)
    path = src / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' does not exist: --from must be a directory written by `megafusion export`")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ImportError_(f"'{path}' is not valid JSON: {err}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("config"), dict):
        raise ImportError_(f"'{path}' has no \"config\" mapping (the run's config as written by `megafusion export`)")
    unknown = sorted(set(raw) - set(CONFIG_JSON_FIELDS))
    if unknown:
        raise ConfigError(f"'{path}': unknown field(s) {unknown}; config.json holds {list(CONFIG_JSON_FIELDS)}")
    if raw.get("format", FORMAT) != FORMAT:
        raise ConfigError(f"'{path}': format = {raw['format']!r}, this megafusion reads {FORMAT!r}")
    tree = json.loads(json.dumps(raw["config"]))  # a copy: raw keeps the paths as written
    representation_path = (tree.get("vision") or {}).get("path")
    for section, key in (("data", "tokenizer"), ("vision", "path")):
        value = (tree.get(section) or {}).get(key)
        if value and not Path(value).is_absolute():
            tree[section][key] = str((src / value).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        yaml_path = Path(tmp) / "config.yaml"
        yaml_path.write_text(yaml.safe_dump(tree, sort_keys=False))
        try:
            cfg = load_config(yaml_path)
            changed = load_config(yaml_path, overrides) if overrides else cfg
        except Exception as err:
            raise type(err)(str(err).replace(str(yaml_path), str(path))) from None
    if "architecture" in raw:
        problems = differences(raw["architecture"], describe(cfg, representation_path=representation_path))
        if problems:
            raise ConfigError(f"'{path}': the architecture block disagrees with the config it ships:\n  "
                              + "\n  ".join(problems) + "\n(the \"config\" mapping is the truth: fix or remove "
                              "\"architecture\", or export the run again)")
    if changed is not cfg:
        check_compatible(cfg, changed, str(path), "--set " + " ".join(overrides))
    return changed, raw


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


def _value_problems(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], src: Path,
                    dtype: str | None) -> str:
    """The first tensor whose dtype or values cannot be the model's, as one line, or "".

    ``dtype``: config.json's "dtype" (what ``megafusion export --dtype`` wrote), when given.
    A copy would convert an integer tensor or a float16 one silently, and NaN or inf
    weights would load and produce NaN everywhere: both are refused here.
    """
    from megafusion.interop.export import DTYPES

    if dtype is not None and dtype not in DTYPES:
        return (f"'{src / 'config.json'}': \"dtype\": {dtype!r} is not one megafusion exports "
                f"({sorted(DTYPES)}); set it to the dtype of the safetensors tensors")
    want = DTYPES.get(dtype)
    for k in sorted(expected):
        tensor, target = given[k], expected[k]
        if target.is_floating_point() and not tensor.is_floating_point():
            return (f"'{src}': tensor '{k}' is {tensor.dtype} but the model's is floating point; export the "
                    "model again (megafusion export writes fp32 or bf16)")
        if want is not None and tensor.is_floating_point() and tensor.dtype != want:
            return (f"'{src}': tensor '{k}' is {tensor.dtype} but config.json says \"dtype\": {dtype!r}; "
                    f"save the tensors as {want} or correct \"dtype\"")
    for k in sorted(expected):
        tensor = given[k]
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                return (f"'{src}': tensor '{k}' holds {bad} NaN/inf value(s) of {tensor.numel()}; the exported model "
                        "is broken: export a checkpoint from before the loss diverged")
    return ""


def load_strict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], src: Path,
                dtype: str | None = None) -> None:
    """Copies ``tensors`` into ``model``: every parameter/buffer exactly once, with its shape,
    a floating dtype (``dtype``, config.json's "dtype", when given) and finite values."""
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
    problem = _value_problems(expected, given, src, dtype)
    if problem:
        raise ImportError_(problem)
    with torch.no_grad():
        for k, target in expected.items():
            target.copy_(given[k].to(target.dtype))


def run_config(src: Path, run_dir: Path, config: str | Path | None, overrides: list[str] | tuple[str, ...]):
    """The config of the run being written, checked against the export's architecture.

    ``config`` (a YAML file, e.g. a fine-tuning recipe with its own data, optimizer and
    layout), else ``run_dir/config.yaml`` if the run dir was prepared with one, else the
    exported config itself; ``overrides`` apply to whichever it is.
    """
    from megafusion.config import load_config
    from megafusion.interop.architecture import check_compatible

    if config is None and (run_dir / "config.yaml").is_file():
        config = run_dir / "config.yaml"
    if config is None:
        return read_config(src, overrides)[0]  # which checks the overrides against the export
    exported, _ = read_config(src)
    cfg = load_config(config, overrides)
    where = f"'{config}'" + (" with --set " + " ".join(overrides) if overrides else "")
    check_compatible(exported, cfg, f"'{src / 'config.json'}'", where)
    return cfg


def import_export(src: str | Path, run_dir: str | Path, config: str | Path | None = None,
                  overrides: list[str] | tuple[str, ...] = (), keep_step: bool = False) -> Path:
    """Writes ``run_dir`` (config.yaml + checkpoints/step_N) from the export ``src``.

    ``config`` / ``overrides``: the run's own config (``run_config``); its weight-defining
    fields must equal the export's. ``keep_step``: write the checkpoint at the exported step
    (``config.json`` "step"), so that training continues the LR schedule and the data
    position from there; by default it is step 0 (a fresh schedule, e.g. fine-tuning).
    """
    import torch.distributed as dist

    from megafusion.config import save_config
    from megafusion.inference.loading import single_process_config
    from megafusion.model.transformer_config import build_transformer_config
    from megafusion.recipes import get_provider
    from megafusion.parallel.setup import init_parallel, shutdown
    from megafusion.training.checkpoint import Checkpointer, unwrap
    from megafusion.training.loop import build_model_chunks
    from megafusion.training.optim import build_optimizer, build_scheduler

    src, run_dir = Path(src), Path(run_dir)
    if (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        raise FileExistsError(f"'{run_dir}' already has checkpoints; import into a new --run-dir")
    cfg = run_config(src, run_dir, config, overrides)
    raw = json.loads((src / "config.json").read_text())  # read_config has checked it
    step = int(raw.get("step") or 0) if keep_step else 0
    tensors = read_tensors(src)
    if cfg.data.tokenizer and Path(cfg.data.tokenizer).resolve().parent == src.resolve():
        run_dir.mkdir(parents=True, exist_ok=True)  # the export's copy: the run keeps its own
        target = run_dir / Path(cfg.data.tokenizer).name
        shutil.copy2(cfg.data.tokenizer, target)
        cfg = replace(cfg, data=replace(cfg.data, tokenizer=str(target.resolve())))
    if cfg.vision.path and Path(cfg.vision.path).resolve() == (src / "representation").resolve():
        target = run_dir / "representation"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(cfg.vision.path, target)
        cfg = replace(cfg, vision=replace(cfg.vision, path=str(target.resolve())))
    world_of_one = single_process_config(cfg, "cpu")
    env = init_parallel(world_of_one)
    try:
        transformer_config = build_transformer_config(world_of_one, env.device)
        provider = get_provider(world_of_one, transformer_config)
        chunks = build_model_chunks(world_of_one, transformer_config, provider, env)
        load_strict(unwrap(chunks[0]), tensors, src, raw.get("dtype"))
        optimizer = build_optimizer(world_of_one, chunks)
        scheduler = build_scheduler(world_of_one, optimizer)
        if step:
            scheduler.step(increment=step)  # the LR the original run had after `step` steps
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")  # the run's own layout
        Checkpointer(run_dir, cfg.checkpoint.keep, False, env.device).save(
            step, chunks, optimizer, scheduler, data_state={"step": step}, with_optimizer=False)
        dist.barrier()
    finally:
        shutdown()
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megafusion import", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="src", required=True, help="directory written by `megafusion export`")
    parser.add_argument("--run-dir", required=True, help="run directory to write (new, or holding only a config.yaml)")
    parser.add_argument("--config", default=None, help="the run's own YAML config (default: RUN_DIR/config.yaml if "
                                                       "present, else the exported config); its model must match")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (e.g. parallel.ep=2, train.steps=100); repeatable")
    parser.add_argument("--keep-step", action="store_true",
                        help="checkpoint at the exported step (continue its LR schedule and data) instead of step 0")
    args = parser.parse_args(argv)
    try:
        run_dir = import_export(args.src, args.run_dir, args.config, args.overrides, args.keep_step)
    except (OSError, ValueError) as err:  # bad paths, configs, tensors: one line naming the file, exit 2
        print(f"megafusion import: {err}", file=sys.stderr)
        return 2
    step = int(read_config(Path(args.src))[1].get("step") or 0) if args.keep_step else 0
    print(f"[megafusion] imported {args.src} into {run_dir} (checkpoints/step_{step:08d})")
    return 0
