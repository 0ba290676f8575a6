"""Where a rank's slice of the sequence holds visual tokens, and which visual feature goes to each.

A module of its own, importing nothing of the package: the decoder (language.py, DeepStack), the model's embedding
scatter and parallel/context_parallel.py all place features with it, without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VisualScatter:
    """Where this rank's slice of the sequence holds visual tokens, and which feature row goes to each.

    `positions` [n_local] are the visual tokens of this rank's slice as rows of the flattened [s_local * b]
    hidden states, `feature_rows` [n_local] the index of each one's feature in the visual features (ordered as
    transformers orders them: batch-major, then position). Built once per forward from the full [b, s] mask,
    on the host when the mask is there, so placing the features never waits for the GPU (no boolean indexing,
    whose result size the host must read back); under sequence parallelism each rank keeps its own slice, so no
    rank ever gathers the whole sequence of hidden states.
    """

    positions: torch.Tensor
    feature_rows: torch.Tensor

    @classmethod
    def from_mask(cls, visual_mask: torch.Tensor, *, sp_rank: int = 0, sp_size: int = 1,
                  device: torch.device | None = None) -> "VisualScatter":
        b, s = visual_mask.shape
        chunk = s // sp_size
        local = slice(sp_rank * chunk, (sp_rank + 1) * chunk)
        order = torch.cumsum(visual_mask.reshape(-1).long(), 0).reshape(b, s) - 1
        positions = visual_mask.transpose(0, 1)[local].reshape(-1).nonzero().squeeze(1)  # rows of [s_local * b]
        feature_rows = order.transpose(0, 1)[local].reshape(-1)[positions]
        device = visual_mask.device if device is None else device
        return cls(positions.to(device, non_blocking=True), feature_rows.to(device, non_blocking=True))

    def _local(self, hidden: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return hidden.reshape(-1, hidden.shape[-1]), features.index_select(0, self.feature_rows).to(hidden.dtype)

    def replace(self, hidden: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """hidden [s_local, b, h] with the visual positions replaced by their features."""
        flat, local = self._local(hidden, features)
        return flat.index_copy(0, self.positions, local).view(hidden.shape)

    def add(self, hidden: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """hidden [s_local, b, h] plus the features at the visual positions (DeepStack)."""
        flat, local = self._local(hidden, features)
        return flat.index_add(0, self.positions, local).view(hidden.shape)
