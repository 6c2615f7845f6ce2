"""Reading and writing a ``megafusion export`` directory: the one module that knows its files.

``OUT/config.json``: ``{"model_type": "megafusion-text" | "megafusion-transfusion",
"architectures": [...], "megafusion": {"format", "step", "dtype", "architecture", "config"}}``
(the first layout, megafusion's five fields at the top level, is still read), or for
``--format hf-llama`` Hugging Face's LlamaConfig fields with the same "megafusion" section
(``megafusion.interop.hf_llama``; a Llama config without it is read too). ``OUT/model.safetensors``
(or ``model-0000X-of-0000Y.safetensors`` shards with ``model.safetensors.index.json``; header
metadata ``{"format": "pt"}``), tensors named by ``megafusion.interop.names`` (or Hugging Face's).
``megafusion.interop.export`` writes it, ``megafusion.interop.import_`` turns it into a run dir,
and ``megafusion.inference.loading`` loads a model from it; this module imports none of them.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from megafusion.interop import names

FORMAT = "megafusion-safetensors-v1"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROGRESS_BYTES = 1 << 30  # exports at least this big show a progress bar even when stderr is not a terminal
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '40KB' / '2GiB' / '123' -> bytes, in Hugging Face's units (those of
    ``huggingface_hub``'s ``max_shard_size``): 1GB = 10**9 bytes, 1GiB = 2**30."""
    import re

    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?", str(text).strip().upper())
    if match is None:
        raise ValueError(f"--max-shard-size {text!r} is not a size; write e.g. 5GB, 500MB, 2GiB or 123 (bytes)")
    size = int(float(match.group(1)) * _UNITS[match.group(2) or "B"])
    if size <= 0:
        raise ValueError(f"--max-shard-size {text!r} must be more than 0 bytes")
    return size


def write_tensors(tensors: dict[str, torch.Tensor], out: Path, max_shard_size: int | str, metadata: dict | None = None,
                  progress: bool | None = None) -> list[Path]:
    """Writes ``model.safetensors``, or ``model-0000X-of-0000Y.safetensors`` shards plus the Hugging
    Face index ``model.safetensors.index.json`` above ``max_shard_size`` (bytes, or a string such
    as "5GB"; ``huggingface_hub.split_torch_state_dict_into_shards`` groups them). Each file's
    header metadata is ``{"format": "pt"}`` (what ``transformers`` requires) plus ``metadata``.
    ``progress``: a bar on stderr (default: when stderr is a terminal or the export is big).
    An earlier export's model files in ``out`` are removed first."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    tensors = {k: v.detach().contiguous().cpu() for k, v in sorted(tensors.items())}
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    header = {**(metadata or {}), "format": "pt"}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if progress is None:
        progress = sys.stderr.isatty() or total >= PROGRESS_BYTES
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()  # an earlier export's files (another sharding) must not mix with these
    paths = []
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {out}", disable=not progress,
              file=sys.stderr) as bar:
        for filename, keys in split.filename_to_tensors.items():
            shard = {k: tensors[k] for k in keys}
            save_file(shard, str(out / filename), metadata=header)
            paths.append(out / filename)
            bar.update(sum(t.numel() * t.element_size() for t in shard.values()))
    if split.is_sharded:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename}, indent=2))
    return paths


class ImportError_(ValueError):
    """An exported directory that cannot be imported (the message says which file/tensor)."""


# Entries of megafusion's section of config.json (``architecture`` may be left out of hand-written ones).
CONFIG_JSON_FIELDS = ("format", "step", "dtype", "architecture", "config")
# Top-level entries of config.json: Hugging Face's two (``model_type``: the architecture's,
# e.g. "megafusion-text"; ``architectures``: ARCHITECTURES) and megafusion's section.
TOP_LEVEL_FIELDS = ("model_type", "architectures", "megafusion")
ARCHITECTURES = {"megafusion-text": "MegafusionTextModel", "megafusion-transfusion": "MegafusionTransfusionModel"}
MEGAFUSION_SECTION = "megafusion"


def config_json(section: dict) -> dict:
    """config.json of a ``--format megafusion`` export: ``model_type`` and ``architectures`` at
    the top (what Hugging Face tools read first), megafusion's ``section`` under "megafusion"."""
    model_type = section["architecture"]["model_type"]
    return {"model_type": model_type, "architectures": [ARCHITECTURES[model_type]], MEGAFUSION_SECTION: section}


def is_export(path: str | Path) -> bool:
    """Whether ``path`` looks like a directory written by ``megafusion export`` (config.json, no config.yaml)."""
    path = Path(path)
    return (path / "config.json").is_file() and not (path / "config.yaml").is_file()


def _raw_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        if (src / "config.yaml").is_file():
            raise FileNotFoundError(f"'{src}' is a run dir (config.yaml), not an export: --from must be a directory "
                                    "written by `megafusion export` (config.json and model.safetensors)")
        raise FileNotFoundError(f"'{path}' does not exist: --from must be a directory written by `megafusion export`")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ImportError_(f"'{path}' is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ImportError_(f"'{path}' is not a JSON object (a megafusion export's config.json)")
    return raw


def megafusion_section(raw: dict, path: Path) -> dict | None:
    """megafusion's part of a config.json in any layout: the current one (``"megafusion"``
    under ``model_type`` / ``architectures``; also inside a ``--format hf-llama`` config),
    the first one (``format`` / ``step`` / ``dtype`` / ``architecture`` / ``config`` at the
    top), or None for a Hugging Face Llama config written elsewhere."""
    from megafusion.config import ConfigError
    from megafusion.interop import hf_llama

    if hf_llama.is_hf_llama(raw):
        section = raw.get(MEGAFUSION_SECTION)
    elif MEGAFUSION_SECTION in raw:
        unknown = sorted(set(raw) - set(TOP_LEVEL_FIELDS))
        if unknown:
            raise ConfigError(f"'{path}': unknown field(s) {unknown}; config.json holds {list(TOP_LEVEL_FIELDS)}")
        section = raw[MEGAFUSION_SECTION]
    elif "config" in raw:  # the first layout: megafusion's fields at the top
        section = raw
    else:
        kind = raw.get("model_type")
        raise ImportError_(f"'{path}' is not a megafusion export" + (f" (model_type = {kind!r}; megafusion reads its "
                           "own exports and Hugging Face Llama directories, model_type 'llama')" if kind else
                           " (no \"megafusion\" section, no model_type)"))
    if section is None:
        return None
    if not isinstance(section, dict) or not isinstance(section.get("config"), dict):
        raise ImportError_(f"'{path}' has no \"config\" mapping (the run's config as written by `megafusion export`)")
    unknown = sorted(set(section) - set(CONFIG_JSON_FIELDS))
    if unknown:
        raise ConfigError(f"'{path}': unknown field(s) {unknown}; config.json holds {list(CONFIG_JSON_FIELDS)}")
    if section.get("format", FORMAT) != FORMAT:
        raise ConfigError(f"'{path}': format = {section['format']!r}, this megafusion reads {FORMAT!r}")
    return section


def read_config(src: Path, overrides: list[str] | tuple[str, ...] = ()):
    """(Config, megafusion's section of config.json) from ``src/config.json`` (plus ``key=value``
    overrides); the section holds "step" and "dtype" (``{}`` for a Llama from elsewhere).

    Reads every layout (``megafusion_section``). Unknown or bad fields raise ConfigError naming
    the field; paths to the tokenizer and the representation are relative to ``src``; the
    ``architecture`` block must be what the config describes (``megafusion.interop.architecture``),
    and the Hugging Face fields of a ``--format hf-llama`` export what its config gives.
    """
    from megafusion.config import ConfigError, load_config
    from megafusion.interop import hf_llama
    from megafusion.interop.architecture import check_compatible, describe, differences

    src = Path(src)
    path = src / "config.json"
    raw = _raw_config(src)
    section = megafusion_section(raw, path)
    if section is None:  # a Llama from elsewhere
        tree, section = hf_llama.config_tree(raw, str(path)), {}
    else:
        tree = json.loads(json.dumps(section["config"]))  # a copy: section keeps the paths as written
    representation_path = (tree.get("vision") or {}).get("path")
    for key_section, key in (("data", "tokenizer"), ("vision", "path")):
        value = (tree.get(key_section) or {}).get(key)
        if value and not Path(value).is_absolute():
            tree[key_section][key] = str((src / value).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        yaml_path = Path(tmp) / "config.yaml"
        yaml_path.write_text(yaml.safe_dump(tree, sort_keys=False))
        try:
            cfg = load_config(yaml_path)
            changed = load_config(yaml_path, overrides) if overrides else cfg
        except Exception as err:
            raise type(err)(str(err).replace(str(yaml_path), str(path))) from None
    if "architecture" in section:
        problems = differences(section["architecture"], describe(cfg, representation_path=representation_path))
        if problems:
            raise ConfigError(f"'{path}': the architecture block disagrees with the config it ships:\n  "
                              + "\n  ".join(problems) + "\n(the \"config\" mapping is the truth: fix or remove "
                              "\"architecture\", or export the run again)")
    if MEGAFUSION_SECTION in raw and not hf_llama.is_hf_llama(raw):
        kind = f"megafusion-{cfg.model.kind}"
        if raw.get("model_type") != kind or raw.get("architectures") != [ARCHITECTURES[kind]]:
            raise ConfigError(f"'{path}': model_type = {raw.get('model_type')!r}, architectures = "
                              f"{raw.get('architectures')!r} but the config gives {kind!r}, {[ARCHITECTURES[kind]]!r}")
    if hf_llama.is_hf_llama(raw) and section:
        want = hf_llama.hf_config(cfg, section.get("dtype") or "fp32")
        problems = [f"'{k}' is {raw[k]!r} but the megafusion config gives {want[k]!r}" for k in sorted(want)
                    if k in raw and k not in ("torch_dtype", "use_cache", "initializer_range") and raw[k] != want[k]]
        if problems:
            raise ConfigError(f"'{path}': the Llama fields disagree with the megafusion config it ships:\n  "
                              + "\n  ".join(problems))
    if changed is not cfg:
        check_compatible(cfg, changed, str(path), "--set " + " ".join(overrides))
    return changed, section


def read_tensors(src: Path, cfg=None) -> dict[str, torch.Tensor]:
    """Every tensor of the export (one file or the shards named by the index), by exported name
    (a ``--format hf-llama`` export's Hugging Face names mapped back; ``cfg``: its config,
    read from ``src`` when not given)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from megafusion.interop import hf_llama

    src = Path(src)
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ImportError_(f"'{index}' is not a safetensors index (a \"weight_map\" of tensor -> file): "
                               f"{err!r}") from None
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
    config_path = src / "config.json"
    if config_path.is_file() and hf_llama.is_hf_llama(_raw_config(src)):
        tensors = hf_llama.from_hf(tensors, cfg if cfg is not None else read_config(src)[0])
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
