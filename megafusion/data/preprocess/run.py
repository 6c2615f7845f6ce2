"""The driver: plan the shards, hash them, make the ones whose key changed, merge, summarise.

``run_preprocess(cfg)`` is the whole run: validate the settings and output prefix, cut the
inputs into shards (``readers``), key each by content (``digests``), reuse what a stopped run
or the last complete output already holds, make the rest in ``workers`` processes
(``shards.process_shard``), merge them (``shards.merge_shards``) and write
``<prefix>.errors.jsonl`` and ``<prefix>.summary.json``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from megafusion.data.indexed import dataset_files
from megafusion.data.preprocess.config import PreprocessConfig, PreprocessError, prepare_output
from megafusion.data.preprocess.digests import clear_digests, digest_settings, shard_key
from megafusion.data.preprocess.readers import ShardSpec, iter_shards
from megafusion.data.preprocess.shards import clean_stale, clear_processors, merge_shards, process_shard, write_json


@dataclass
class PreprocessSummary:
    complete: bool
    items: int = 0
    documents: int = 0
    visuals: int = 0
    skipped_items: int = 0
    shards: int = 0
    shards_reused: int = 0
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)  # first 100; all in <prefix>.errors.jsonl

    def format(self) -> str:
        rate = self.items / self.seconds if self.seconds else 0.0
        lines = [f"{'done' if self.complete else 'stopped early (re-run to continue)'}: {self.items} items "
                 f"-> {self.documents} documents, {self.visuals} images/frames; {self.skipped_items} skipped; "
                 f"{self.shards} shards ({self.shards_reused} reused); {self.seconds:.1f} s ({rate:.1f} items/s)"]
        for e in self.errors[:20]:
            lines.append(f"  skipped {e['input']}:{e['line']}: {e['reason']}"
                         + (f" [{e['path']}]" if e['path'] != e['input'] else ""))
        if self.skipped_items > 20:
            lines.append(f"  ... {self.skipped_items - 20} more skipped items listed in the errors file")
        if self.skipped_items:
            lines.append("  (skipped items are not in the dataset: fix their files and re-run to add them; "
                         "only the shards whose files changed are made again)")
        lines += [f"  wrote {o}" for o in self.outputs]
        return "\n".join(lines)


def _plan(cfg: PreprocessConfig) -> tuple[list[ShardSpec], bool]:
    """The shards of this run, and whether they are all of the input (not cut by ``max_shards``)."""
    specs = []
    for spec in iter_shards(cfg.inputs, cfg.shard_size):
        if cfg.max_shards is not None and spec.index >= cfg.max_shards:
            return specs, False
        specs.append(spec)
    return specs, True


def _output_sizes(cfg: PreprocessConfig) -> dict[str, int | None]:
    files = [f for s in cfg.suffixes for f in dataset_files(f"{cfg.output_prefix}{s}", cfg.multimodal)]
    return {f: Path(f).stat().st_size if Path(f).is_file() else None for f in files}


def _previous_output(cfg: PreprocessConfig, summary_file: Path) -> tuple[dict | None, dict[str, tuple[int, dict]]]:
    """The last complete run's summary and, by shard key, (first document, stats) of each of its
    shards; (None, {}) unless its output files are still there with the sizes it wrote."""
    try:
        previous = json.loads(summary_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None, {}
    if not previous.get("complete") or "shard_stats" not in previous:  # stopped early, or an older format
        return None, {}
    if previous.get("output_sizes") != _output_sizes(cfg):  # deleted, or written by something else since
        return None, {}
    by_key, first = {}, 0
    for stats in previous["shard_stats"]:
        by_key[stats["key"]] = (first, stats)
        first += stats["documents"]
    return previous, by_key


def run_preprocess(cfg: PreprocessConfig) -> PreprocessSummary:
    # per-run caches: a file may have changed since an earlier run in this process
    clear_digests()
    clear_processors()
    cfg.validate()
    prepare_output(cfg)
    from tqdm import tqdm

    t0 = time.time()
    settings = cfg.settings()
    specs, complete = _plan(cfg)
    key_of = functools.partial(shard_key, digest_settings(settings), cfg.multimodal)
    # hashing has its own pool: it needs no megatron, whose slow import the shard workers share
    with ProcessPoolExecutor(cfg.workers) if cfg.workers > 1 else contextlib.nullcontext() as pool:
        keys = list(tqdm(pool.map(key_of, specs) if pool else map(key_of, specs), total=len(specs), unit="shard",
                         desc="hash inputs", disable=not cfg.progress))
    summary_file = Path(f"{cfg.output_prefix}.summary.json")
    previous, reusable = _previous_output(cfg, summary_file)
    if complete and previous is not None and [s["key"] for s in previous["shard_stats"]] == keys:
        print(f"{cfg.output_prefix}: already complete (see {summary_file}); nothing to do")
        return PreprocessSummary(**{f.name: previous[f.name] for f in fields(PreprocessSummary)})
    results = _process_shards(cfg, specs, keys, reusable)

    stats = [results[i] for i in sorted(results)]
    errors_file = Path(f"{cfg.output_prefix}.errors.jsonl")
    all_errors = [e for s in stats for e in s["errors"]]
    summary = PreprocessSummary(
        complete=complete, items=sum(s["items"] for s in stats), documents=sum(s["documents"] for s in stats),
        visuals=sum(s["visuals"] for s in stats), skipped_items=len(all_errors), shards=len(stats),
        shards_reused=sum(1 for s in stats if s.get("skipped")), errors=all_errors[:100])
    if complete:
        with open(errors_file, "w") as f:
            for e in all_errors:
                f.write(json.dumps(e) + "\n")
        if summary.documents == 0:
            raise PreprocessError(f"no documents: {summary.items} items read, {summary.skipped_items} skipped "
                                  f"(reasons in {errors_file}); megatron cannot open an empty dataset")
        # from here the old output is replaced: its summary no longer describes it
        summary_file.unlink(missing_ok=True)
        summary.outputs = merge_shards(cfg, stats)
        if not cfg.keep_shards:
            shutil.rmtree(cfg.shard_dir)
    summary.seconds = time.time() - t0
    if complete:
        shard_stats = [{k: v for k, v in s.items() if k != "skipped"} for s in stats]
        write_json(summary_file, {**asdict(summary), "settings": settings, "shard_stats": shard_stats,
                                  "output_sizes": _output_sizes(cfg)})
    return summary


def _process_shards(cfg: PreprocessConfig, specs: list[ShardSpec], keys: list[str],
                    reusable: dict[str, tuple[int, dict]]) -> dict[int, dict]:
    """Runs ``process_shard`` on every shard (in ``workers`` processes); stats by shard index.
    ``reusable``: by key, where a shard's documents are in the previous output."""
    from tqdm import tqdm

    cfg.shard_dir.mkdir(exist_ok=True)
    clean_stale(cfg)
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (slow import: once, before workers fork)

    results: dict[int, dict] = {}
    bar = tqdm(unit="item", desc="preprocess", disable=not cfg.progress, smoothing=0.1)
    pool = ProcessPoolExecutor(cfg.workers) if cfg.workers > 1 else None
    in_flight: deque = deque()

    def collect(stats: dict, counted: int = 0):
        results[stats["index"]] = stats
        bar.update(stats["items"] - counted)
        bar.set_postfix(skipped=sum(len(r["errors"]) for r in results.values()), shards=len(results))

    try:
        for spec, key in zip(specs, keys):
            previous = reusable.get(key)
            if pool is None:
                counted = [0]

                def tick():
                    counted[0] += 1
                    if counted[0] % 64 == 0:
                        bar.update(64)

                stats = process_shard(cfg, spec, key, previous, tick)
                collect(stats, counted[0] - counted[0] % 64)
                continue
            in_flight.append(pool.submit(process_shard, cfg, spec, key, previous))
            while len(in_flight) >= 2 * cfg.workers:  # bounded: the input is never read ahead much
                collect(in_flight.popleft().result())
        while in_flight:
            collect(in_flight.popleft().result())
    except BaseException:
        for fut in in_flight:
            fut.cancel()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return results
