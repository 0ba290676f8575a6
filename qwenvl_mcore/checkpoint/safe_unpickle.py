"""Every pickle of a checkpoint is read through an allow-list: a checkpoint is data, never code.

A torch_dist checkpoint holds three kinds of pickle, and unpickling runs whatever callables a file names:

- DCP's `.metadata` (a plain pickle of torch's checkpoint metadata classes): read by `load_metadata`, an
  Unpickler whose find_class admits only those classes, torch.Size, dtypes and layouts;
- the objects megatron stores as bytes items (its common state, ShardedObjects such as the RNG state), which
  torch's DefaultLoadPlanner loads with `torch.load(weights_only=False)`: `SafeFileSystemReader` loads each one
  with `weights_only=True` first (plus numpy's array reconstruction, for the RNG state) and hands the planner only
  bytes that passed;
- a legacy `common.pt` (torch.save): loaded with `weights_only=True` the same way.

Anything else is refused with a CheckpointError naming the file and the refused global. The reader also checks,
before any data is read, that every data file the metadata names is a plain name inside the checkpoint and is
long enough (a truncated or missing `.distcp` is named, not met as an internal error later).

Our own reads (dcp.py) pass SafeFileSystemReader. megatron builds its readers and reads `common.pt` itself, so
`install()` (called by every entry point that loads through megatron: model_io.load_model, the trainer's resume)
points megatron's `_get_filesystem_reader` and `load_common` at the safe ones. This module is the only place
that changes megatron's checkpoint loading.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import io
import os
import pickle

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from qwenvl_mcore.checkpoint.errors import CheckpointError

METADATA_FILE = ".metadata"
LEGACY_COMMON_FILE = "common.pt"  # megatron's older format: the common state as a torch.save file
_REFUSED_HINT = ("a checkpoint holds only tensors and plain data, so this file was made to run code when loaded: "
                 "refused. Use checkpoints you trust, or an HF safetensors model converted with "
                 "tools/convert/hf2mcore.py.")

# The classes DCP's metadata pickle legitimately holds (torch 2.4 - 2.14): its dataclasses and enums, looked up
# by module below, and these.
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                     "torch.distributed.checkpoint.filesystem")
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                     ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}  # StorageMeta.checkpoint_id

# What torch's weights_only loader must admit beyond its defaults for our bytes items: numpy arrays, which the
# RNG state holds (np.random.get_state()). numpy 1 pickles name numpy.core, numpy 2 numpy._core.
_NUMPY_RECONSTRUCT = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct
OBJECT_GLOBALS = [_NUMPY_RECONSTRUCT, (_NUMPY_RECONSTRUCT, "numpy.core.multiarray._reconstruct"), np.ndarray,
                  np.dtype, *{type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.uint8)}]


def _metadata_global_allowed(module: str, name: str) -> bool:
    if (module, name) in _METADATA_GLOBALS:
        return True
    if module == "torch":
        return isinstance(getattr(torch, name, None), torch.dtype)
    if module in _METADATA_MODULES and "." not in name:
        import importlib

        obj = getattr(importlib.import_module(module), name, None)
        # plain data: dataclasses and enums of torch's checkpoint modules (never a function or a loader)
        return isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))
    return False


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, where: str):
        super().__init__(file)
        self._where = where

    def find_class(self, module: str, name: str):
        if not _metadata_global_allowed(module, name):
            raise CheckpointError(f"{self._where} names {module}.{name}, which no checkpoint metadata holds; "
                                  + _REFUSED_HINT)
        return super().find_class(module, name)


def load_metadata(stream, where: str) -> Metadata:
    """Unpickle DCP metadata from `stream` (file `where`) through the allow-list."""
    try:
        metadata = _MetadataUnpickler(stream, where).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to parse is a damaged file: say which
        raise CheckpointError(f"{where} is damaged ({type(e).__name__}: {e}); the checkpoint is incomplete or "
                              "corrupt.") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{where} holds a {type(metadata).__name__}, not checkpoint metadata; the checkpoint "
                              "is corrupt.")
    return metadata


def load_object(data, where: str):
    """torch.load a torch.save'd object (bytes or a binary file) with weights_only=True and OBJECT_GLOBALS;
    a refused global or a damaged blob is a CheckpointError naming `where`."""
    buf = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    start = buf.tell()
    with torch.serialization.safe_globals(OBJECT_GLOBALS):
        try:
            return torch.load(buf, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            buf.seek(start)
            try:
                refused = torch.serialization.get_unsafe_globals_in_checkpoint(buf)
            except Exception:  # noqa: BLE001 - only for the message
                refused = []
            if refused:
                raise CheckpointError(f"{where} names {', '.join(refused)}; " + _REFUSED_HINT) from None
            raise CheckpointError(f"{where} holds something a checkpoint never does (torch's weights-only loader "
                                  "refused it); " + _REFUSED_HINT) from None
        except Exception as e:  # noqa: BLE001 - a truncated or garbled blob
            raise CheckpointError(f"{where} is damaged ({type(e).__name__}: {e}); the checkpoint is incomplete "
                                  "or corrupt.") from None


def check_data_files(ckpt_dir: str, metadata: Metadata) -> None:
    """Every data file the metadata names is a plain file name of `ckpt_dir` and holds the bytes it should."""
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        name = info.relative_path
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise CheckpointError(f"{os.path.join(ckpt_dir, METADATA_FILE)} names the data file {name!r} outside "
                                  "the checkpoint directory; refused (the metadata is corrupt or crafted).")
        needed[name] = max(needed.get(name, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        path = os.path.join(ckpt_dir, name)
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {ckpt_dir}: data file {name} is missing; the checkpoint is "
                                  "incomplete.") from None
        if size < end:
            raise CheckpointError(f"checkpoint {ckpt_dir}: data file {path} is truncated ({size} bytes, its "
                                  f"metadata needs {end}); the checkpoint is incomplete or corrupt.")


class _VerifyingPlanner:
    """Wraps a LoadPlanner: a bytes item reaches the planner (which torch.loads it with weights_only=False)
    only after load_object accepted the very same bytes."""

    def __init__(self, planner, reader: SafeFileSystemReader):
        self._planner, self._reader = planner, reader

    def __getattr__(self, name):
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        info = self._reader.storage_data.get(read_item.storage_index)
        where = (f"{os.path.join(str(self._reader.path), info.relative_path) if info else self._reader.path} "
                 f"(object {read_item.storage_index.fqn})")
        load_object(value, where)
        value.seek(0)
        self._planner.load_bytes(read_item, value)


class SafeFileSystemReader(FileSystemReader):
    """torch's FileSystemReader reading the metadata and every stored object through the allow-lists, after
    checking the data files (check_data_files)."""

    def read_metadata(self) -> Metadata:
        # no **kwargs: torch then never falls back to per-rank metadata files, which our checkpoints never have
        path = self._get_metadata_path(None)
        ckpt = str(self.path)
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = load_metadata(f, str(path))
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {ckpt} has no {os.path.basename(str(path))}: it is incomplete (a "
                                  "save that did not finish) or not a megatron checkpoint.") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        check_data_files(ckpt, metadata)
        return metadata

    def read_data(self, plan, planner):
        try:
            return super().read_data(plan, _VerifyingPlanner(planner, self))
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - sizes were checked: the bytes themselves are bad
            raise CheckpointError(f"checkpoint {self.path}: its data cannot be read ({type(e).__name__}: {e}); "
                                  "a data file is corrupt, or the checkpoint does not fit the model.") from None


@contextlib.contextmanager
def checkpoint_errors(ckpt_dir: str):
    """Loads from `ckpt_dir` inside the block fail with a CheckpointError: torch's DCP wraps a reader's exceptions
    in CheckpointException (a BaseException) and reports a failed metadata read only as text."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        failures = [exc for exc, _ in e.failures.values()]
        for exc in failures:
            while exc is not None:
                if isinstance(exc, CheckpointError):
                    raise exc from None
                exc = exc.__cause__ or exc.__context__
        SafeFileSystemReader(ckpt_dir).read_metadata()  # raises the metadata's own error, if that was it
        first = failures[0] if failures else e
        raise CheckpointError(f"checkpoint {ckpt_dir} cannot be loaded ({type(first).__name__}: "
                              f"{str(first).strip().splitlines()[-1] if str(first).strip() else ''}).") from None


def _megatron_reader(checkpoint_dir, cache_metadata: bool = False, async_strategy: str = "mcore"):
    # megatron caches metadata only when asked (we never ask); the safe reader reads it every time
    return SafeFileSystemReader(checkpoint_dir)


def _megatron_load_common(checkpoint_dir):
    from megatron.core.dist_checkpointing.mapping import CheckpointingException

    path = os.path.join(checkpoint_dir, LEGACY_COMMON_FILE)
    try:
        with open(path, "rb") as f:
            return load_object(f, path)
    except FileNotFoundError as e:
        raise CheckpointingException(f"Common file {path} does not exist") from e


def install() -> None:
    """Make megatron's dist_checkpointing read through the allow-lists (idempotent)."""
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.strategies import torch as torch_strategy

    for module in (serialization, torch_strategy):
        module._get_filesystem_reader = _megatron_reader
    serialization.load_common = _megatron_load_common
