"""Interim data package: an exact, resumable global-batch sampler, a deterministic synthetic multimodal SFT dataset
and the collate function that turns its samples into model micro-batches."""

from __future__ import annotations

from qwenvl_mcore.data.collate import DataError, collate
from qwenvl_mcore.data.sampler import (
    GlobalBatchSampler,
    shard_for_rank,
    split_microbatches,
)
from qwenvl_mcore.data.sample import SKIP_REASONS, Sample, SkipSample
from qwenvl_mcore.data.synthetic import SYNTHETIC_KINDS, SyntheticConversations

__all__ = [
    "SKIP_REASONS",
    "SYNTHETIC_KINDS",
    "DataError",
    "GlobalBatchSampler",
    "Sample",
    "SkipSample",
    "SyntheticConversations",
    "collate",
    "shard_for_rank",
    "split_microbatches",
]
