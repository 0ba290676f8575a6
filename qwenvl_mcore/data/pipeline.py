"""From a dataset of samples to this rank's micro-batches of one optimizer step, in DataLoader worker processes.

A step's global batch is `data.global_batch_size` dataset entries at a fixed position of the sampler's stream, so the
only state a resume needs is that position (`consumed_samples`). Each data-parallel rank renders its share of the
entries, leaves out the bad ones (counted by reason, with their location), applies the over-long policy, and packs
what is left into bins of `data.seq_length` tokens (first-fit decreasing) or pads it into micro-batches of
`data.micro_batch_size` samples. Ranks can end with different numbers of micro-batches; the trainer agrees on the
largest and fills the others with all-padding micro-batches (:func:`empty_microbatch`), which train nothing.
"""

from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401  (registers its exit handler, which joins workers, before ours)
import re
import signal
import sys
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from qwenvl_mcore.data.collate import DataError, collate
from qwenvl_mcore.data.sample import Sample, SkipSample
from qwenvl_mcore.data.sampler import GlobalBatchSampler, shard_for_rank, split_microbatches
from qwenvl_mcore.models.qwen3_vl_moe.model import IGNORE_INDEX, MultimodalInputs, shift_labels

__all__ = ["OVERLONG_POLICIES", "BatchShape", "RankStep", "StepBatches", "StepLoader", "empty_microbatch",
           "fit_length", "media_spans", "step_loader"]

OVERLONG_POLICIES = ("drop", "truncate_text", "error")


@dataclass(frozen=True)
class BatchShape:
    """How samples become micro-batches, and the token ids that locate vision blocks."""

    seq_length: int  # tokens per packed bin, or per padded sample
    packing: bool
    micro_batch_size: int  # samples per micro-batch without packing (a packed micro-batch is one bin)
    pad_token_id: int
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    spatial_merge_size: int
    overlong: str = "drop"  # drop | truncate_text | error

    def __post_init__(self):
        if self.overlong not in OVERLONG_POLICIES:
            raise DataError(f"data.overlong={self.overlong!r}: choose one of {', '.join(OVERLONG_POLICIES)}.")
        if self.packing and self.micro_batch_size != 1:
            raise DataError(f"data.packing=true packs samples into one sequence of data.seq_length={self.seq_length} "
                            f"tokens per micro-batch: set data.micro_batch_size=1 (got {self.micro_batch_size}).")

    @classmethod
    def of(cls, args, pad_token_id: int, *, seq_length: int, packing: bool, micro_batch_size: int,
           overlong: str = "drop") -> "BatchShape":
        """From the model's Qwen3VLMoeArgs (its token ids) and the data settings."""
        return cls(seq_length, packing, micro_batch_size, pad_token_id, args.image_token_id, args.video_token_id,
                   args.vision_start_token_id, args.vision_end_token_id, args.vision.spatial_merge_size, overlong)


# -- over-long samples ---------------------------------------------------------------------------------------------
_TIMESTAMP = re.compile(r"<\d+(\.\d+)? seconds>\s*$")


def media_spans(sample: Sample, shape: BatchShape, tokenizer=None) -> list[tuple[int, int, str]]:
    """``(start, end, kind)`` token ranges of each image and each whole video of ``sample``, in order.

    An image is its ``<|vision_start|> pads <|vision_end|>`` block. A video is all its frame blocks (``grid_t`` of
    them) with the timestamps between them and, when ``tokenizer`` is given, the ``<t seconds>`` text before its
    first frame, so that cutting before a video's start removes the whole video.
    """
    ids = sample.input_ids.tolist()
    starts = [p for p, t in enumerate(ids) if t == shape.vision_start_token_id]
    video_frames = [] if sample.video_grid_thw is None else [int(g[0]) for g in sample.video_grid_thw]
    spans, frames_left, prev_end = [], 0, 0
    for p in starts:
        try:
            end = ids.index(shape.vision_end_token_id, p) + 1
        except ValueError:
            raise DataError(f"sample {sample.index} ({sample.location}): a vision block without its end token.")
        kind = "video" if p + 1 < len(ids) and ids[p + 1] == shape.video_token_id else "image"
        if kind == "video" and frames_left:  # a later frame of the current video: extend it
            spans[-1] = (spans[-1][0], end, "video")
            frames_left -= 1
        else:
            start = p
            if kind == "video":
                if not video_frames:
                    raise DataError(f"sample {sample.index} ({sample.location}): more video blocks than video grids.")
                frames_left = video_frames.pop(0) - 1
                if tokenizer is not None:
                    for j in range(p - 1, max(prev_end, p - 16) - 1, -1):
                        if _TIMESTAMP.search(tokenizer.decode(ids[j:p])):
                            start = j
                            break
            spans.append((start, end, kind))
        prev_end = end
    return spans


def _truncate(sample: Sample, limit: int, shape: BatchShape, tokenizer) -> Sample:
    """``sample`` cut to at most ``limit`` tokens, never inside an image or video: a block the cut would split is
    removed whole together with everything after it (its pixels and grid rows too)."""
    cut = limit
    spans = media_spans(sample, shape, tokenizer)
    for start, end, _ in spans:
        if start < cut < end:
            cut = start
    kept = [kind for start, end, kind in spans if end <= cut]
    n_img, n_vid = kept.count("image"), kept.count("video")

    def media(pixels, grids, n):
        if grids is None or n == 0:
            return None, None
        rows = int(grids[:n].prod(-1).sum())
        return pixels[:rows], grids[:n]

    pixel_values, image_grid_thw = media(sample.pixel_values, sample.image_grid_thw, n_img)
    pixel_values_videos, video_grid_thw = media(sample.pixel_values_videos, sample.video_grid_thw, n_vid)
    return Sample(input_ids=sample.input_ids[:cut], labels=sample.labels[:cut], pixel_values=pixel_values,
                  image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
                  video_grid_thw=video_grid_thw, index=sample.index, location=sample.location)


def fit_length(sample: Sample, shape: BatchShape, tokenizer=None) -> Sample:
    """Apply `data.overlong` to a sample longer than `data.seq_length` (a shorter one is returned as is).

    drop: :class:`SkipSample` ``too_long``; truncate_text: :func:`_truncate` (``too_long`` when nothing trainable is
    left); error: :class:`DataError` naming the sample and the fixes.
    """
    n = len(sample)
    if n <= shape.seq_length:
        return sample
    what = f"{n} tokens with vision tokens expanded, more than data.seq_length={shape.seq_length}"
    if shape.overlong == "error":
        raise DataError(f"sample {sample.index} at {sample.location}: {what}. Raise data.seq_length, lower the pixel "
                        "budgets (data.image_max_pixels, data.video_max_pixels), or set data.overlong=drop or "
                        "truncate_text.")
    if shape.overlong == "drop":
        raise SkipSample("too_long", what, sample.location)
    cut = _truncate(sample, shape.seq_length, shape, tokenizer)
    if int((shift_labels(cut.labels[None]) != IGNORE_INDEX).sum()) == 0:
        raise SkipSample("too_long", what + "; truncating it leaves nothing to train on", sample.location)
    return cut


# -- one step of one rank ------------------------------------------------------------------------------------------
@dataclass
class RankStep:
    """This data-parallel rank's share of the global batch at stream position ``consumed``."""

    consumed: int
    indices: list[int]  # the dataset entries of this rank (skipped ones included)
    microbatches: list[MultimodalInputs]
    lengths: list[int] = field(default_factory=list)  # tokens of each kept sample
    grids: torch.Tensor | None = None  # [n, 3] image and video grids of the kept samples (for FLOPs)
    skips: list[tuple[str, str, str]] = field(default_factory=list)  # (reason, location, detail)
    truncated: int = 0


def empty_microbatch(shape: BatchShape) -> MultimodalInputs:
    """A micro-batch of padding only (no loss tokens, nothing routed): fills a rank up to the agreed count."""
    return collate([], shape.seq_length, shape.pad_token_id, rows=shape.micro_batch_size)


def microbatches_of(samples: list[Sample], shape: BatchShape) -> list[MultimodalInputs]:
    """Packed bins (first-fit decreasing) or padded groups of micro_batch_size samples, in a fixed order."""
    if not samples:
        return []
    if shape.packing:
        from qwenvl_mcore.data.packing import first_fit, pack

        bins = first_fit([len(s) for s in samples], shape.seq_length)
        return [pack([samples[i] for i in b], shape.seq_length, shape.pad_token_id,
                     image_token_id=shape.image_token_id, video_token_id=shape.video_token_id,
                     vision_start_token_id=shape.vision_start_token_id,
                     spatial_merge_size=shape.spatial_merge_size) for b in bins]
    groups = [samples[i:i + shape.micro_batch_size] for i in range(0, len(samples), shape.micro_batch_size)]
    return [collate(g, shape.seq_length, shape.pad_token_id, rows=shape.micro_batch_size) for g in groups]


class StepBatches(Dataset):
    """``step_batches[consumed]`` -> :class:`RankStep`: the global batch at that stream position, this rank's share
    rendered, filtered, fitted and batched. Deterministic in (dataset, sampler, rank, shape): every rank of a
    model-parallel group computes the same micro-batches, and a resumed run the same as an uninterrupted one."""

    def __init__(self, dataset, sampler: GlobalBatchSampler, shape: BatchShape, *, dp_rank: int, dp_size: int,
                 tokenizer=None):
        self.dataset, self.sampler, self.shape = dataset, sampler, shape
        self.dp_rank, self.dp_size, self.tokenizer = dp_rank, dp_size, tokenizer
        split_microbatches(list(range(sampler.global_batch_size // dp_size)),  # checks the batch arithmetic
                           1 if shape.packing else shape.micro_batch_size)

    def __len__(self) -> int:  # a position, not an index: any consumed count is valid
        raise TypeError("StepBatches is indexed by stream position; it has no length")

    def __getitem__(self, consumed: int) -> RankStep:
        indices = shard_for_rank(self.sampler.global_batch(int(consumed)), self.dp_rank, self.dp_size)
        step = RankStep(consumed=int(consumed), indices=indices, microbatches=[])
        samples = []
        for i in indices:
            item = self.dataset[i]
            try:
                if isinstance(item, SkipSample):
                    raise item
                fitted = fit_length(item, self.shape, self.tokenizer)
            except SkipSample as skip:
                step.skips.append((skip.reason, skip.location, skip.detail))
                continue
            step.truncated += int(fitted is not item)
            samples.append(fitted)
        step.lengths = [len(s) for s in samples]
        grids = [g for s in samples for g in (s.image_grid_thw, s.video_grid_thw) if g is not None]
        step.grids = torch.cat(grids) if grids else None
        step.microbatches = microbatches_of(samples, self.shape)
        return step


class _Positions(Sampler):
    """Stream positions start, start + gbs, start + 2 gbs, ... (endless; the trainer stops reading)."""

    def __init__(self, start: int, global_batch_size: int):
        self.start, self.step = start, global_batch_size

    def __iter__(self) -> Iterator[int]:
        position = self.start
        while True:
            yield position
            position += self.step


def _as_is(item):
    return item


@dataclass
class _Failed:
    """A step whose rendering raised :class:`DataError` (data.strict, data.overlong=error), carried out of the
    worker as a value: re-raised by the loader with its own message, not torch's worker traceback around it."""

    message: str


class _CarryDataErrors(Dataset):
    """``steps[consumed]``, or :class:`_Failed` for a step that raised DataError."""

    def __init__(self, steps: StepBatches):
        self.steps = steps

    def __getitem__(self, consumed: int) -> RankStep | _Failed:
        try:
            return self.steps[consumed]
        except DataError as e:
            return _Failed(str(e))


_INHERITED_SCALERS = []  # see _drop_inherited_scaler: kept alive on purpose, never freed


def _worker_init(_worker_id: int) -> None:
    """In a forked worker: leave stop signals to the trainer, and drop PyAV's inherited video scaler.

    Slurm may send SIGTERM to every process of a job; the trainer checkpoints on it and then shuts its workers down
    itself, while a worker killed by it would make the DataLoader fail the step first. (A worker still exits when
    the trainer process goes away: the DataLoader's watchdog checks its parent.)"""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    _drop_inherited_scaler()


def _drop_inherited_scaler() -> None:
    """Forget the video scaler inherited from the main process. PyAV keeps one swscale context
    per thread, with slice threads of its own; a fork copies the context but not its threads, so the worker's next
    frame conversion (to a new size) joins threads that do not exist and hangs forever. The stale context is kept
    unfreed (freeing it would join them too) and PyAV builds a fresh one in the worker."""
    local = getattr(sys.modules.get("av.video.frame"), "_thread_local", None)
    stale = getattr(local, "reformatter", None)
    if stale is not None:
        _INHERITED_SCALERS.append(stale)
        local.reformatter = None


#: Seconds a closing StepLoader waits for its killed workers to be reaped.
WORKER_REAP_TIMEOUT_S = 10.0

_OPEN_LOADERS: "weakref.WeakSet[StepLoader]" = weakref.WeakSet()


class StepLoader:
    """The RankSteps from a stream position on (an endless iterator), with :meth:`close`, which ends its worker
    processes at once. Close it on every way out (the trainer does, in ``finally``); any loader still open when the
    interpreter exits is closed then, before multiprocessing's own exit handler, which would wait for the workers
    forever: they ignore SIGTERM (:func:`_worker_init`), and an iterator caught in an exception's reference cycle
    is not freed before that handler runs."""

    def __init__(self, loader: DataLoader):
        self._iterator = iter(loader)
        _OPEN_LOADERS.add(self)

    def __iter__(self) -> "StepLoader":
        return self

    def __next__(self) -> RankStep:
        if self._iterator is None:
            raise RuntimeError("StepLoader.__next__ after close()")
        step = next(self._iterator)
        if isinstance(step, _Failed):
            raise DataError(step.message)
        return step

    def __del__(self):  # dropped without close(): still end the workers now rather than leave them to torch
        self.close()

    def worker_pids(self) -> list[int]:
        """The worker processes' ids (none inline or once closed)."""
        return [w.pid for w in getattr(self._iterator, "_workers", None) or ()]

    def close(self, timeout_s: float = WORKER_REAP_TIMEOUT_S) -> None:
        """End the workers (safe to call twice). They are killed (SIGKILL) rather than asked: torch's own shutdown
        waits 5 s for each busy worker (one decoding a long video, or rendering a step past the end of the run) and
        then sends SIGTERM, which they ignore. They only read, so nothing is lost."""
        iterator, self._iterator = getattr(self, "_iterator", None), None
        _OPEN_LOADERS.discard(self)
        if iterator is None:
            return
        workers = list(getattr(iterator, "_workers", None) or ())
        if getattr(iterator, "_worker_pids_set", False):
            # torch's SIGCHLD handler reports a registered worker killed by a signal as a DataLoader failure
            torch._C._remove_worker_pids(id(iterator))
            iterator._worker_pids_set = False
        for w in workers:
            if w.is_alive():
                w.kill()
        deadline = time.monotonic() + timeout_s
        for w in workers:
            w.join(timeout=max(0.0, deadline - time.monotonic()))
        shutdown = getattr(iterator, "_shutdown_workers", None)  # the rest of torch's shutdown: its queues
        if shutdown is not None:
            shutdown()


@atexit.register
def _close_open_loaders() -> None:
    # Exit handlers run last-registered first: this one before multiprocessing's (imported above).
    for loader in list(_OPEN_LOADERS):
        loader.close()


def step_loader(steps: StepBatches, start: int, *, num_workers: int = 0, prefetch: int = 2) -> StepLoader:
    """The RankSteps from stream position ``start`` on, rendered ahead in ``num_workers`` worker processes (0: in
    this process). Worker processes decode media while the model trains; the order never depends on them. Close
    the returned :class:`StepLoader` when done."""
    loader = DataLoader(_CarryDataErrors(steps), batch_size=None,
                        sampler=_Positions(start, steps.sampler.global_batch_size),
                        num_workers=num_workers, prefetch_factor=prefetch if num_workers else None,
                        # No pin-memory thread: torch pins tensors, mappings and sequences and passes a RankStep (a
                        # dataclass) through untouched, and StepLoader.close kills workers, which could leave that
                        # thread reading half a message. The trainer moves batches to the device itself.
                        collate_fn=_as_is, pin_memory=False, persistent_workers=False,
                        worker_init_fn=_worker_init if num_workers else None)
    return StepLoader(loader)
