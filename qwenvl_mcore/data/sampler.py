"""Exact, resumable order of global batches.

The sampler walks one endless stream of dataset indices, ``epoch_order(0) + epoch_order(1) + ...``, and a global
batch is the next ``global_batch_size`` entries of it. The only state needed to resume is ``consumed_samples`` (an
int: the number of stream entries handed out so far, over all data-parallel ranks); save it with the checkpoint and
the resumed run sees exactly the batches an uninterrupted run would have seen. Nothing here talks to
``torch.distributed``: every rank computes the same global batch and takes its own slice (:func:`shard_for_rank`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

__all__ = ["GlobalBatchSampler", "shard_for_rank", "split_microbatches"]


@lru_cache(maxsize=4)
def _permutation(num_samples: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The order of one epoch (cached: a step needs one or two epochs, recomputing a large randperm each step is
    wasteful). The returned tensor is shared, callers must not modify it."""
    if not shuffle:
        return torch.arange(num_samples)
    # SeedSequence mixes (seed, epoch) into a well-spread 64-bit state, so that no two (seed, epoch) pairs collide
    # the way a linear combination like seed * K + epoch would; it is the same on every platform and version.
    state = int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]) & ((1 << 63) - 1)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(state)
    return torch.randperm(num_samples, generator=generator)


@dataclass(frozen=True)
class GlobalBatchSampler:
    """Global batches of dataset indices in a fixed order that depends only on (num_samples, seed, shuffle).

    Epoch ``e`` is a permutation of ``range(num_samples)`` (``torch.randperm`` seeded from ``(seed, e)``; the identity
    without shuffling). Global batches are consecutive windows of the concatenated epochs, so a batch may straddle an
    epoch boundary and every index appears exactly once per epoch. Resuming needs only ``consumed_samples``.
    """

    num_samples: int
    global_batch_size: int
    seed: int
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"data.num_samples must be >= 1, got {self.num_samples}.")
        if self.global_batch_size < 1:
            raise ValueError(f"data.global_batch_size must be >= 1, got {self.global_batch_size}.")
        if self.seed < 0:
            raise ValueError(f"data.seed must be >= 0, got {self.seed}.")

    def epoch_order(self, epoch: int) -> list[int]:
        """The dataset indices of epoch ``epoch`` in the order they are consumed (a permutation of the dataset)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}.")
        return _permutation(self.num_samples, self.seed, epoch, self.shuffle).tolist()

    def global_batch(self, consumed_samples: int) -> list[int]:
        """The ``global_batch_size`` indices at stream positions ``[consumed_samples, consumed_samples + gbs)``."""
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}.")
        out: list[int] = []
        position, end = consumed_samples, consumed_samples + self.global_batch_size
        while position < end:  # one pass per epoch the window touches (more than two only if gbs > num_samples)
            epoch, offset = divmod(position, self.num_samples)
            take = min(end - position, self.num_samples - offset)
            order = _permutation(self.num_samples, self.seed, epoch, self.shuffle)
            out.extend(order[offset : offset + take].tolist())
            position += take
        return out

    def epoch(self, consumed_samples: int) -> int:
        """The epoch that stream position ``consumed_samples`` (the next sample to be consumed) belongs to."""
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}.")
        return consumed_samples // self.num_samples


def shard_for_rank(indices: list[int], dp_rank: int, dp_size: int) -> list[int]:
    """Data-parallel rank ``dp_rank``'s contiguous share ``indices[r*n/dp : (r+1)*n/dp]`` of a global batch.

    Concatenating the shares of ranks ``0..dp_size-1`` gives ``indices`` back. ``len(indices)`` must be divisible by
    ``dp_size`` (every rank runs the same number of micro-batches).
    """
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}.")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}.")
    if len(indices) % dp_size:
        raise ValueError(
            f"a global batch of {len(indices)} samples cannot be split evenly over {dp_size} data-parallel ranks: "
            f"make data.global_batch_size a multiple of the data-parallel size."
        )
    per_rank = len(indices) // dp_size
    return list(indices[dp_rank * per_rank : (dp_rank + 1) * per_rank])


def split_microbatches(indices: list[int], micro_batch_size: int) -> list[list[int]]:
    """Consecutive chunks of ``micro_batch_size`` indices; ``len(indices)`` must be divisible by it."""
    if micro_batch_size < 1:
        raise ValueError(f"data.micro_batch_size must be >= 1, got {micro_batch_size}.")
    if len(indices) % micro_batch_size:
        raise ValueError(
            f"{len(indices)} samples cannot be split into micro-batches of data.micro_batch_size={micro_batch_size}."
        )
    return [list(indices[i : i + micro_batch_size]) for i in range(0, len(indices), micro_batch_size)]
