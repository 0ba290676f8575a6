"""Batching of :class:`~qwenvl_mcore.data.sample.Sample` s into the model's :class:`MultimodalInputs`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qwenvl_mcore.data.sample import Sample
from qwenvl_mcore.models.qwen3_vl_moe.model import (
    IGNORE_INDEX,
    MultimodalInputs,
    shift_labels,
)

__all__ = ["DataError", "collate"]


class DataError(ValueError):
    """A sample or batch that cannot be fed to the model as configured (the message says what to change)."""


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [p for p in parts if p is not None]
    return torch.cat(present, dim=0) if present else None


def collate(samples: Sequence[Sample], seq_length: int, pad_token_id: int, *, rows: int | None = None
            ) -> MultimodalInputs:
    """Right-pad ``samples`` to exactly ``seq_length`` tokens and stack them into one micro-batch.

    Contract (b = ``rows`` or ``len(samples)``; rows beyond the samples are all padding, which trains nothing): ``input_ids`` [b, seq_length] long, padded with ``pad_token_id``;
    ``attention_mask`` [b, seq_length] long, 1 on real tokens and 0 on padding; ``labels`` [b, seq_length] long,
    the aligned next-token targets (``shift_labels`` of each unpadded sample: position t holds the target of token
    t + 1, -100 on the last real token) padded with -100. Pixel rows and grids are concatenated along dim 0 in sample
    order (the order the model scatters them in), ``None`` when no sample has that kind of media. ``position_ids``
    stay ``None`` (the model derives them from the ids and grids). A sample longer than ``seq_length`` raises
    :class:`DataError`; nothing is truncated, since cutting through media placeholders would break the sample.
    """
    if not samples and rows is None:
        raise DataError("cannot collate an empty list of samples.")
    if seq_length < 1:
        raise DataError(f"data.seq_length must be >= 1, got {seq_length}.")
    b = len(samples) if rows is None else rows
    if b < len(samples):
        raise DataError(f"{len(samples)} samples do not fit in a micro-batch of {rows} rows.")
    input_ids = torch.full((b, seq_length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((b, seq_length), dtype=torch.long)
    labels = torch.full((b, seq_length), IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = int(sample.input_ids.shape[0])
        if n > seq_length:
            raise DataError(
                f"sample {sample.index} (position {row} in the micro-batch) has {n} tokens, more than "
                f"data.seq_length={seq_length}: raise data.seq_length to at least {n} or make the samples shorter."
            )
        if sample.labels.shape != sample.input_ids.shape:
            raise DataError(
                f"sample {sample.index}: labels {tuple(sample.labels.shape)} and input_ids "
                f"{tuple(sample.input_ids.shape)} differ in shape."
            )
        input_ids[row, :n] = sample.input_ids
        attention_mask[row, :n] = 1
        # Shift before padding, so the last real token's target is -100 rather than the first pad token.
        labels[row, :n] = shift_labels(sample.labels.long().unsqueeze(0))[0]
    return MultimodalInputs(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=_cat([s.pixel_values for s in samples]),
        image_grid_thw=_cat([s.image_grid_thw for s in samples]),
        pixel_values_videos=_cat([s.pixel_values_videos for s in samples]),
        video_grid_thw=_cat([s.video_grid_thw for s in samples]),
        labels=labels,
    )
