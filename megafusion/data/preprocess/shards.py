"""Writing shards and merging them into the output datasets.

A worker makes one shard at a time under ``<prefix>.shards/``: ``NNNNNN<suffix>.{bin,idx}``
(plus the visual store for multimodal kinds), written to temporary names and renamed when
complete, with ``NNNNNN.done.json`` (its stats and content key) written last. A shard whose
key matches is not made again: a finished one in the shard folder is kept, one of the last
complete output is copied from it as stored. When every shard is done they are merged with
the indexed-dataset builder's ``add_index`` (``merge_shards``) and the metadata written:
``P.meta.json`` and ``P.tokenizer_map.json`` (the tokenizer's type, base and total vocabulary,
special name -> id and content hash; training refuses data whose map differs from its tokenizer's).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from megafusion.data.indexed import DatasetWriter, VisualItem, layout_path, merge_datasets, meta_path, visual_prefix
from megafusion.data.preprocess.config import ItemError, PreprocessConfig, PreprocessError
from megafusion.data.preprocess.documents import ItemProcessor
from megafusion.data.preprocess.readers import ShardSpec, iter_items

_PROCESSOR: dict[str, ItemProcessor] = {}  # one per worker process


def clear_processors() -> None:
    """Drops the cached item processor: its tokenizer or encoder files may have changed since."""
    _PROCESSOR.clear()


def _processor(cfg: PreprocessConfig) -> ItemProcessor:
    key = json.dumps(asdict(cfg), sort_keys=True, default=str)
    if key not in _PROCESSOR:
        _PROCESSOR.clear()
        _PROCESSOR[key] = ItemProcessor(cfg)
    return _PROCESSOR[key]


def _done_path(cfg: PreprocessConfig, index: int) -> Path:
    return cfg.shard_dir / f"{index:06d}.done.json"


def write_json(path: Path, obj) -> None:
    """Writes ``obj`` to ``path`` atomically (a temporary file, then renamed)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def clean_stale(cfg: PreprocessConfig) -> None:
    """Removes temporary files and shards without a done marker (from a killed run)."""
    out = Path(cfg.output_prefix)
    for p in out.parent.glob(out.name + "*.tmp*"):  # a merge killed half way
        if p.is_file():
            p.unlink()
    done = {p.name.split(".")[0] for p in cfg.shard_dir.glob("*.done.json")}
    for p in cfg.shard_dir.iterdir():
        if ".tmp" in p.name or p.name.split(".")[0].split("_")[0] not in done:
            p.unlink()


@contextlib.contextmanager
def _shard_writers(cfg: PreprocessConfig, index: int, vocab_size: int):
    """One writer per output suffix for shard ``index``: finalized when the block ends, aborted
    (no files left under final names) when it raises."""
    writers = {s: DatasetWriter(cfg.shard_dir / f"{index:06d}{s}", vocab_size, cfg.storage) for s in cfg.suffixes}
    try:
        yield writers
        for w in writers.values():
            w.finalize()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise


def process_shard(cfg: PreprocessConfig, spec: ShardSpec, key: str, previous: tuple[int, dict] | None = None,
                  on_item=None) -> dict:
    """Writes shard ``spec.index`` (unless a finished one with the same ``key`` is there);
    returns its stats, with ``skipped`` when nothing was tokenized or encoded.

    ``previous``: (first document, stats) of the shard with this key in the last complete
    output; its documents are copied from there. ``on_item()`` (in-process runs) is called
    after each item, for the progress bar."""
    done = _done_path(cfg, spec.index)
    if done.is_file():
        stats = json.loads(done.read_text())
        if stats.get("key") == key:
            return {**stats, "skipped": True}
        done.unlink()  # made from other content or settings: made again below
    if previous is not None:
        from megafusion.data.tokenizer import load_tokenizer

        first, old = previous
        with _shard_writers(cfg, spec.index, load_tokenizer(cfg.tokenizer_model, cfg.tokenizer_type).vocab_size) \
                as writers:
            _copy_documents(cfg, first, old["documents"], writers)
        stats = {**old, "index": spec.index}
    else:
        stats = _build_shard(cfg, spec, on_item)
    stats["key"] = key
    write_json(done, stats)
    return {**stats, "skipped": previous is not None}


def _build_shard(cfg: PreprocessConfig, spec: ShardSpec, on_item) -> dict:
    """Tokenizes/encodes the shard's items into its files; returns its stats."""
    proc = _processor(cfg)
    base = Path(spec.path).parent
    errors, items, documents, visuals = [], 0, 0, 0
    with _shard_writers(cfg, spec.index, proc.tok.vocab_size) as writers:
        for line_no, item in iter_items(spec):
            items += 1
            if on_item is not None:
                on_item()
            try:
                if isinstance(item, ItemError):
                    raise item
                docs = proc.process(item, base, f"{Path(spec.path).name}:{line_no}")
            except ItemError as err:
                record = {"path": err.path or spec.path, "line": line_no, "input": spec.path, "reason": err.reason}
                if cfg.strict:
                    raise PreprocessError(f"{spec.path}:{line_no}: {err.reason}"
                                          + (f" ({err.path})" if err.path else "")
                                          + "; rerun without --strict to skip bad items") from err
                errors.append(record)
                continue
            for suffix, (tokens, vis) in docs.items():
                writers[suffix].add_document(tokens, vis)
            documents += 1
            visuals += sum(len(v) for _, v in docs.values())
    enc = proc.encoder
    return {"index": spec.index, "input": spec.path, "first_line": spec.first_line, "items": items,
            "documents": documents, "visuals": visuals, "errors": errors,
            "latent_dim": enc.dim if enc is not None else None}


def _copy_documents(cfg: PreprocessConfig, first: int, count: int, writers: dict) -> None:
    """Copies documents [first, first + count) of the existing output into ``writers`` exactly
    as stored (token ids, visual values and layout), so a reused shard is what a fresh run makes."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for suffix, writer in writers.items():
        prefix = f"{cfg.output_prefix}{suffix}"
        tokens = IndexedDataset(prefix)
        if cfg.multimodal:
            visual = IndexedDataset(visual_prefix(prefix))
            layout = np.load(layout_path(prefix), mmap_mode="r")
            row = int(np.searchsorted(layout["doc"], first))  # the layout is sorted by document
        for doc in range(first, first + count):
            items = []
            while cfg.multimodal and row < len(layout) and layout[row]["doc"] == doc:
                rec = layout[row]
                array = np.asarray(visual[row]).reshape(int(rec["tokens"]), int(rec["dim"]))
                if writer.storage == "float16":  # stored as the bits of float16 in uint16
                    array = array.view(np.float16)
                items.append(VisualItem(array, int(rec["boi"]), int(rec["modality"]), bool(rec["clean"]),
                                        int(rec["frame"]), (int(rec["grid_h"]), int(rec["grid_w"]))))
                row += 1
            writer.add_document(np.array(tokens[doc]), items)


def merge_shards(cfg: PreprocessConfig, stats: list[dict]) -> list[str]:
    """Merges the finished shards (``stats`` in shard order) into the output dataset(s) and
    writes each one's metadata; returns the output prefixes."""
    from megafusion.data.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.tokenizer_model, cfg.tokenizer_type)
    mapping = tok.mapping()
    storage = cfg.storage
    latent_dim = next((s["latent_dim"] for s in stats if s["latent_dim"]), None)
    outputs = []
    for suffix in cfg.suffixes:
        prefix = f"{cfg.output_prefix}{suffix}"
        parts = [str(cfg.shard_dir / f"{s['index']:06d}{suffix}") for s in stats]
        merge_datasets(parts, prefix, tok.vocab_size, storage)
        meta = {"kind": cfg.kind, "encoder": cfg.encoder if cfg.multimodal else None, "storage": storage,
                "image_size": cfg.image_size, "patch_size": cfg.patch_size if cfg.encoder == "pixel" else None,
                "latent_dim": latent_dim, "tokenizer_model": str(Path(cfg.tokenizer_model).resolve()),
                "vocab_size": tok.vocab_size, "pad_id": tok.pad_id, "boi_id": tok.boi_id, "eoi_id": tok.eoi_id,
                "frame_id": tok.frame_id, "eod_id": tok.eod_id, "append_eod": cfg.append_eod,
                "tokenizer_type": cfg.tokenizer_type, "tokenizer": mapping}
        write_json(Path(f"{prefix}.tokenizer_map.json"), mapping)  # special name -> id, sizes, type, hash
        write_json(Path(meta_path(prefix)), meta)
        outputs.append(prefix)
    return outputs
