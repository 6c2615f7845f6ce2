"""``megafusion export``: a run's checkpoint (any TP/PP/EP/DP layout) -> one safetensors model.

    megafusion export --run-dir runs/tiny --out exported/tiny [--step N] [--dtype bf16|fp32]

Writes ``OUT/model.safetensors`` (or ``model-0000X-of-0000Y.safetensors`` shards with
``model.safetensors.index.json`` above ``--max-shard-size``), ``OUT/config.json`` (the run's
full config under ``"config"``, the ``"architecture"`` of ``megafusion.interop.architecture``,
the checkpoint ``"step"`` and ``"dtype"``), a copy of the tokenizer model when
``data.tokenizer`` is set and the visual representation (weights, latent statistics) under
``OUT/representation/`` when ``vision.path`` is set. Tensor names: ``megafusion.interop.names``.

Optimizer state (Adam moments) is not exported: an export is a model, and training that
continues from its import starts a fresh optimizer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


from megafusion.interop import architecture, names
from megafusion.interop.safetensors_io import DTYPES, FORMAT, write_tensors  # noqa: F401 (public here too)

def parse_size(text: str) -> int:
    """'2GB' / '500MB' / '10KB' / '123' -> bytes."""
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "B": 1}
    t = text.strip().upper()
    try:
        for unit, factor in units.items():
            if t.endswith(unit):
                return int(float(t[: -len(unit)]) * factor)
        return int(t)
    except ValueError:
        raise ValueError(f"--max-shard-size {text!r} is not a size; write e.g. 2GB, 500MB or 123") from None


def export_run(run_dir: str | Path, out: str | Path, step: int | None = None, dtype: str = "fp32",
               max_shard_bytes: int = 2 << 30) -> Path:
    """Exports ``run_dir``'s checkpoint to ``out``; returns ``out``. The model is loaded on CPU,
    with the CPU compatibility layer applied for the call (or the caller's, when active)."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    run_dir, out = Path(run_dir), Path(out)
    from megafusion.config import load_config
    from megafusion.inference.loading import load_run
    from megafusion.parallel import cpu_compat
    from megafusion.training.checkpoint import unwrap

    # any model.kind, any saved layout
    with cpu_compat.applied("cpu"), load_run(run_dir, step, "cpu", kinds=None) as loaded:
        model, ckpt_step = unwrap(loaded.model), loaded.step
        cfg = load_config(run_dir / "config.yaml")  # the run's own layout (load_run's is a world of one)
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
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()
    write_tensors(tensors, out, max_shard_bytes, {"format": FORMAT})
    tokenizer = getattr(cfg.data, "tokenizer", None)
    if tokenizer:
        src = Path(tokenizer)
        if not src.exists():
            raise FileNotFoundError(f"data.tokenizer = '{tokenizer}' does not exist; cannot copy it into the export")
        architecture.copy_tokenizer(src, out)  # a .model file or a Hugging Face directory
        config["data"]["tokenizer"] = src.name  # relative to the export directory
    (out / "config.json").write_text(json.dumps(
        {"format": FORMAT, "step": ckpt_step, "dtype": dtype, "architecture": arch, "config": config}, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megafusion export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="directory written by `megafusion train`")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--max-shard-size", default="2GB", help="shard above this size (e.g. 2GB, 500MB)")
    args = parser.parse_args(argv)
    try:
        out = export_run(args.run_dir, args.out, args.step, args.dtype, parse_size(args.max_shard_size))
    except (OSError, ValueError) as err:  # bad paths, configs, corrupt or unsafe checkpoints (CheckpointError)
        print(f"megafusion export: {err}", file=sys.stderr)
        return 2
    print(f"[megafusion] exported {args.run_dir} to {out}")
    return 0
