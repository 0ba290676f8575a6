"""What every data source produces: a rendered :class:`Sample`, or a :class:`SkipSample` naming why not.

Shared by the formats, the renderer, packing, the datasets and the trainer, so that a skip reason means the same
everywhere and is counted under one name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SKIP_REASONS", "Sample", "SkipSample"]

#: Why a sample can be left out of training. Every skip is counted under exactly one of these names.
SKIP_REASONS = (
    "bad_json",  # a line of a JSONL file that is not a JSON object
    "bad_record",  # a record without a usable conversation (no messages, unknown role, empty content, ...)
    "media_mismatch",  # the number of <image>/<video> tags (or media items) differs from the media given
    "missing_media",  # a media file that does not exist (or an empty bytes field)
    "corrupt_image",  # an image that cannot be decoded
    "corrupt_video",  # a video that cannot be decoded, has no frames, or is truncated
    "too_long",  # longer than data.seq_length after the vision tokens are expanded (data.overlong=drop)
    "no_labels",  # nothing left to train on (no assistant turn, or truncation removed every trained token)
    "processor_error",  # the chat template or the processor refused the sample (e.g. an image with an aspect ratio
    #                     above 200); the detail keeps its exception and message
)


class SkipSample(Exception):
    """A sample that cannot be trained on: ``reason`` (one of :data:`SKIP_REASONS`), a human ``detail`` and where
    it came from (``location``: ``file:line`` for JSONL, ``file:row`` for parquet; filled in by the dataset)."""

    def __init__(self, reason: str, detail: str, location: str = ""):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.location = reason, detail, location

    def at(self, location: str) -> "SkipSample":
        """This skip with its location set (kept when already known)."""
        if not self.location:
            self.location = location
        return self

    def __str__(self) -> str:
        where = f" at {self.location}" if self.location else ""
        return f"{self.reason}{where}: {self.detail}"

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (SkipSample, (self.reason, self.detail, self.location))


@dataclass
class Sample:
    """One rendered conversation.

    ``labels`` follow the transformers convention (not yet shifted): ``labels[t] = input_ids[t]`` on the trained
    tokens (assistant answers and their ``<|im_end|>``) and -100 everywhere else. Pixel tensors are the processor's
    (float32 patch rows); grids are ``[n, 3]`` (t, h, w in patches). ``location`` says where the sample came from
    (``file:line``), for logs and ``tools/data/inspect.py``.
    """

    input_ids: torch.Tensor  # [s] long
    labels: torch.Tensor  # [s] long
    pixel_values: torch.Tensor | None = None  # [image_grid_thw.prod(-1).sum(), patch_dim]
    image_grid_thw: torch.Tensor | None = None  # [n_images, 3]
    pixel_values_videos: torch.Tensor | None = None  # [video_grid_thw.prod(-1).sum(), patch_dim]
    video_grid_thw: torch.Tensor | None = None  # [n_videos, 3]
    index: int = -1  # dataset index it came from
    location: str = ""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != -100).sum())
