"""Context parallelism (parallel.cp): packed rows split over the CP ranks, attention across them.

How a row is split (`RowSplit`)
-------------------------------
A packed row holds samples (boundaries `cu_seqlens`) followed by padding. Each sample of L tokens is cut into 2*cp
chunks and CP rank r holds chunks r and 2*cp-1-r (causal load balancing: an early chunk, cheap to attend from, with
a late, expensive one). Chunks are *uneven* rather than padded: the sample is first cut into cp pairs of L // cp or
L // cp + 1 tokens (the + 1s go to the ranks holding the fewest tokens so far, so the ranks stay within one token
of each other over the row), each pair into a front chunk (pair // 2 tokens) and a back chunk (the rest); chunks of
a sample differ by at most one token, and a sample shorter than 2*cp simply has empty chunks. The row's padding
then fills every rank up to the same local length n = roundup(ceil(s / cp), multiple) (multiple = tp under
sequence parallelism), padding tokens attending only to themselves. So no sample is padded, the split row's
length cp * n depends only on the row length s (megatron's pipeline needs one shape for every micro-batch), and a
rank's slice is: for every sample its front chunk then its back chunk, then its padding.

Everything per token (ids, labels, MRoPE position ids computed for the *whole* row first, masks, visual
placements) is taken from the full row through one index, `RowSplit.source` (the original position of every slot
of the split row, rank-major; -1 for the few padding slots added to reach cp * n).

Attention (`ContextParallelAttention`, `AllGatherKV`)
-----------------------------------------------------
Each rank all-gathers K and V of the whole row over the CP group (backward: reduce-scatter of dK, dV) and attends
from its own queries: each of its chunks is a block of queries whose keys are the sample's chunks 0..k (gathered
by index), causal aligned to the bottom right (the chunk's own keys are the last ones). Attention stays inside each
sample and is causal by original positions. All-gather rather than a ring exchange: it is exact, one collective per
layer each way with no online-softmax merging or per-step kernel launches, it works the same for any number of
samples of any length per row (a ring must cut every step by sample boundaries), and its cost, K/V of the whole row
on every rank ((cp - 1) / cp of the row's K/V received), is small next to the activations for GQA models
(Qwen3-VL: 4 KV heads against 32 query heads). A ring would overlap that communication with compute and keep
only 1/cp of K/V per step: worth it for very long rows at large cp, not for ours.

The ViT (`spread_vision`): each CP rank encodes a consecutive share of the frames of the micro-batch's images and
videos (about equal patch counts; a video may be cut between frames, which the ViT attends to separately), and
the features (merged and DeepStack, one exchange) are all-gathered over the CP group; every rank then places the
features of the visual tokens of its own slice. Backward: the features' gradient summed over the CP group, each
rank keeping its share's rows; the ViT's parameter gradients of the ranks are summed by the data-parallel gradient
reduction, which spans DP x CP.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def layout_problem(cp: int) -> str | None:
    """Why a layout with this context-parallel size cannot run, naming the fix; None when it can."""
    return None


# ------------------------------------------------------------------------------------------------------------------
# The split of a row (pure functions, host side)
# ------------------------------------------------------------------------------------------------------------------


def local_length(s: int, cp: int, multiple: int = 1) -> int:
    """Tokens per CP rank for a row of s tokens: ceil(s / cp) rounded up to `multiple` (tp under SP)."""
    n = -(-s // cp)
    return -(-n // multiple) * multiple


def split_length(s: int, cp: int, multiple: int = 1) -> int:
    """Length of the split row (all CP ranks together), the sequence length megatron's pipeline sees."""
    return cp * local_length(s, cp, multiple)


def sample_chunks(length: int, cp: int, held: list[int]) -> list[tuple[int, int]]:
    """Cut one sample of `length` tokens into 2*cp chunks: (start, size) within the sample, in sample order.

    `held` (tokens each rank holds so far) decides which ranks get the remainder's extra token; it is updated."""
    q, rem = divmod(length, cp)
    extra = sorted(range(cp), key=lambda r: (held[r], r))[:rem]
    pairs = [q + (r in extra) for r in range(cp)]
    sizes = [pairs[r] // 2 for r in range(cp)] + [pairs[r] - pairs[r] // 2 for r in reversed(range(cp))]
    for r in range(cp):
        held[r] += pairs[r]
    out, start = [], 0
    for size in sizes:
        out.append((start, size))
        start += size
    return out


def chunk_owner(k: int, cp: int) -> int:
    """The CP rank holding chunk k (0 <= k < 2*cp) of every sample."""
    return k if k < cp else 2 * cp - 1 - k


@dataclass(eq=False)
class RowSplit:
    """How one packed row of s tokens is split over cp ranks (see the module docstring).

    `source` [cp * n] long: original row position of every slot of the split row (rank r holds slots
    r*n .. (r+1)*n - 1), -1 for added padding; `chunks`: (start, its 2*cp chunks as (offset, size)) per sample.
    `blocks(r)`: rank r's attention blocks, (query start in its slice, query length, key slots in the split row)
    in slice order; padding slots are blocks of one query and itself.
    """

    s: int
    cp: int
    n: int
    source: torch.Tensor
    chunks: list[tuple[int, list[tuple[int, int]]]]
    where: torch.Tensor  # [s]: the slot of every original position
    _device_cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, cu_seqlens, s: int, cp: int, multiple: int = 1) -> "RowSplit":
        cu = [int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)]
        if not cu or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])) or cu[-1] > s:
            raise ValueError(f"cu_seqlens must rise from 0 to at most {s}, got {cu}")
        n = local_length(s, cp, multiple)
        held = [0] * cp
        slots: list[list[int]] = [[] for _ in range(cp)]
        layout = []  # (sample start, chunks)
        for a, b in zip(cu[:-1], cu[1:]):
            if b > a:
                layout.append((a, sample_chunks(b - a, cp, held)))
        for start, chunks in layout:
            for r in range(cp):
                for k in (r, 2 * cp - 1 - r):
                    c0, size = chunks[k]
                    slots[r].extend(range(start + c0, start + c0 + size))
        if max(len(x) for x in slots) > n:  # cannot happen: ranks are within one token of ceil(real / cp)
            raise AssertionError(f"context-parallel split overflow: {[len(x) for x in slots]} > {n}")
        pad = list(range(cu[-1], s))
        for r in range(cp):
            need = n - len(slots[r])
            take, pad = pad[:need], pad[need:]
            slots[r].extend(take + [-1] * (need - len(take)))
        source = torch.tensor([x for r in range(cp) for x in slots[r]], dtype=torch.long)
        # slot of every original position
        where = torch.full((s,), -1, dtype=torch.long)
        real = source >= 0
        where[source[real]] = torch.arange(cp * n)[real]
        return cls(s=s, cp=cp, n=n, source=source, chunks=layout, where=where)

    def blocks(self, rank: int) -> list[tuple[int, int, torch.Tensor]]:
        """Rank `rank`'s attention blocks (see the class docstring); key slots as a long tensor."""
        cp, n, out = self.cp, self.n, []
        for start, chunks in self.chunks:
            for k in (rank, 2 * cp - 1 - rank):
                c0, size = chunks[k]
                if size:
                    keys = self.where[start: start + c0 + size]  # the sample's chunks 0..k, in order
                    out.append((int(self.where[start + c0]) - rank * n, size, keys))
        covered = sum(size for _, size, _ in out)
        pad = torch.arange(rank * n + covered, rank * n + n)
        out.extend((covered + i, 1, pad[i:i + 1]) for i in range(n - covered))
        return out

    @property
    def length(self) -> int:
        return self.cp * self.n

    def local_source(self, rank: int) -> torch.Tensor:
        return self.source[rank * self.n:(rank + 1) * self.n]

    def take(self, t: torch.Tensor, rank: int, *, dim: int, fill) -> torch.Tensor:
        """Rank `rank`'s slice of a full-row tensor `t` (the row along `dim`); added padding slots get `fill`."""
        src = self.local_source(rank).to(t.device)
        out = t.index_select(dim, src.clamp_min(0))
        if bool((src < 0).any()):
            shape = [1] * t.dim()
            shape[dim] = src.numel()
            out = out.masked_fill((src < 0).view(shape), fill)
        return out

    def unsplit(self, split_row: torch.Tensor, *, dim: int) -> torch.Tensor:
        """The split row (all ranks' slices in rank order along `dim`) back in original order: [.., s, ..]."""
        return split_row.index_select(dim, self.where.to(split_row.device))

    def attention(self, rank: int, group, device=None) -> "ContextParallelAttention":
        key = (rank, str(device))
        if key not in self._device_cache:
            self._device_cache[key] = ContextParallelAttention.from_blocks(self.blocks(rank), self.n, group, device)
        return self._device_cache[key]


def local_token_count(labels: torch.Tensor, cu_seqlens, cp: int, rank: int, ignore_index: int = -100) -> int:
    """Loss tokens (labels != ignore_index) of a packed row [1, s] that CP rank `rank` holds."""
    split = RowSplit.build(cu_seqlens, labels.shape[-1], cp)
    src = split.local_source(rank)
    src = src[src >= 0]
    return int((labels.reshape(-1).cpu()[src] != ignore_index).sum())


# ------------------------------------------------------------------------------------------------------------------
# Collectives
# ------------------------------------------------------------------------------------------------------------------


class AllGatherKV(torch.autograd.Function):
    """All-gather along dim 0 over `group` (rank order); backward: reduce-scatter of the gradient (sum)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group):
        import torch.distributed as dist

        ctx.group = group
        world = dist.get_world_size(group)
        t = t.contiguous()
        out = t.new_empty((world * t.shape[0], *t.shape[1:]))
        dist.all_gather_into_tensor(out, t, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        world = dist.get_world_size(ctx.group)
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad, group=ctx.group)
        return out, None


class GatherRow(torch.autograd.Function):
    """All-gather along dim 0 over `group` for a result every rank then uses whole (e.g. inference logits);
    backward: each rank keeps the gradient of its own slice (the one copy of the loss' gradient)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group):
        import torch.distributed as dist

        ctx.rank, ctx.n = dist.get_rank(group), t.shape[0]
        return AllGatherKV.forward(ctx, t, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


# ------------------------------------------------------------------------------------------------------------------
# Attention over a split row
# ------------------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class ContextParallelAttention:
    """This rank's attention over a split row; travels where megatron passes the attention mask (see
    attention.SDPAttention, which calls `attend`).

    `key_rows` [K]: the slots of the gathered split row each block's keys come from, blocks concatenated;
    `groups`: (query length, key length, number of blocks, query rows [m*ql], packed key rows [m*kl]) of blocks
    with the same lengths, each one batched SDPA call with a bottom-right causal mask."""

    n: int
    group: object
    key_rows: torch.Tensor
    groups: list
    masks: dict

    @classmethod
    def from_blocks(cls, blocks, n: int, group, device=None) -> "ContextParallelAttention":
        key_rows, by_len, offset = [], {}, 0
        for q0, ql, keys in blocks:
            by_len.setdefault((ql, len(keys)), []).append((q0, offset))
            key_rows.append(keys)
            offset += len(keys)
        groups, masks = [], {}
        for (ql, kl), items in by_len.items():
            q_rows = torch.tensor([q0 for q0, _ in items])[:, None] + torch.arange(ql)
            k_rows = torch.tensor([k0 for _, k0 in items])[:, None] + torch.arange(kl)
            groups.append((ql, kl, len(items), q_rows.reshape(-1).to(device), k_rows.reshape(-1).to(device)))
            if ql > 1:  # query i sees keys j <= kl - ql + i (one query seeing only its own key needs no mask)
                masks[(ql, kl)] = (torch.arange(kl)[None, :] <= (kl - ql) + torch.arange(ql)[:, None]).to(device)
        rows = torch.cat(key_rows) if key_rows else torch.zeros(0, dtype=torch.long)
        return cls(n, group, rows.to(device), groups, masks)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """q [n, hq, d], k/v [n, hkv, d] of this rank's slice -> [n, hq, d]."""
        import torch.nn.functional as F

        if q.shape[0] != self.n:
            raise ValueError(f"context-parallel attention over {self.n} local tokens got {q.shape[0]}")
        hkv = k.shape[1]
        kv = AllGatherKV.apply(torch.cat((k, v), dim=1), self.group)  # one collective for both
        return self.attend_gathered(q, kv[:, :hkv], kv[:, hkv:], scale)

    def attend_gathered(self, q: torch.Tensor, k_row: torch.Tensor, v_row: torch.Tensor,
                        scale: float | None = None) -> torch.Tensor:
        """q [n, hq, d] of this rank's slice over k/v [cp*n, hkv, d] of the whole split row -> [n, hq, d]."""
        import torch.nn.functional as F

        rows = self.key_rows.to(k_row.device)
        k_all, v_all = k_row.index_select(0, rows), v_row.index_select(0, rows)
        out = q.new_empty(q.shape)
        for ql, kl, m, q_rows, k_rows in self.groups:
            q_rows, k_rows = q_rows.to(q.device), k_rows.to(q.device)

            def blocks(t, rows, length):  # [m*length, h, d] -> [m, h, length, d]
                return t.index_select(0, rows).view(m, length, t.shape[1], t.shape[2]).transpose(1, 2)

            mask = self.masks.get((ql, kl))
            o = F.scaled_dot_product_attention(
                blocks(q, q_rows, ql), blocks(k_all, k_rows, kl), blocks(v_all, k_rows, kl),
                attn_mask=None if mask is None else mask.to(q.device), scale=scale, enable_gqa=True)
            out = out.index_copy(0, q_rows, o.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2]))
        return out


# ------------------------------------------------------------------------------------------------------------------
# What the model takes from here
# ------------------------------------------------------------------------------------------------------------------


def as_packed_row(batch):
    """A micro-batch the CP split can take: a packed row (cu_seqlens set), or one unpacked row whose real tokens
    come first (right padding), seen as a packed row of one sample. Anything else is refused, naming the fix."""
    from dataclasses import replace

    b, s = batch.input_ids.shape
    if b != 1:
        raise ValueError(f"context parallelism (parallel.cp > 1) splits one packed row per micro-batch; got a "
                         f"micro-batch of {b} rows: enable data.packing or use micro-batches of one row.")
    if batch.cu_seqlens is not None:
        return batch
    if batch.attention_mask is None:
        n = s
    else:
        mask = batch.attention_mask.reshape(-1).bool().cpu()
        n = int(mask.sum())
        if not bool(mask[:n].all()):
            raise ValueError("context parallelism needs right padding (real tokens first) in an unpacked row.")
    return replace(batch, cu_seqlens=torch.tensor([0, n], dtype=torch.int32))


def local_inputs(batch, split: RowSplit, rank: int, *, pad_token_id: int = 0, ignore_index: int = -100):
    """This rank's slice of the per-token tensors of a full packed row: (input_ids, attention_mask, labels), each
    [1, n]; added padding slots are padding (attention_mask 0, label ignored)."""
    ids = split.take(batch.input_ids, rank, dim=1, fill=pad_token_id)
    mask = split.take(batch.attention_mask, rank, dim=1, fill=0)
    labels = None if batch.labels is None else split.take(batch.labels, rank, dim=1, fill=ignore_index)
    return ids, mask, labels


def visual_scatter(visual_mask: torch.Tensor, split: RowSplit, rank: int, *, sp_rank: int = 0, sp_size: int = 1,
                   device=None):
    """language.VisualScatter of this rank's (and sequence-parallel rank's) slice: where its visual tokens are and
    which rows of the whole row's visual features (transformers' order) they take."""
    from qwenvl_mcore.models.qwen3_vl_moe.visual_scatter import VisualScatter

    flat = visual_mask.reshape(-1).bool().cpu()
    order = torch.cumsum(flat.long(), 0) - 1
    chunk = split.n // sp_size
    src = split.local_source(rank)[sp_rank * chunk:(sp_rank + 1) * chunk]
    visual = (src >= 0) & flat[src.clamp_min(0)]
    positions = visual.nonzero().squeeze(1)
    feature_rows = order[src[positions]]
    device = visual_mask.device if device is None else device
    return VisualScatter(positions.to(device, non_blocking=True), feature_rows.to(device, non_blocking=True))


def gather_row(local: torch.Tensor, split: RowSplit, group, *, dim: int = 0) -> torch.Tensor:
    """The ranks' slices (along `dim`) gathered over the CP group and put back in original row order ([.., s, ..]);
    backward: each rank keeps the gradient of its own slice."""
    moved = local.movedim(dim, 0)
    full = GatherRow.apply(moved, group)
    return split.unsplit(full, dim=0).movedim(0, dim)


def loss_token_count(batch, cp: int, rank: int, ignore_index: int = -100) -> int:
    """Loss tokens of `batch` on CP rank `rank` (all of them at cp == 1): what the per-token loss is divided by,
    summed over DP x CP by megatron's gradient finalization."""
    if cp == 1:
        return int((batch.labels != ignore_index).sum())
    batch = as_packed_row(batch)
    return local_token_count(batch.labels, batch.cu_seqlens, cp, rank, ignore_index)


# ------------------------------------------------------------------------------------------------------------------
# The ViT's work spread over the CP ranks
# ------------------------------------------------------------------------------------------------------------------


def vision_shares(grid_thw, cp: int, merge_unit: int = 4) -> list[dict]:
    """Cut the frames of the images / videos of `grid_thw` ([n, 3] rows (t, h, w)) into cp consecutive shares of
    about equal patch counts (the ViT's work; every frame is an independent attention segment, so a video may be
    cut between frames). Per rank: `patches` (start, end) rows of pixel_values, `grid` rows [[t, h, w], ...] of its
    share (a video's frames may be split over ranks), `features` (start, end) rows of the merged features."""
    grids = [(int(t), int(h), int(w)) for t, h, w in
             (grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw)]
    frames = [(i, h * w) for i, (t, h, w) in enumerate(grids) for _ in range(t)]
    total = sum(p for _, p in frames)
    shares, start, done = [], 0, 0
    cuts = []
    acc = 0
    for k, (_, p) in enumerate(frames):  # frame k goes to the rank whose range holds its midpoint
        cuts.append(min(cp - 1, (2 * acc + p) * cp // (2 * total)) if total else 0)
        acc += p
    for r in range(cp):
        mine = [k for k, c in enumerate(cuts) if c == r]
        grid: list[list[int]] = []
        patches = 0
        for k in mine:
            i, p = frames[k]
            _, h, w = grids[i]
            if grid and grid[-1][3] == i:
                grid[-1][0] += 1
            else:
                grid.append([1, h, w, i])
            patches += p
        shares.append({"patches": (start, start + patches), "grid": [g[:3] for g in grid],
                       "features": (done, done + patches // merge_unit)})
        start += patches
        done += patches // merge_unit
    return shares


class GatherShares(torch.autograd.Function):
    """Rows of every rank's share gathered in rank order ([sum of sizes, d]); backward: the gradient summed over
    the group (each rank used the features of its own slice), each rank keeping its share's rows."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, sizes: list[int], group):
        import torch.distributed as dist

        ctx.group, ctx.sizes, ctx.rank = group, sizes, dist.get_rank(group)
        most = max(sizes)
        padded = t.new_zeros((most, t.shape[1]))
        padded[:t.shape[0]] = t
        out = t.new_empty((len(sizes) * most, t.shape[1]))
        dist.all_gather_into_tensor(out, padded.contiguous(), group=group)
        return torch.cat([out[r * most:r * most + n] for r, n in enumerate(sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None


def spread_vision(vision, pixel_values: torch.Tensor, grid_thw: torch.Tensor, group):
    """vision(pixel_values, grid_thw) -> (merged, deepstack list), each CP rank of `group` encoding only its share
    of the frames (`vision_shares`) and the features gathered over the group; the same numbers as one call."""
    import torch.distributed as dist

    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    merge_unit = vision.merge_unit
    shares = vision_shares(grid_thw, cp, merge_unit)
    mine = shares[rank]
    a, b = mine["patches"]
    n_deep = len(vision.deepstack_visual_indexes)
    if b > a:
        grid = torch.tensor(mine["grid"], dtype=grid_thw.dtype, device=grid_thw.device)
        merged, deepstack = vision(pixel_values[a:b], grid)
        local = torch.cat([merged, *deepstack], dim=1)
    else:  # nothing to encode here: take part in the exchange with no rows
        width = vision.vision_args.out_hidden_size * (1 + n_deep)
        # requires grad exactly when the other ranks' features do (a trainable ViT or merger), so that this rank,
        # too, takes part in the backward's exchange, and no rank waits for it when the ViT is frozen
        trainable = torch.is_grad_enabled() and any(p.requires_grad for p in vision.parameters())
        local = torch.zeros((0, width), dtype=next(vision.parameters()).dtype, device=pixel_values.device,
                            requires_grad=trainable)
    sizes = [s["features"][1] - s["features"][0] for s in shares]
    full = GatherShares.apply(local, sizes, group)
    parts = full.chunk(1 + n_deep, dim=1)
    return parts[0], list(parts[1:])
