"""Read HF safetensors directories lazily: headers first (names, shapes, dtypes, integrity), then one tensor at a
time. Write sharded safetensors with an index, as transformers does."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class HFCheckpointError(ValueError):
    """An HF directory that cannot be read; the message names the file and the problem."""


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int = 0  # byte offsets of the data in the file
    end: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _tensor_info(path: Path, name: str, entry, data_start: int) -> TensorInfo:
    """One header entry, checked: a known dtype, a shape of non-negative ints, and data_offsets spanning exactly
    the bytes that dtype and shape take (anything else would be read as another tensor's bytes, or fail later)."""
    def bad(why: str) -> HFCheckpointError:
        return HFCheckpointError(f"{path}: corrupt safetensors header: tensor {name} {why}. Copy or download the "
                                 "file again.")

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise bad("lacks dtype, shape or data_offsets")
    if entry["dtype"] not in _DTYPES:
        raise HFCheckpointError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}.")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"has shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"has data_offsets {offsets!r}")
    dtype = _DTYPES[entry["dtype"]]
    need = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != need:
        raise bad(f"has data_offsets {offsets} ({offsets[1] - offsets[0]} bytes) while its shape {shape} of "
                  f"{entry['dtype']} takes {need} bytes")
    return TensorInfo(path.name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor infos of one safetensors file, after checking that the file holds all the bytes its header names."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise HFCheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes).")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise HFCheckpointError(f"{path}: truncated or corrupt (header of {n} bytes in a {size}-byte file).")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise HFCheckpointError(f"{path}: corrupt safetensors header ({e}).") from None
    if not isinstance(header, dict):
        raise HFCheckpointError(f"{path}: corrupt safetensors header (not a JSON object).")
    header.pop("__metadata__", None)
    out, end = {}, 0
    for name, entry in header.items():
        out[name] = info = _tensor_info(path, name, entry, 8 + n)
        end = max(end, info.end - 8 - n)
    if 8 + n + end > size:
        raise HFCheckpointError(
            f"{path}: truncated: its header needs {8 + n + end} bytes, the file has {size}. Copy or download it again.")
    return out


def scan_hf_dir(hf_dir: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of an HF directory (sharded with an index, or one model.safetensors) from the headers only.

    Raises HFCheckpointError for a missing directory, index or shard, a truncated or corrupt shard, or an index
    that disagrees with the shards."""
    d = Path(hf_dir)
    if not d.is_dir():
        raise HFCheckpointError(f"{d}: no such directory.")
    index = d / INDEX_FILE
    if index.exists():
        with open(index) as f:
            where = dict(json.load(f)["weight_map"])
    elif (d / SINGLE_FILE).exists():
        where = None
    else:
        raise HFCheckpointError(f"{d}: neither {INDEX_FILE} nor {SINGLE_FILE} (only safetensors checkpoints are read).")
    files = sorted(set(where.values())) if where is not None else [SINGLE_FILE]
    missing = [f for f in files if not (d / f).exists()]
    if missing:
        raise HFCheckpointError(f"{d}: {len(missing)} shard(s) listed in {INDEX_FILE} are missing: {missing}.")
    infos: dict[str, TensorInfo] = {}
    for f in files:
        infos.update(read_safetensors_header(d / f))
    if where is not None:
        wrong = sorted(n for n, f in where.items() if n not in infos or infos[n].file != f)
        if wrong:
            raise HFCheckpointError(f"{d}: {len(wrong)} tensors of {INDEX_FILE} are not in the shard it names: "
                                    f"{wrong[:10]}.")
    return infos


class SafetensorsReader:
    """Reads one tensor at a time from an HF directory into memory of its own.

    Plain reads at the header's offsets rather than a memory map: mapped pages would count towards the process's
    resident memory for as long as the file stays open, while this way only the returned tensor does."""

    def __init__(self, hf_dir: str | Path, infos: dict[str, TensorInfo] | None = None):
        self.dir = Path(hf_dir)
        self.infos = scan_hf_dir(self.dir) if infos is None else infos

    def names(self) -> list[str]:
        return sorted(self.infos)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.infos:
            raise KeyError(f"tensor {name} is not in {self.dir}")
        info = self.infos[name]
        buf = torch.empty(info.end - info.start, dtype=torch.uint8)
        with open(self.dir / info.file, "rb") as f:
            f.seek(info.start)
            if f.readinto(memoryview(buf.numpy())) != buf.numel():
                raise HFCheckpointError(f"{self.dir / info.file}: truncated while reading {name}.")
        return buf.view(info.dtype).reshape(info.shape)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor's first dimension, reading only their bytes (contiguous in the file)."""
        if name not in self.infos:
            raise KeyError(f"tensor {name} is not in {self.dir}")
        info = self.infos[name]
        if not 0 <= start <= stop <= info.shape[0]:
            raise ValueError(f"rows [{start}, {stop}) of {name} {list(info.shape)}")
        row = math.prod(info.shape[1:]) * info.dtype.itemsize
        buf = torch.empty((stop - start) * row, dtype=torch.uint8)
        with open(self.dir / info.file, "rb") as f:
            f.seek(info.start + start * row)
            if f.readinto(memoryview(buf.numpy())) != buf.numel():
                raise HFCheckpointError(f"{self.dir / info.file}: truncated while reading {name}.")
        return buf.view(info.dtype).reshape((stop - start, *info.shape[1:]))


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '200KB' (decimal) / '5GiB' / '500MiB' (binary) / bytes -> a positive number of bytes,
    the units transformers' max_shard_size takes; ValueError naming the accepted forms otherwise."""
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10,
             "TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    value = None
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    elif isinstance(text, str):
        t = text.strip().upper()
        if t.isdigit():
            value = int(t)
        for u, mult in units.items():
            number = t[: -len(u)].strip()
            if value is None and t.endswith(u) and number.replace(".", "", 1).isdigit():
                value = int(float(number) * mult)
                break
    if value is None or value <= 0:
        raise ValueError(f"max shard size {text!r}: use a positive number of bytes or a size such as 5GB, 500MB "
                         "or 4GiB.")
    return value


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Split names (in order) into consecutive shards of at most `max_bytes` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes:
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return [s for s in shards if s]


def shard_file_name(i: int, n: int) -> str:
    return SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_shard(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """One safetensors file, with the mode any file the user creates gets (safetensors itself makes it 0600)."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~_umask())


def write_index(out_dir: str, shards: list[list[str]], total_bytes: int) -> None:
    if len(shards) == 1:
        return
    weight_map = {name: shard_file_name(i, len(shards)) for i, names in enumerate(shards) for name in names}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}, f,
                  indent=2)
