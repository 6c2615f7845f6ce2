"""Reading megatron ``torch_dist`` checkpoints without running code stored in them.

A ``torch_dist`` checkpoint holds two kinds of pickles:

- ``.metadata``: the index of the checkpoint (which tensor lives at which offset of which
  ``.distcp`` file), written by ``pickle.dump`` and read by torch's ``FileSystemReader``
  with a plain ``pickle.load``;
- byte objects inside the ``.distcp`` shards (megatron's ``ShardedObject``s: the RNG
  state, the run's common state), written by ``torch.save`` and read back by torch's
  ``DefaultLoadPlanner.load_bytes`` with ``torch.load(weights_only=False)``.

A plain unpickler calls whatever a pickle names (``posix.system``, ``builtins.exec``...), so
a run directory from someone else, or one edited on a shared disk, could run a shell
command on ``megafusion train`` / eval / generate / export. This module closes both doors:

- ``read_metadata(path)``: ``.metadata`` through ``MetadataUnpickler``, which resolves only
  the classes torch's distributed-checkpoint metadata consists of (``ALLOWED``, found by
  listing the GLOBAL opcodes of real metadata with ``pickletools``) and refuses any other
  with ``UnsafeCheckpointError`` naming the file and the class;
- ``restricted_loading()``: a context manager the load paths enter around
  ``dist_checkpointing.load`` / ``load_common_state_dict``. Inside it megatron gets a
  ``SafeFileSystemReader`` (metadata as above, byte objects with ``weights_only=True``).

megatron-core 0.19.2 builds its reader with the module-level function
``_get_filesystem_reader`` (in ``strategies.torch``, imported by name into
``serialization``) and offers no argument to pass another one down to
``load_common_state_dict``, which ``dist_checkpointing.load`` calls itself. So
``restricted_loading`` swaps that function for the duration of the ``with`` block and puts
the originals back on exit; nothing is patched at import time. The tests in
tests/training/test_safe_load.py fail if a megatron upgrade moves the reader elsewhere.
"""

from __future__ import annotations

import contextlib
import functools
import io
import pickle
import re
import threading
from pathlib import Path
from typing import Any, Iterator

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, incomplete, or unsafe to read.

    The message is one line naming the checkpoint (or file) and what to do. Command-line
    entry points print it and exit with code 2. A ValueError, so that callers which already
    turn bad input (ValueError, FileNotFoundError) into one line and exit 2 handle it too.
    """


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file asked to unpickle something that is not checkpoint data."""


# module -> names that ``.metadata`` may reference. Found by reading the GLOBAL /
# STACK_GLOBAL opcodes of the metadata of real megafusion checkpoints (text and
# Transfusion models, with and without optimizer state, 1 and 2 ranks); the planner
# classes appear because megatron stores every rank's save plan in ``all_local_plans``.
# Classes here are dataclasses and enums: constructing them stores fields, nothing else.
ALLOWED: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING"}),
    "torch.distributed.checkpoint.planner": frozenset({
        "SavePlan", "LoadPlan", "WriteItem", "ReadItem", "WriteItemType", "LoadItemType",
        "TensorWriteData", "BytesIOWriteData"}),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    # torch.layout objects are pickled as a call of this lookup by name (torch's own
    # weights_only unpickler allows it too).
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),  # plus every torch.dtype / layout / memory_format: _torch_constant
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset"}),  # pickled by reference below protocol 4
}


def _torch_constant(module: str, name: str) -> Any | None:
    """``torch.float32``, ``torch.strided``, ``torch.contiguous_format``...: constants pickled by name."""
    if module != "torch":
        return None
    value = getattr(torch, name, None)
    return value if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)) else None


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that builds only torch distributed-checkpoint metadata (``ALLOWED``)."""

    def __init__(self, file, where: str) -> None:
        super().__init__(file)
        self.where = where  # the file, for the error message

    def find_class(self, module: str, name: str) -> Any:
        constant = _torch_constant(module, name)
        if constant is not None:
            return constant
        if name in ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.where}: refusing to unpickle '{module}.{name}' (not part of torch distributed-checkpoint "
            "metadata); this checkpoint was not written by megafusion or was tampered with: do not use it")

    def persistent_load(self, pid: Any) -> Any:  # metadata holds no tensors or storages
        raise UnsafeCheckpointError(f"{self.where}: refusing a persistent reference in checkpoint metadata "
                                    "(not part of torch distributed-checkpoint metadata)")


def read_metadata(path: str | Path, where: str | None = None) -> Any:
    """The ``torch.distributed.checkpoint.metadata.Metadata`` pickled at ``path``, read safely.

    ``where``: how the error names the file (default: ``path``). Raises
    ``UnsafeCheckpointError`` for a class outside ``ALLOWED``, ``CheckpointError`` for a
    file that is not a pickle of checkpoint metadata (truncated, garbage).
    """
    path = Path(path)
    where = where or str(path)
    with open(path, "rb") as f:
        try:
            metadata = MetadataUnpickler(f, where).load()
        except UnsafeCheckpointError:
            raise
        except Exception as err:  # truncated or garbage pickles raise many types
            raise CheckpointError(f"{where}: unreadable checkpoint metadata ({type(err).__name__}: {err})") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{where}: holds a {type(metadata).__name__}, not torch distributed-checkpoint "
                              "Metadata")
    return metadata


# torch's weights_only refusals name the global as "... GLOBAL posix.system ..." (two wordings).
_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


class _WeightsOnlyBytes:
    """Stands in for the load planner while the reader runs: byte objects are unpickled
    with ``weights_only=True`` (tensors and plain containers only) instead of the
    planner's ``weights_only=False``. The object is then handed to the real planner as a
    fresh ``torch.save`` of itself, which only re-creates what was already built safely;
    every other planner method is the real planner's."""

    def __init__(self, planner: Any, reader: Any) -> None:
        self._planner = planner
        self._reader = reader  # for the error: which shard file the object came from

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            found = _UNSUPPORTED_GLOBAL.search(str(err))
            what = f"'{found.group(1)}'" if found else "an object that is not plain data"
            shard = self._reader.storage_data[read_item.storage_index].relative_path
            raise UnsafeCheckpointError(
                f"{Path(self._reader.path).name}/{shard}: refusing to unpickle {what} in '{read_item.dest_index.fqn}' "
                "(checkpoint objects hold tensors and plain data only); this checkpoint was tampered with: "
                "do not use it") from None
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        self._planner.load_bytes(read_item, clean)


@functools.cache  # one class, built on first use: importing torch.distributed.checkpoint takes ~2 s
def _filesystem_reader_class():
    from torch.distributed.checkpoint import FileSystemReader

    class SafeFileSystemReader(FileSystemReader):
        """torch's FileSystemReader with ``read_metadata`` and byte objects read safely.

        ``refused`` keeps the first refusal: torch catches a failing ``read_metadata`` and
        reports a generic error instead, so ``restricted_loading`` raises this one."""

        refused: CheckpointError | None = None

        def read_metadata(self, *args: Any, **kwargs: Any):
            path = Path(self._get_metadata_path(kwargs.get("rank")))
            try:
                metadata = read_metadata(path, f"{path.parent.name}/{path.name}")
            except CheckpointError as err:
                self.refused = self.refused or err
                raise
            # What the base class does after its pickle.load (the load id ties reads together).
            if getattr(metadata, "storage_meta", None) is None:
                from torch.distributed.checkpoint.metadata import StorageMeta

                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def read_data(self, plan, planner):
            return super().read_data(plan, _WeightsOnlyBytes(planner, self))

    return SafeFileSystemReader


def safe_reader(checkpoint_dir: str | Path):
    """A ``FileSystemReader`` for ``checkpoint_dir`` that unpickles nothing but checkpoint data."""
    return _filesystem_reader_class()(checkpoint_dir)


# One ``restricted_loading`` block at a time per process: the swap below is process-wide.
_swap_lock = threading.RLock()


@contextlib.contextmanager
def restricted_loading() -> Iterator[None]:
    """Within the block, megatron's dist_checkpointing reads checkpoints through
    ``safe_reader`` (see the module docstring for why this swaps a function). An unsafe
    checkpoint raises ``UnsafeCheckpointError`` (unwrapped from torch's
    ``CheckpointException``, which would print every rank's traceback)."""
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.strategies import torch as torch_strategy
    from torch.distributed.checkpoint.api import CheckpointException

    readers = []

    def get_reader(checkpoint_dir, cache_metadata: bool = False, async_strategy: str = "mcore"):
        readers.append(safe_reader(checkpoint_dir))
        return readers[-1]

    with _swap_lock:
        originals = (serialization._get_filesystem_reader, torch_strategy._get_filesystem_reader)
        serialization._get_filesystem_reader = torch_strategy._get_filesystem_reader = get_reader
        try:
            yield
        except (Exception, CheckpointException) as err:
            refused = [r.refused for r in readers if r.refused is not None]
            if isinstance(err, CheckpointException):
                refused += [exc for exc, _ in err.failures.values() if isinstance(exc, CheckpointError)]
            if refused and refused[0] is not err:
                raise refused[0] from None
            raise
        finally:
            serialization._get_filesystem_reader, torch_strategy._get_filesystem_reader = originals
