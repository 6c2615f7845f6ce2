"""``megafusion import``: an exported directory -> a megafusion run dir that training resumes from.

    megafusion import --from exported/tiny --run-dir runs/tiny_imported [--keep-step]
    megafusion import --from exported/tiny --run-dir runs/finetune --config finetune.yaml --set parallel.ep=2

Reads ``config.json`` (any layout megafusion wrote, or a Hugging Face Llama's: an export
with ``--format hf-llama``, or a Llama from elsewhere that megafusion's text model can run)
and the safetensors file(s) (safetensors only, never pickle), loads
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

import shutil
import sys
from dataclasses import replace
from pathlib import Path

from megafusion.interop.safetensors_io import (  # noqa: F401 (public here too)
    CONFIG_JSON_FIELDS, ImportError_, is_export, load_strict, read_config, read_tensors)


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
    from megafusion.parallel import cpu_compat
    from megafusion.parallel.setup import init_parallel, shutdown
    from megafusion.recipes import get_provider
    from megafusion.training.checkpoint import Checkpointer, unwrap
    from megafusion.training.loop import build_model_chunks
    from megafusion.training.optim import build_optimizer, build_scheduler

    src, run_dir = Path(src), Path(run_dir)
    if (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        raise FileExistsError(f"'{run_dir}' already has checkpoints; import into a new --run-dir")
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"--run-dir '{run_dir}' is a file; expected a new directory (or one holding only "
                                 "a config.yaml)")
    if is_export(run_dir):
        raise FileExistsError(f"--run-dir '{run_dir}' is an export (config.json); expected a new run directory")
    cfg = run_config(src, run_dir, config, overrides)
    raw = read_config(src)[1]  # megafusion's section of config.json (checked)
    step = int(raw.get("step") or 0) if keep_step else 0
    tensors = read_tensors(src, cfg)
    if cfg.data.tokenizer and Path(cfg.data.tokenizer).resolve().parent == src.resolve():
        run_dir.mkdir(parents=True, exist_ok=True)  # the export's copy: the run keeps its own
        target = run_dir / Path(cfg.data.tokenizer).name
        from megafusion.data.tokenizer import copy_tokenizer  # a .model file or a Hugging Face directory
        copy_tokenizer(cfg.data.tokenizer, run_dir)
        cfg = replace(cfg, data=replace(cfg.data, tokenizer=str(target.resolve())))
    if cfg.vision.path and Path(cfg.vision.path).resolve() == (src / "representation").resolve():
        target = run_dir / "representation"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(cfg.vision.path, target)
        cfg = replace(cfg, vision=replace(cfg.vision, path=str(target.resolve())))
    world_of_one = single_process_config(cfg, "cpu")
    with cpu_compat.applied("cpu"):  # for the call (or the caller's layer, when active)
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
    from megafusion.interop.export import ArgumentParser

    parser = ArgumentParser(prog="megafusion import", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="src", required=True,
                        help="directory written by `megafusion export` (either --format), or a Hugging Face Llama "
                             "directory (config.json with model_type llama and model.safetensors)")
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
