"""The ViT once over the images and videos of several micro-batches: which rows of its output belong to which
micro-batch, and one ViT backward per group of micro-batches.

The ViT treats every image and every video frame on its own (attention segments per frame, positions and rotary
angles per grid, mergers per 2x2 block), so encoding the images of several micro-batches in one call gives every
image the features it gets alone; only the sums of a matmul over more rows may round differently. What a call
saves is the host work per ViT forward and backward, which barely depends on the number of patches.

`VisionBatches` splits a step's micro-batches into groups of `group_size` consecutive ones. At the first forward of
a group the ViT encodes all its pixels (per micro-batch: its images, then its videos, as the model's per-micro-batch
path orders them) and the rows are put in visual-token order per micro-batch (images and videos interleaved as their
tokens are, batch-major), so that each micro-batch takes a contiguous slice. While training, each micro-batch gets
its slices (merged and DeepStack) as leaves that require grad, whose `.grad` are views of one zero buffer per output:
the LLM backward of each micro-batch accumulates into it in place. Once every micro-batch of a group has had its
backward (`backward_ready`, polled by the schedule before each forward) or at the end of the step (`backward_all`,
before megatron's `finalize_model_grads`), one ViT backward takes the buffer as the outputs' gradient. With a frozen
ViT and mergers (or without autograd) the outputs need no gradient: the slices are plain tensors and nothing runs
backward.

Everything here is decided on the host from the token ids and the grids (no device reads). A bookkeeping object
lives for one call of the schedule; the model receives a micro-batch's `VisualFeatures` as an argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = ["VisualFeatures", "VisionBatches", "MicroBatchVisual", "visual_layout", "group_count"]


@dataclass
class VisualFeatures:
    """A micro-batch's visual features, its visual tokens in token order (batch-major): merged [n, h] and one
    [n, h] tensor per DeepStack layer."""

    merged: torch.Tensor
    deepstack: list[torch.Tensor]


@dataclass
class MicroBatchVisual:
    """What a micro-batch gives the ViT: its pixels (images, then videos), their grids (host), the number of
    merged tokens, and the order of those tokens (None: the ViT's order is already token order)."""

    pixels: list[torch.Tensor]
    grids: list[torch.Tensor]
    n_tokens: int
    order: torch.Tensor | None  # [n_tokens] int64: token j takes the ViT's row order[j] (rows local to this one)


def visual_layout(batch, *, image_token_id: int, video_token_id: int, merge_size: int) -> MicroBatchVisual | None:
    """The micro-batch's visual inputs, checked against its placeholder tokens (the same errors as the model's
    per-micro-batch path); None when it has neither images nor videos."""
    host_ids = batch.input_ids.cpu()
    image_mask, video_mask = host_ids == image_token_id, host_ids == video_token_id
    pixels, grids, counts = [], [], []
    for px, grid, mask, what in ((batch.pixel_values, batch.image_grid_thw, image_mask, "image"),
                                 (batch.pixel_values_videos, batch.video_grid_thw, video_mask, "video")):
        n_tokens = int(mask.sum())
        if px is None:
            if n_tokens:
                raise ValueError(f"{n_tokens} {what} placeholder tokens but no {what} pixels were given.")
            counts.append(0)
            continue
        if grid is None:
            raise ValueError(f"{what} pixels were given without {what}_grid_thw.")
        grid = grid.cpu()
        if grid.dim() != 2 or grid.shape[1] != 3:
            raise ValueError(f"{what}_grid_thw must be [n, 3] (t, h, w per {what}), got shape {tuple(grid.shape)}.")
        patches = int(grid.prod(dim=1).sum())
        if px.shape[0] != patches:
            raise ValueError(f"{what} pixels have {px.shape[0]} patch rows but {what}_grid_thw={grid.tolist()} "
                             f"needs {patches}: give the pixels and grids the processor made together.")
        n_features = patches // merge_size**2
        if n_features != n_tokens:
            raise ValueError(f"{what} features and placeholder tokens do not match: {n_features} features for "
                             f"{n_tokens} tokens (grid_thw={grid.tolist()}).")
        pixels.append(px)
        grids.append(grid)
        counts.append(n_features)
    if not pixels:
        return None
    order = None
    if all(counts):  # images and videos: put the rows (images, then videos) in token order
        is_image = image_mask[image_mask | video_mask]  # per visual token, batch-major
        order = torch.where(is_image, torch.cumsum(is_image, 0) - 1, counts[0] + torch.cumsum(~is_image, 0) - 1)
    return MicroBatchVisual(pixels, grids, sum(counts), order)


def group_count(microbatches: int, group_size: int) -> int:
    """How many ViT calls a step of `microbatches` makes with `group_size` micro-batches per call (0: all)."""
    size = microbatches if group_size <= 0 else min(group_size, microbatches)
    return -(-microbatches // max(size, 1))


@dataclass
class _Group:
    indices: list[int]
    rows: dict[int, tuple[int, int]] = field(default_factory=dict)  # micro-batch -> rows of the token-ordered output
    outputs: list[torch.Tensor] | None = None  # merged, *deepstack: token-ordered, with the ViT's graph
    grads: list[torch.Tensor] | None = None  # zero buffers shaped like outputs; the leaves' .grad are their views
    leaves: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    arrived: dict[int, int] = field(default_factory=dict)  # micro-batch -> leaves whose gradient has arrived
    ran: bool = False  # forward done
    finished: bool = False  # backward done (or none needed)


class VisionBatches:
    """One schedule call's ViT work over `microbatches`, `group_size` micro-batches per ViT call (0: all of them).

    `features(index, vision)` returns micro-batch `index`'s VisualFeatures (running its group's ViT forward first
    when needed; None without visual inputs); `backward_ready()` runs the ViT backward of every group whose
    micro-batches have all had their backward; `backward_all()` that of every group not yet done (end of the step).
    `grad=False` (forward only) runs the ViT without autograd.
    """

    def __init__(self, microbatches: Sequence, group_size: int, *, image_token_id: int, video_token_id: int,
                 merge_size: int, grad: bool = True):
        self.grad = grad
        self.visual = [visual_layout(mb, image_token_id=image_token_id, video_token_id=video_token_id,
                                     merge_size=merge_size) for mb in microbatches]
        n = len(self.visual)
        size = n if group_size <= 0 else min(group_size, n)
        self.groups = [_Group(list(range(start, min(start + size, n)))) for start in range(0, n, max(size, 1))]
        self._group_of = {i: g for g in self.groups for i in g.indices}
        self.calls = 0  # ViT forwards run (for tests and benchmarks)
        self.peak_alive = 0  # most micro-batches whose ViT graph was kept at once (training/memory.py plans it)

    # -- forward ---------------------------------------------------------------------------------------------------
    def features(self, index: int, vision: torch.nn.Module) -> VisualFeatures | None:
        group = self._group_of[index]
        if not group.ran:
            self._forward(group, vision)
        if index not in group.rows:
            return None
        a, b = group.rows[index]
        if group.grads is None:  # no gradient wanted: plain slices
            return VisualFeatures(group.outputs[0][a:b], [o[a:b] for o in group.outputs[1:]])
        leaves = []
        for out, buf in zip(group.outputs, group.grads):
            leaf = out.detach()[a:b].requires_grad_()
            leaf.grad = buf[a:b]  # the LLM backward accumulates into the group's buffer in place
            leaf.register_post_accumulate_grad_hook(lambda _, i=index, g=group: self._arrived(g, i))
            leaves.append(leaf)
        group.leaves[index] = leaves
        return VisualFeatures(leaves[0], leaves[1:])

    def _forward(self, group: _Group, vision: torch.nn.Module) -> None:
        group.ran = True
        members = [(i, self.visual[i]) for i in group.indices if self.visual[i] is not None]
        if not members:
            group.finished = True
            return
        pixels = [p for _, v in members for p in v.pixels]
        grids = [g for _, v in members for g in v.grids]
        device = next(vision.parameters()).device
        pixels = (pixels[0] if len(pixels) == 1 else torch.cat(pixels)).to(device, non_blocking=True)
        grid = grids[0] if len(grids) == 1 else torch.cat(grids)
        orders, start = [], 0
        for i, v in members:
            group.rows[i] = (start, start + v.n_tokens)
            if v.order is not None:
                orders.append((start, v))
            start += v.n_tokens
        with torch.set_grad_enabled(self.grad and torch.is_grad_enabled()):
            merged, deepstack = vision(pixels, grid)
            outputs = [merged, *deepstack]
            if orders:  # images and videos of a micro-batch interleaved as their tokens are: one gather for all
                perm = torch.arange(start)
                for offset, v in orders:
                    perm[offset:offset + v.n_tokens] = v.order + offset
                perm = perm.to(device, non_blocking=True)
                outputs = [o.index_select(0, perm) for o in outputs]
        self.calls += 1
        group.outputs = outputs
        if merged.requires_grad:
            group.grads = [torch.zeros_like(o) for o in outputs]
            alive = sum(len(g.indices) for g in self.groups if g.ran and not g.finished)
            self.peak_alive = max(self.peak_alive, alive)
        else:
            group.finished = True  # frozen ViT and mergers (or no autograd): nothing to run backward

    # -- backward --------------------------------------------------------------------------------------------------
    def _arrived(self, group: _Group, index: int) -> None:
        group.arrived[index] = group.arrived.get(index, 0) + 1

    def _complete(self, group: _Group) -> bool:
        n = len(group.outputs or ())
        return group.ran and all(group.arrived.get(i, 0) >= n for i in group.leaves) and (
            len(group.leaves) == len(group.rows))

    def backward_ready(self) -> None:
        """The ViT backward of every group whose micro-batches have all had their backward."""
        for group in self.groups:
            if not group.finished and self._complete(group):
                self._backward(group)

    def backward_all(self) -> None:
        """The ViT backward of every group not yet done (the end of the step's backward passes)."""
        for group in self.groups:
            if group.ran and not group.finished:
                self._backward(group)

    def _backward(self, group: _Group) -> None:
        group.finished = True
        for i, leaves in group.leaves.items():
            a, b = group.rows[i]
            for leaf, buf in zip(leaves, group.grads):
                # accumulated in place as set up; should anything have replaced the .grad, take its value
                if leaf.grad is not None and leaf.grad.data_ptr() != buf[a:b].data_ptr():
                    buf[a:b].copy_(leaf.grad)
        outputs, grads = group.outputs, group.grads
        group.outputs = group.grads = None
        group.leaves.clear()
        torch.autograd.backward(outputs, grads)
