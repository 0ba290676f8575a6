"""Streaming reads and writes of megatron's `torch_dist` checkpoints (PyTorch Distributed Checkpoint on disk).

megatron-core's own save path needs every tensor in memory at once (and copies it); a 235B conversion cannot
afford that. Here each tensor chunk is produced on demand while it is written (one file per chunk, so nothing
is held after its file is closed), and any region of a saved tensor can be read without loading the rest. The
files are exactly what `megatron.core.dist_checkpointing.load` reads: DCP `.metadata` + data files, megatron's
`metadata.json`, and the common state stored as the `common_state` object.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    BytesIOWriteData,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from qwenvl_mcore.checkpoint.safe_unpickle import SafeFileSystemReader, checkpoint_errors

MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
COMMON_STATE_KEY = "common_state/shard_0_1"  # megatron's ShardedObject("common_state", ..., (1,), (0,)).unique_key


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a checkpoint tensor: `key` (megatron's ShardedTensor key), its global shape and dtype,
    and where this piece sits (offsets, sizes)."""

    key: str
    global_shape: tuple[int, ...]
    dtype: torch.dtype
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.sizes) * self.dtype.itemsize


class _LazySavePlanner(DefaultSavePlanner):
    """Plans the given chunks without their data; `resolve_data` produces each one while it is written."""

    def __init__(self, chunks: Sequence[tuple[Chunk, Callable[[], torch.Tensor]]], common: dict | None):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False, dedup_save_to_lowest_rank=False)
        self._produce = {MetadataIndex(c.key, torch.Size(c.offsets)): (c, fn) for c, fn in chunks}
        self._common = common

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:
        self.state_dict, self.is_coordinator = {}, is_coordinator

    def create_local_plan(self) -> SavePlan:
        items = [
            WriteItem(
                index=index, type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)),
                    properties=TensorProperties(dtype=c.dtype), size=torch.Size(c.global_shape)),
            )
            for index, (c, _) in self._produce.items()
        ]
        if self._common is not None:
            items.append(WriteItem(index=MetadataIndex(COMMON_STATE_KEY), type=WriteItemType.BYTE_IO,
                                   bytes_io_data=BytesIOWriteData(nbytes=0)))
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            buf = io.BytesIO()
            torch.save([self._common], buf)  # megatron stores the common state as a one-element list
            buf.seek(0)
            return buf
        chunk, produce = self._produce[MetadataIndex(write_item.index.fqn, write_item.index.offset)]
        tensor = produce()
        if tuple(tensor.shape) != chunk.sizes or tensor.dtype != chunk.dtype:
            raise ValueError(f"{chunk.key} at {list(chunk.offsets)}: produced {list(tensor.shape)} {tensor.dtype}, "
                             f"planned {list(chunk.sizes)} {chunk.dtype}")
        return tensor.contiguous()


def write_chunks(out_dir: str, chunks: Sequence[tuple[Chunk, Callable[[], torch.Tensor]]], *,
                 common: dict | None = None, process_group=None) -> None:
    """Write a megatron torch_dist checkpoint to `out_dir` (which must exist) from lazily produced chunks.

    Every process of `process_group` (None: this process alone) passes its own share of the chunks; the first
    also passes `common` (megatron's non-tensor state, {} for a model-only checkpoint). One data file per chunk.
    """
    distributed = process_group is not None and dist.get_world_size(process_group) > 1
    rank = dist.get_rank(process_group) if distributed else 0
    writer = dcp.FileSystemWriter(out_dir, single_file_per_rank=False, thread_count=1, sync_files=True)
    dcp.save({}, storage_writer=writer, planner=_LazySavePlanner(chunks, common if rank == 0 else None),
             process_group=process_group, no_dist=not distributed)
    if rank == 0:
        with open(os.path.join(out_dir, "metadata.json"), "w") as f:
            json.dump(MEGATRON_METADATA, f)


def read_metadata(ckpt_dir: str) -> Metadata:
    """The DCP metadata of a checkpoint: every stored tensor's global shape, dtype and chunks. Read through the
    allow-list, after checking that its data files are all there (safe_unpickle); CheckpointError otherwise."""
    return SafeFileSystemReader(ckpt_dir).read_metadata()


def tensor_metadata(ckpt_dir: str) -> dict[str, TensorStorageMetadata]:
    return {k: v for k, v in read_metadata(ckpt_dir).state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


class _RegionLoadPlanner(LoadPlanner):
    """Reads requested regions of stored tensors into given destination tensors (any stored chunking)."""

    def __init__(self, requests: dict[tuple[str, tuple[int, ...]], torch.Tensor]):
        self._requests = requests

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        self._metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items: list[ReadItem] = []
        self._dest: dict[MetadataIndex, torch.Tensor] = {}
        for (key, offsets), dest in self._requests.items():
            md = self._metadata.state_dict_metadata.get(key)
            if not isinstance(md, TensorStorageMetadata):
                raise KeyError(f"tensor {key!r} is not in the checkpoint")
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            for item in create_read_items_for_chunk_list(key, md, [chunk]):
                self._dest[item.dest_index] = dest
                items.append(item)
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        # create_local_plan requests tensor regions only, so DCP never hands this planner bytes
        raise RuntimeError(f"unexpected bytes item {read_item.dest_index.fqn} in a region read")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        dest = self._dest[read_item.dest_index]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor handed out a view of the destination: the data is already in place


def read_regions(ckpt_dir: str, requests: Sequence[tuple[str, tuple[int, ...], tuple[int, ...], torch.dtype]],
                 ) -> list[torch.Tensor]:
    """Read regions (key, offsets, sizes, dtype) of stored tensors, whatever chunks they were saved in.

    Reads only the bytes it needs (plus the enclosing stored chunks); this process alone, no process group.
    """
    dests = {}
    out = []
    for key, offsets, sizes, dtype in requests:
        t = torch.empty(sizes, dtype=dtype)
        dests[(key, tuple(offsets))] = t
        out.append(t)
    if dests:
        with checkpoint_errors(ckpt_dir):
            dcp.load({}, storage_reader=SafeFileSystemReader(ckpt_dir), planner=_RegionLoadPlanner(dests),
                     no_dist=True)
    return out
