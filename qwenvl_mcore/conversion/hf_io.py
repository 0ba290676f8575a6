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
    header.pop("__metadata__", None)
    out, end = {}, 0
    for name, entry in header.items():
        if entry["dtype"] not in _DTYPES:
            raise HFCheckpointError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}.")
        begin, stop = entry["data_offsets"]
        out[name] = TensorInfo(path.name, _DTYPES[entry["dtype"]], tuple(entry["shape"]), 8 + n + begin, 8 + n + stop)
        end = max(end, stop)
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


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '200KB' / bytes -> bytes (decimal units, as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    units = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    t = text.strip().upper()
    for u, mult in units.items():
        if t.endswith(u) and t[: -len(u)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(u)]) * mult)
    if t.isdigit():
        return int(t)
    raise ValueError(f"max shard size {text!r}: use a number of bytes or a size such as 5GB or 500MB.")


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


def write_shard(path: str, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def write_index(out_dir: str, shards: list[list[str]], total_bytes: int) -> None:
    if len(shards) == 1:
        return
    weight_map = {name: shard_file_name(i, len(shards)) for i, names in enumerate(shards) for name in names}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}, f,
                  indent=2)
