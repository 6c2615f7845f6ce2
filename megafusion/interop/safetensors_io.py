"""Reading and writing a ``megafusion export`` directory: the one module that knows its files.

``OUT/config.json`` (``"format"``, ``"step"``, ``"dtype"``, ``"architecture"``, ``"config"``) and
``OUT/model.safetensors`` (or ``model-0000X-of-0000Y.safetensors`` shards with
``model.safetensors.index.json``), tensors named by ``megafusion.interop.names``.
``megafusion.interop.export`` writes it, ``megafusion.interop.import_`` turns it into a run dir,
and ``megafusion.inference.loading`` loads a model from it; this module imports none of them.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import yaml

from megafusion.interop import names

FORMAT = "megafusion-safetensors-v1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def write_tensors(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int, metadata: dict) -> list[Path]:
    """Writes one file, or shards plus the Hugging Face index, under ``out``."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in sorted(tensors.items())}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        path = out / "model.safetensors"
        save_file(shards[0], str(path), metadata=metadata)
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards):
        path = out / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata=metadata)
        paths.append(path)
        weight_map.update({name: path.name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return paths


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


def value_problems(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], src: Path,
                    dtype: str | None) -> str:
    """The first tensor whose dtype or values cannot be the model's, as one line, or "".

    ``dtype``: config.json's "dtype" (what ``megafusion export --dtype`` wrote), when given.
    A copy would convert an integer tensor or a float16 one silently, and NaN or inf
    weights would load and produce NaN everywhere: both are refused here.
    """
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
    problem = value_problems(expected, given, src, dtype)
    if problem:
        raise ImportError_(problem)
    with torch.no_grad():
        for k, target in expected.items():
            target.copy_(given[k].to(target.dtype))
