"""Read tensors from an HF directory lazily (one tensor at a time, sharded or not)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


class HFCheckpointError(ValueError):
    """An HF directory that cannot be read; the message names the file."""


class SafetensorsReader:
    """Maps tensor names to their shard; `get(name)` reads that one tensor."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            with open(index) as f:
                self.where = dict(json.load(f)["weight_map"])
        elif (self.dir / "model.safetensors").exists():
            with safe_open(self.dir / "model.safetensors", "pt") as f:
                self.where = {k: "model.safetensors" for k in f.keys()}
        else:
            raise HFCheckpointError(f"{self.dir}: no model.safetensors.index.json nor model.safetensors.")
        for shard in sorted(set(self.where.values())):
            if not (self.dir / shard).exists():
                raise HFCheckpointError(f"{self.dir / shard}: shard listed in the index is missing.")
        self._handles: dict[str, object] = {}

    def names(self) -> list[str]:
        return sorted(self.where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise KeyError(f"tensor {name} is not in {self.dir}")
        shard = self.where[name]
        if shard not in self._handles:
            self._handles[shard] = safe_open(self.dir / shard, "pt")
        return self._handles[shard].get_tensor(name)
