"""Checkpoints in the run directory with megatron-core's dist_checkpointing.

Layout: ``checkpoints/step_00000012/`` (complete) and ``checkpoints/step_00000012.tmp/``
(being written). A checkpoint is written under the ``.tmp`` name and renamed only when
every rank has finished, so a crash mid-save leaves the previous checkpoint as the
latest. Tensors are stored with their global shapes and offsets, so a checkpoint saved
at one (TP, PP, EP, DP) layout loads at another.

Verified checkpoints. The last file written into ``step_N.tmp/`` before the rename is
``manifest.json``: every other file's size in bytes and CRC-32 (zlib, streamed; the ranks
hash the files in parallel). Loading (``select_checkpoint``: training resume, eval,
generate, export) checks a checkpoint against its manifest and against its own
``.metadata`` (read with the restricted unpickler of ``safe_load``: every shard it names
present and long enough) and falls back to the newest checkpoint that passes, printing
one line per skipped checkpoint with the reason. When none passes the load fails with
``CheckpointError`` (one line). A ``.metadata`` that names anything but checkpoint
classes is not skipped but refused (``UnsafeCheckpointError``): someone tampered with the
run dir. A checkpoint without ``manifest.json`` was written before this check existed; it
is loaded after the structural check, with a line saying it is unverified, so old runs
still resume. CRC-32 detects corruption (flipped bits, truncation), not a forger, who can
rewrite the manifest too; the unpickler is what makes loading a hostile run dir safe.
Pruning (``checkpoint.keep``) never removes the checkpoint just written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from megafusion.training.safe_load import CheckpointError, UnsafeCheckpointError, read_metadata, restricted_loading

__all__ = ["CheckpointError", "UnsafeCheckpointError", "Checkpointer", "Verdict", "complete_checkpoints",
           "latest_checkpoint", "select_checkpoint", "verify_checkpoint"]

STEP_DIR = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "megafusion-checkpoint-manifest-v1"
# megatron-core's built-in async checkpoint writer (dist_checkpointing.save's default, "nvrx",
# needs nvidia_resiliency_ext); requests go to its AsyncCallsQueue.
ASYNC_STRATEGY = "mcore"
_CHUNK = 8 << 20  # bytes read per crc32 update: large enough for full disk speed, small in memory


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint, verified or not (``select_checkpoint`` verifies)."""
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def remove_incomplete(run_dir: Path) -> None:
    """Deletes ``.tmp`` leftovers of a crashed save (rank 0 only)."""
    root = checkpoint_root(run_dir)
    if root.is_dir():
        for path in root.glob("step_*.tmp"):
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------- manifest and verification
# These work in one process and across ranks alike: with torch.distributed initialised they
# are collectives (every rank calls them with the same arguments, rank 0 decides, and every
# rank gets rank 0's answer), otherwise plain functions (`megafusion checkpoint verify`).

def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (all ranks act on one decision)."""
    rank, world = _rank_world()
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def file_checksum(path: Path) -> tuple[int, str]:
    """(size in bytes, CRC-32 as 8 hex digits) of ``path``, read in chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, f"{crc:08x}"


def _checksums(ckpt_dir: Path, names: list[str]) -> dict[str, tuple[int, str] | str]:
    """``file_checksum`` of each of ``names`` (or why it could not be read), the files
    shared out over the ranks: a checkpoint is hashed at the speed of all ranks together."""
    rank, world = _rank_world()
    mine: dict[str, tuple[int, str] | str] = {}
    for name in names[rank::world]:
        try:
            mine[name] = file_checksum(ckpt_dir / name)
        except OSError as err:
            mine[name] = f"{name} unreadable ({err.strerror or err})"
    if world == 1:
        return mine
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def _files(ckpt_dir: Path) -> list[str]:
    """Every file under ``ckpt_dir`` but the manifest, as sorted relative paths."""
    return sorted(str(p.relative_to(ckpt_dir)) for p in ckpt_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(ckpt_dir: Path, step: int) -> None:
    """Writes ``ckpt_dir/manifest.json`` (collective; rank 0 writes). Call when every rank
    has finished writing into ``ckpt_dir``; it must be the last file written there."""
    names = _from_rank0(_files(ckpt_dir) if _rank_world()[0] == 0 else None)
    sums = _checksums(ckpt_dir, names)
    if _rank_world()[0] != 0:
        return
    unreadable = [v for v in sums.values() if isinstance(v, str)]
    if unreadable:  # a file that vanished mid-save: publishing it would make a checkpoint that never loads
        raise CheckpointError(f"{ckpt_dir}: cannot checksum {unreadable[0]}")
    files = {name: {"size": sums[name][0], "crc32": sums[name][1]} for name in names}
    path = ckpt_dir / MANIFEST
    with open(path, "w") as f:
        json.dump({"format": MANIFEST_FORMAT, "step": step, "checksum": "crc32", "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename publishes the checkpoint


@dataclass(frozen=True)
class Verdict:
    """The outcome of ``verify_checkpoint``.

    ``ok``: the checkpoint can be loaded. ``verified``: it has a manifest and every file
    matched it (False for a checkpoint saved before manifests: loadable, unverified).
    ``unsafe``: its metadata names a class that is not checkpoint data (never load it).
    ``reason``: why it is not ok (or not verified), one line.
    """

    ok: bool
    verified: bool = False
    unsafe: bool = False
    reason: str = ""


def _read_manifest(ckpt_dir: Path) -> tuple[dict | None, str]:
    """(manifest files or None when there is no manifest, the reason it is unusable or "")."""
    path = ckpt_dir / MANIFEST
    if not path.is_file():
        return None, ""
    try:
        raw = json.loads(path.read_text())
        files = raw["files"]
        if raw.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {raw.get('format')!r}")
        files = {str(k): (int(v["size"]), str(v["crc32"])) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"{MANIFEST} unreadable ({type(err).__name__}: {err})"
    for name in files:  # the manifest names files inside the checkpoint only
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return None, f"{MANIFEST} names a file outside the checkpoint: {name!r}"
    return files, ""


def _size_problems(ckpt_dir: Path, files: dict[str, tuple[int, str]]) -> str:
    """The first missing, resized or unexpected file (cheap: no reading), or ""."""
    present = set(_files(ckpt_dir))
    for name, (size, _) in sorted(files.items()):
        if name not in present:
            return f"{name} missing"
        actual = (ckpt_dir / name).stat().st_size
        if actual != size:
            return f"{name} is {actual} bytes, the manifest says {size} ({'truncated' if actual < size else 'grown'})"
    extra = sorted(present - set(files))
    if extra:
        return f"unexpected file {extra[0]} (not in {MANIFEST}; checkpoints are only ever written whole)"
    return ""


def _structure_problems(ckpt_dir: Path, with_manifest: bool) -> tuple[str, bool]:
    """(first problem of ``.metadata`` and the shards it names, whether it is unsafe).

    ``.metadata`` is read with the restricted unpickler: a forbidden class there is unsafe.
    Without a manifest, files that ``.metadata`` does not name are refused too: megatron
    would read a stray ``common.pt`` with torch.load.
    """
    name = f"{ckpt_dir.name}/.metadata"
    if not (ckpt_dir / ".metadata").is_file():
        return ".metadata missing", False
    if not (ckpt_dir / "metadata.json").is_file():
        return "metadata.json missing", False
    try:
        metadata = read_metadata(ckpt_dir / ".metadata", name)
    except UnsafeCheckpointError as err:
        return str(err), True
    except CheckpointError as err:  # "<name>: unreadable checkpoint metadata (...)"
        return f".metadata: {str(err).split(': ', 1)[-1]}", False
    needed: dict[str, int] = {}  # shard -> bytes it must hold at least
    for info in (metadata.storage_data or {}).values():
        path = str(info.relative_path)
        if Path(path).is_absolute() or ".." in Path(path).parts:
            return f".metadata names a file outside the checkpoint: {path!r}", False
        needed[path] = max(needed.get(path, 0), int(info.offset) + int(info.length))
    for path, end in sorted(needed.items()):
        if not (ckpt_dir / path).is_file():
            return f"{path} missing (named by .metadata)", False
        size = (ckpt_dir / path).stat().st_size
        if size < end:
            return f"{path} truncated: {size} bytes, .metadata needs {end}", False
    if not with_manifest:
        extra = sorted(set(_files(ckpt_dir)) - set(needed) - {".metadata", "metadata.json"})
        if extra:
            return f"unexpected file {extra[0]} (not named by .metadata)", False
    return "", False


def _metadata_as_saved(ckpt_dir: Path, files: dict[str, tuple[int, str]] | None) -> bool:
    """Whether ``.metadata`` matches the manifest (True without one: nothing to compare with)."""
    if files is None:
        return True
    path = ckpt_dir / ".metadata"
    return ".metadata" in files and path.is_file() and file_checksum(path) == files[".metadata"]


def verify_checkpoint(ckpt_dir: Path) -> Verdict:
    """Checks ``ckpt_dir`` against its manifest and its ``.metadata`` (collective when
    torch.distributed is initialised: every rank hashes a share; all get rank 0's verdict)."""
    ckpt_dir = Path(ckpt_dir)
    is_rank0 = _rank_world()[0] == 0
    plan = None
    if is_rank0:  # cheap checks first: only a checkpoint whose files all have the right sizes is hashed
        files, problem = _read_manifest(ckpt_dir) if ckpt_dir.is_dir() else (None, "not a directory")
        problem = problem or (_size_problems(ckpt_dir, files) if files is not None else "")
        structure, unsafe = "", False
        if ckpt_dir.is_dir() and _metadata_as_saved(ckpt_dir, files):
            # Read .metadata (safely) even when a shard is already known to be bad: a hostile
            # .metadata is reported as tampering, not merely skipped as corrupt. One that
            # differs from the manifest is not read at all: flipped bits in a class name
            # would look like tampering.
            structure, unsafe = _structure_problems(ckpt_dir, files is not None)
        elif not problem:
            problem = (".metadata missing" if not (ckpt_dir / ".metadata").is_file()
                       else ".metadata checksum mismatch (its contents changed after the save)")
        plan = (files, problem, structure, unsafe)
    files, problem, structure, unsafe = _from_rank0(plan)
    if unsafe:
        return Verdict(False, unsafe=True, reason=structure)
    if problem:
        return Verdict(False, reason=problem)
    sums = _checksums(ckpt_dir, sorted(files) if files is not None else [])
    verdict = None
    if is_rank0:
        bad = [v if isinstance(v, str) else f"{name} checksum mismatch (crc32 {v[1]}, the manifest says "
               f"{files[name][1]}: its contents changed after the save)"
               for name, v in sorted(sums.items()) if isinstance(v, str) or v != files[name]]
        if bad or structure:
            verdict = Verdict(False, reason=bad[0] if bad else structure)
        elif files is None:
            verdict = Verdict(True, reason=f"no {MANIFEST} (saved before checkpoints carried checksums)")
        else:
            verdict = Verdict(True, verified=True)
    return _from_rank0(verdict)


def _say(line: str) -> None:
    if _rank_world()[0] == 0:
        print(f"[megafusion] {line}", file=sys.stderr, flush=True)


def select_checkpoint(run_dir: Path, step: int | None = None,
                      say: Callable[[str], None] = _say) -> tuple[int, Path] | None:
    """(step, path) of the checkpoint to load: ``step``'s, or the newest that verifies.

    Each skipped checkpoint gets one line through ``say`` (``checkpoint step_00000006
    skipped: __0_0.distcp checksum mismatch (...)``), as does an unverified one (no
    manifest). Returns None when the run has no complete checkpoint. Raises
    ``UnsafeCheckpointError`` for a checkpoint whose metadata is not checkpoint data,
    ``CheckpointError`` when ``step`` fails verification or no checkpoint passes.
    A collective when torch.distributed is initialised (all ranks get the same answer).
    """
    run_dir = Path(run_dir)
    found = _from_rank0(complete_checkpoints(run_dir) if _rank_world()[0] == 0 else None)
    if not found:
        return None
    if step is not None:
        found = [(s, p) for s, p in found if s == step]
        if not found:
            return None
    skipped: list[str] = []
    for s, path in reversed(found):
        verdict = verify_checkpoint(path)
        if verdict.unsafe:
            raise UnsafeCheckpointError(verdict.reason)
        if verdict.ok:
            if not verdict.verified:
                say(f"checkpoint {path.name}: {verdict.reason}: loading it unverified")
            return s, path
        if step is not None:
            raise CheckpointError(f"checkpoint {path} failed verification: {verdict.reason}; load another step "
                                  "(`megafusion checkpoint verify RUN_DIR` lists which verify)")
        say(f"checkpoint {path.name} skipped: {verdict.reason}")
        skipped.append(f"{path.name}: {verdict.reason}")
    raise CheckpointError(f"run dir '{run_dir}': none of its {len(found)} checkpoint(s) verifies (newest "
                          f"{skipped[0]}); nothing was loaded: restore checkpoints/ from a copy, or move it "
                          "aside to train from scratch")


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "ep": ps.get_expert_model_parallel_world_size(), "dp": ps.get_data_parallel_world_size()}


def _rng_state(device: torch.device) -> dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / Float16Module wrappers: checkpoints hold its keys only, so a
    checkpoint does not depend on how the model was wrapped (precision, DDP)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _sharded_state_dict(model_chunks, optimizer, common: dict[str, Any], with_rng: bool,
                        device: torch.device, is_loading: bool) -> dict[str, Any]:
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state: dict[str, Any] = {"common": common}
    if len(model_chunks) == 1:
        state["model"] = unwrap(model_chunks[0]).sharded_state_dict()
    else:
        for i, chunk in enumerate(model_chunks):
            state[f"model{i}"] = unwrap(chunk).sharded_state_dict()
    # fully_reshardable: optimizer state stored per parameter in global coordinates, so it
    # loads at another TP/PP/DP layout; no chained-optimizer prefix, so expert-parallel
    # checkpoints load at another layout with the same EP.
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True})
    if with_rng:
        # One RNG state per (pp, tp) position; data-parallel replicas share it.
        state["rng_state"] = ShardedObject(
            "rng_state", _rng_state(device),
            (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
            (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
            replica_id=ps.get_data_parallel_rank(with_context_parallel=True))
    return state


class Checkpointer:
    """Saves and restores model, optimizer, LR scheduler, RNG and data position."""

    def __init__(self, run_dir: Path, keep: int, async_save: bool, device: torch.device) -> None:
        self.run_dir = Path(run_dir)
        self.keep = keep
        self.device = device
        self.async_save = async_save and device.type == "cuda"
        self._async_queue = None
        if dist.get_rank() == 0:
            checkpoint_root(self.run_dir).mkdir(parents=True, exist_ok=True)
            remove_incomplete(self.run_dir)
        dist.barrier()

    # ------------------------------------------------------------------ save
    def save(self, step: int, model_chunks, optimizer, scheduler, data_state: dict[str, Any],
             with_optimizer: bool = True) -> None:
        """Writes checkpoint ``step``. ``with_optimizer=False`` stores model weights and the
        LR schedule only (an imported model: its optimizer has never stepped and holds no
        state); resuming from it starts a fresh optimizer."""
        from megatron.core import dist_checkpointing

        # At most one save in flight: the previous one is published (manifest, rename, prune)
        # before this one starts, so saves land in order and a re-save of the same step never
        # races its own earlier write. A collective, like ``save`` itself.
        self.poll(blocking=True)
        root = checkpoint_root(self.run_dir)
        tmp, final = root / f"step_{step:08d}.tmp", root / f"step_{step:08d}"
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        common = {"step": step, "scheduler": scheduler.state_dict(), "layout": _layout(), "data": data_state,
                  "has_optimizer": with_optimizer}
        state = _sharded_state_dict(model_chunks, optimizer if with_optimizer else None, common, True, self.device,
                                    is_loading=False)
        if self.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            if self._async_queue is None:
                self._async_queue = AsyncCallsQueue()
            # megatron-core's own async writer (a forked process per save) and its queue:
            # save()'s default async strategy, "nvrx", imports nvidia_resiliency_ext, which is
            # not a dependency of this project.
            request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True,
                                              async_strategy=ASYNC_STRATEGY)
            request.add_finalize_fn(lambda: self._publish(tmp, final))
            self._async_queue.schedule_async_request(request)
        else:
            dist_checkpointing.save(state, str(tmp))
            dist.barrier()
            self._publish(tmp, final)
            dist.barrier()

    def _publish(self, tmp: Path, final: Path) -> None:
        """Writes the manifest into a finished checkpoint, renames it into place and prunes
        old ones. A collective (the ranks share the hashing); rank 0 writes and renames."""
        step = int(final.name.split("_")[1])
        write_manifest(tmp, step)
        if dist.get_rank() != 0:
            return
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        self._prune(step)

    def _prune(self, newest: int) -> None:
        """Keeps ``keep`` checkpoints: the one just written (step ``newest``, verified by
        construction) and the newest older ones. Checkpoints of later steps exist only when
        the resume skipped them as failing verification: they are left for inspection (and
        replaced when training reaches their step), and never count towards ``keep``, so a
        run of corrupt ones cannot push the good checkpoint out."""
        older = [path for s, path in complete_checkpoints(self.run_dir) if s < newest]
        for old in older[:max(0, len(older) - (self.keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)

    def poll(self, blocking: bool = False) -> None:
        """Finishes asynchronous saves that are done (all of them when ``blocking``): each is
        published (manifest, rename, prune) on every rank. A collective. The training loop
        calls it every step, and with ``blocking`` before it returns or stops, so the final
        checkpoint is never left unpublished."""
        if self._async_queue is not None:
            self._async_queue.maybe_finalize_async_calls(blocking=blocking)

    def pending(self) -> int:
        """Asynchronous saves written or being written but not yet published."""
        return 0 if self._async_queue is None else self._async_queue.get_num_unfinalized_calls()

    # ------------------------------------------------------------------ load
    def load_latest(self, model_chunks, optimizer, scheduler) -> dict[str, Any] | None:
        """Restores the newest checkpoint that verifies (``select_checkpoint``); returns its
        common state, or None when there is none. Raises ``CheckpointError`` when checkpoints
        exist but none verifies."""
        from megatron.core import dist_checkpointing

        chosen = select_checkpoint(self.run_dir)
        if chosen is None:
            return None
        _, path = chosen
        with restricted_loading():
            common = dist_checkpointing.load_common_state_dict(str(path))["common"]
        same_layout = common["layout"] == _layout()
        has_optimizer = common.get("has_optimizer", True)
        state = _sharded_state_dict(model_chunks, optimizer if has_optimizer else None, common, same_layout,
                                    self.device, is_loading=True)
        with restricted_loading():
            loaded = dist_checkpointing.load(state, str(path))
        if len(model_chunks) == 1:
            unwrap(model_chunks[0]).load_state_dict(loaded["model"], strict=True)
        else:
            for i, chunk in enumerate(model_chunks):
                unwrap(chunk).load_state_dict(loaded[f"model{i}"], strict=True)
        if has_optimizer:
            optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(common["scheduler"])
        if same_layout:
            _set_rng_state(loaded["rng_state"])
        return common
