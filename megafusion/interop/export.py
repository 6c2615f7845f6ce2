"""``megafusion export``: a run's checkpoint (any TP/PP/EP/DP layout) -> one safetensors model.

    megafusion export --run-dir runs/tiny --out exported/tiny [--step N] [--dtype bf16|fp32] [--format hf-llama]

``--format megafusion`` (the default) writes ``OUT/model.safetensors`` (or
``model-0000X-of-0000Y.safetensors`` shards with ``model.safetensors.index.json`` above
``--max-shard-size``, in Hugging Face's units: 5GB = 5*10**9 bytes), ``OUT/config.json``
(``model_type`` and ``architectures`` at the top; under ``"megafusion"`` the run's full config
``"config"``, the ``"architecture"`` of ``megafusion.interop.architecture``, the checkpoint
``"step"`` and ``"dtype"``), a copy of the tokenizer when ``data.tokenizer`` is set and the
visual representation (weights, latent statistics) under ``OUT/representation/`` when
``vision.path`` is set. Tensor names: ``megafusion.interop.names``.

``--format hf-llama`` (a Llama-shaped text model only, ``megafusion.interop.hf_llama``) writes
the same files with Hugging Face Llama's names and config, which
``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` loads.

Optimizer state (Adam moments) is not exported: an export is a model, and training that
continues from its import starts a fresh optimizer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from megafusion.interop import architecture, hf_llama, names
from megafusion.interop.safetensors_io import (  # noqa: F401 (public here too)
    DTYPES, FORMAT, config_json, is_export, parse_size, write_tensors)

FORMATS = ("megafusion", "hf-llama")
DEFAULT_SHARD_SIZE = "5GB"


class ArgumentParser(argparse.ArgumentParser):
    """argparse that answers a bad flag with one line (``megafusion <cmd>: ...``) and exit 2."""

    def error(self, message: str):  # noqa: D102
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def check_paths(run_dir: Path, out: Path) -> None:
    """Raises FileNotFoundError / NotADirectoryError naming a --run-dir or --out that cannot work."""
    if not run_dir.exists():
        raise FileNotFoundError(f"--run-dir '{run_dir}' does not exist (expected a directory written by "
                                "`megafusion train`: config.yaml and checkpoints/)")
    if not (run_dir / "config.yaml").is_file():
        what = "an export (config.json)" if is_export(run_dir) else "not a run dir (no config.yaml)"
        raise FileNotFoundError(f"--run-dir '{run_dir / 'config.yaml'}' does not exist: '{run_dir}' is {what}; "
                                "expected a directory written by `megafusion train` (config.yaml and checkpoints/)")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out '{out}' is a file; expected a directory to write the export into")
    if out.resolve() == run_dir.resolve() or (out / "config.yaml").is_file() or (out / "checkpoints").exists():
        raise FileExistsError(f"--out '{out}' is a run dir; expected a new directory (or an earlier export) "
                              "to write the export into")


def export_run(run_dir: str | Path, out: str | Path, step: int | None = None, dtype: str = "fp32",
               max_shard_size: int | str = DEFAULT_SHARD_SIZE, fmt: str = "megafusion", *,
               max_shard_bytes: int | None = None, progress: bool | None = None) -> Path:
    """Exports ``run_dir``'s checkpoint to ``out``; returns ``out``. The model is loaded on CPU,
    with the CPU compatibility layer applied for the call (or the caller's, when active).
    ``max_shard_size``: bytes or a Hugging Face size string ("5GB"; ``max_shard_bytes``: the
    same, its older name); ``fmt``: ``megafusion`` or ``hf-llama``."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {list(FORMATS)}")
    if step is not None and step < 0:
        raise ValueError(f"--step {step}: expected a checkpoint step (0 or more)")
    max_shard_size = parse_size(max_shard_bytes if max_shard_bytes is not None else max_shard_size)
    run_dir, out = Path(run_dir), Path(out)
    check_paths(run_dir, out)
    from megafusion.config import load_config
    from megafusion.inference.loading import load_run
    from megafusion.parallel import cpu_compat
    from megafusion.training.checkpoint import unwrap

    cfg = load_config(run_dir / "config.yaml")  # the run's own layout (load_run's is a world of one)
    if fmt == "hf-llama":
        hf_llama.check(cfg)  # before the (long) load
    # any model.kind, any saved layout
    with cpu_compat.applied("cpu"), load_run(run_dir, step, "cpu", kinds=None) as loaded:
        model, ckpt_step = unwrap(loaded.model), loaded.step
        out.mkdir(parents=True, exist_ok=True)
        config = cfg.to_dict()
        tensors = {k: v.to(DTYPES[dtype]) for k, v in names.export_state(model.state_dict()).items()}
        stream = getattr(loaded.provider, "stream", None)
        tokenizer = representation = representation_path = None
        if stream is not None:
            tokenizer, representation = stream.tokenizer, stream.representation
            if cfg.vision.path is not None:  # weights and/or latent statistics: ship them
                shutil.rmtree(out / "representation", ignore_errors=True)
                representation.save(out / "representation")
                representation_path = config["vision"]["path"] = "representation"
        arch = architecture.describe(cfg, tokenizer, representation, representation_path)
    if fmt == "hf-llama":
        tensors = hf_llama.to_hf(tensors, cfg)
    write_tensors(tensors, out, max_shard_size, progress=progress)
    tokenizer = getattr(cfg.data, "tokenizer", None)
    if tokenizer:
        src = Path(tokenizer)
        if not src.exists():
            raise FileNotFoundError(f"data.tokenizer = '{tokenizer}' does not exist; cannot copy it into the export")
        architecture.copy_tokenizer(src, out)  # a .model file or a Hugging Face directory
        config["data"]["tokenizer"] = src.name  # relative to the export directory
        if fmt == "hf-llama" and src.is_dir():  # AutoTokenizer.from_pretrained(OUT) reads them at the top
            for item in src.iterdir():
                if item.is_file() and item.name != "config.json" and not item.name.endswith(".safetensors"):
                    shutil.copy2(item, out / item.name)
    section = {"format": FORMAT, "step": ckpt_step, "dtype": dtype, "architecture": arch, "config": config}
    content = hf_llama.hf_config(cfg, dtype, section) if fmt == "hf-llama" else config_json(section)
    (out / "config.json").write_text(json.dumps(content, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="megafusion export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="directory written by `megafusion train`")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, default="megafusion",
                        help="megafusion: megafusion's names, any model; hf-llama: a Hugging Face LlamaForCausalLM "
                             "directory (Llama-shaped text models)")
    parser.add_argument("--max-shard-size", default=DEFAULT_SHARD_SIZE,
                        help="shard above this size, in Hugging Face's units (5GB = 5*10^9 bytes; 2GiB, 500MB, 123)")
    args = parser.parse_args(argv)
    try:
        out = export_run(args.run_dir, args.out, args.step, args.dtype, parse_size(args.max_shard_size), args.fmt)
    except (OSError, ValueError) as err:  # bad paths, configs, corrupt or unsafe checkpoints (CheckpointError)
        print(f"megafusion export: {err}", file=sys.stderr)
        return 2
    print(f"[megafusion] exported {args.run_dir} to {out}" + (" (Hugging Face Llama)" if args.fmt == "hf-llama" else ""))
    return 0
