"""Sequence packing: several :class:`~qwenvl_mcore.data.sample.Sample` s in one row of a fixed capacity.

Each sample of a packed row is trained as if it were alone: the model attends only within a sample (the row's
``cu_seqlens``), each sample's MRoPE positions start at 0, and labels are shifted per sample, so no token learns to
predict the next sample. Padding is never attended to, never routed to an expert and carries no loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qwenvl_mcore.data.collate import DataError
from qwenvl_mcore.data.sample import Sample
from qwenvl_mcore.models.qwen3_vl_moe.model import IGNORE_INDEX, MultimodalInputs, shift_labels
from qwenvl_mcore.models.qwen3_vl_moe.rope import packed_position_ids

__all__ = ["first_fit", "pack", "rope_token_ids"]


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing bin packing of ``lengths`` into bins of ``capacity`` tokens.

    Items are placed longest first (ties in input order: a stable sort), each into the first bin with room, else
    into a new bin; bins are returned in the order they were opened, each listing indices into ``lengths`` in
    ascending order. Deterministic. A length above ``capacity`` (or negative) raises ``ValueError``: callers drop or
    truncate such samples before packing.
    """
    if capacity < 1:
        raise ValueError(f"packing capacity must be >= 1, got {capacity}.")
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = int(lengths[i])
        if n < 0 or n > capacity:
            raise ValueError(f"item {i} has length {n}, outside [0, capacity={capacity}]: drop or truncate it first.")
        for b, room in enumerate(free):
            if n <= room:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(capacity - n)
    return [sorted(b) for b in bins]


def rope_token_ids(args) -> dict[str, int]:
    """The keyword arguments :func:`pack` needs, from the model's ``Qwen3VLMoeArgs``."""
    return dict(image_token_id=args.image_token_id, video_token_id=args.video_token_id,
                vision_start_token_id=args.vision_start_token_id, spatial_merge_size=args.vision.spatial_merge_size)


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [p for p in parts if p is not None]
    return torch.cat(present, dim=0) if present else None


def pack(samples: Sequence[Sample], capacity: int, pad_token_id: int, *, image_token_id: int, video_token_id: int,
         vision_start_token_id: int, spatial_merge_size: int) -> MultimodalInputs:
    """One packed micro-batch row of exactly ``capacity`` tokens: ``samples`` concatenated in the given order, then
    right padding. No process group is needed.

    Contract (n = ``len(samples)``, T = their total length <= ``capacity``, else :class:`DataError`):
    ``input_ids`` [1, capacity] long, ``pad_token_id`` after T; ``attention_mask`` [1, capacity] long, 1 exactly on
    the first T tokens; ``labels`` [1, capacity] long, each sample's own ``shift_labels`` (its last token's target
    is -100, never the next sample's first token), -100 on padding; ``position_ids`` [3, 1, capacity] long, each
    sample's MRoPE positions as if alone (:func:`~qwenvl_mcore.models.qwen3_vl_moe.rope.packed_position_ids`), 0 on
    padding; ``cu_seqlens`` int32 [n + 1] = 0, len(s0), len(s0) + len(s1), ..., T; pixel rows and grids concatenated
    in sample order (``None`` when no sample has that kind of media). ``pack([])`` is an all-padding row
    (``cu_seqlens`` = [0], no loss tokens) that the model runs at zero loss, for evening out micro-batch counts.
    """
    if capacity < 1:
        raise DataError(f"packing capacity must be >= 1, got {capacity}.")
    total = sum(len(s) for s in samples)
    if total > capacity:
        raise DataError(f"{len(samples)} samples hold {total} tokens, more than the packing capacity {capacity}.")
    input_ids = torch.full((1, capacity), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((1, capacity), dtype=torch.long)
    labels = torch.full((1, capacity), IGNORE_INDEX, dtype=torch.long)
    bounds = [0]
    for sample in samples:
        if sample.labels.shape != sample.input_ids.shape:
            raise DataError(f"sample {sample.index}: labels {tuple(sample.labels.shape)} and input_ids "
                            f"{tuple(sample.input_ids.shape)} differ in shape.")
        start, end = bounds[-1], bounds[-1] + len(sample)
        input_ids[0, start:end] = sample.input_ids
        attention_mask[0, start:end] = 1
        # Shift within the sample, so its last token's target is -100 rather than the next sample's first token.
        labels[0, start:end] = shift_labels(sample.labels.long().unsqueeze(0))[0]
        bounds.append(end)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    image_grid_thw = _cat([s.image_grid_thw for s in samples])
    video_grid_thw = _cat([s.video_grid_thw for s in samples])
    position_ids = packed_position_ids(
        input_ids, cu_seqlens, image_grid_thw, video_grid_thw, image_token_id=image_token_id,
        video_token_id=video_token_id, vision_start_token_id=vision_start_token_id,
        spatial_merge_size=spatial_merge_size,
    )
    return MultimodalInputs(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        pixel_values=_cat([s.pixel_values for s in samples]),
        image_grid_thw=image_grid_thw,
        pixel_values_videos=_cat([s.pixel_values_videos for s in samples]),
        video_grid_thw=video_grid_thw,
        labels=labels,
        cu_seqlens=cu_seqlens,
    )
