"""What ``data.kind: energon`` paths hold, read from their metadata alone (no energon import).

``data.paths`` of an energon run name Energon-prepared WebDataset datasets (a folder with
``.nv-meta/dataset.yaml``, written by ``energon prepare``) and, to blend them by
``data.weights``, indexed datasets (``tools/preprocess_data.py`` prefixes). Validation reads
this module; ``megafusion.data.energon_stream`` (which imports energon) reads the data.
"""

from __future__ import annotations

from pathlib import Path

# The Energon sample types the stream reads, and what each holds. Video, VQA and the other
# sample types are refused by name (Energon 7.4.1 has no plain video sample type: its one
# video type, VidQASample, is question answering about a video).
SUPPORTED_SAMPLE_TYPES = {
    "CaptioningSample": "an image and its caption",
    "InterleavedSample": "text pieces and images in order, mapped by a sample_loader",
}
# The older dataset.yaml form names a dataset class instead of a sample type.
_DATASET_CLASSES = {"CaptioningWebdataset": "CaptioningSample", "InterleavedWebdataset": "InterleavedSample"}


def is_energon_dataset(path: str) -> bool:
    """Whether ``path`` is an Energon-prepared dataset (has ``.nv-meta/dataset.yaml``)."""
    return (Path(path) / ".nv-meta" / "dataset.yaml").is_file()


def _meta(path: str) -> dict:
    import yaml

    return yaml.safe_load((Path(path) / ".nv-meta" / "dataset.yaml").read_text()) or {}


def sample_type(path: str) -> str | None:
    """The sample type class named by ``path``'s ``.nv-meta/dataset.yaml`` (None if unnamed;
    the older dataset-class form, such as ``CaptioningWebdataset``, as its sample type)."""
    meta = _meta(path)
    st = meta.get("sample_type") or {}
    if isinstance(st, dict) and st.get("__class__"):
        return str(st["__class__"])
    cls = meta.get("__class__")
    return _DATASET_CLASSES.get(cls, cls)


def _supported() -> str:
    return ", ".join(f"{name} ({what})" for name, what in SUPPORTED_SAMPLE_TYPES.items())


def energon_path_problems(paths: list[str]) -> list[str]:
    """One line per path an energon run cannot read: neither an Energon dataset nor an indexed
    prefix, or an Energon dataset of a sample type the stream does not read."""
    problems = []
    found = 0
    for path in paths:
        if is_energon_dataset(path):
            found += 1
            try:
                kind, meta = sample_type(path), _meta(path)
            except Exception as err:  # unreadable YAML
                problems.append(f"data.paths: {path}/.nv-meta/dataset.yaml cannot be read ({err})")
                continue
            if kind not in SUPPORTED_SAMPLE_TYPES:
                problems.append(
                    f"data.paths: {path} holds Energon samples of type {kind}; data.kind = energon reads "
                    f"{_supported()} only: video, VQA and other sample types are not supported yet "
                    "(convert them with tools/preprocess_data.py and use data.kind = indexed)")
            elif kind == "InterleavedSample" and "sample_loader" not in meta:
                problems.append(
                    f"data.paths: {path} is an InterleavedSample dataset without a sample_loader in "
                    ".nv-meta/dataset.yaml: its sequence (text pieces and images in order) is built from "
                    "several parts of a sample, which a field_map cannot do; add sample_loader and "
                    "part_filter (see docs/data.md, WebDataset / Energon)")
        elif Path(path + ".bin").is_file() and Path(path + ".idx").is_file():
            continue  # an indexed prefix, blended in; IndexedDocuments checks it fully
        else:
            problems.append(f"data.paths: {path} is neither an Energon-prepared dataset (no "
                            f"{path}/.nv-meta/dataset.yaml: run `energon prepare {path}`) nor an indexed "
                            "dataset prefix (tools/preprocess_data.py)")
    if paths and not found and not problems:
        problems.append(f"data.kind = energon: none of data.paths {list(paths)} is an Energon dataset; use "
                        "data.kind = indexed for indexed datasets alone")
    return problems
