"""Rotary position embeddings of Qwen3-VL MoE, in megatron-core's layout.

Everything here is plain torch (no megatron parallel state, no CUDA calls) and reproduces the numbers of the
transformers reference (``transformers/models/qwen3_vl_moe/modeling_qwen3_vl_moe.py``):

* :func:`get_rope_index` / :func:`position_ids_for_sample` -- the 3-axis (t, h, w) MRoPE position ids of the
  language model, equal to transformers' ``Qwen3VLMoeModel.get_rope_index``; :func:`packed_position_ids` -- the
  same for a packed row, each sample as if alone.
* :class:`MRotaryEmbedding` -- the language model's rotation angles with *interleaved* MRoPE frequency slots
  (T, H, W, T, H, W, ...), laid out as megatron's ``rotary_pos_emb`` (``[s, b, 1, head_dim]``).
* :class:`VisionRotaryEmbedding` / :func:`vision_rotary_angles` -- the ViT's axial 2D rotation angles,
  ``[num_patches, 1, 1, head_dim]``, in the patch order of the vision tower (2x2 merge blocks contiguous).
* :func:`apply_rotary` -- applies angles to q/k exactly like megatron's unfused ``apply_rotary_pos_emb``.

Layout contract of an *angles* tensor (what megatron calls ``rotary_pos_emb`` / ``freqs``)
------------------------------------------------------------------------------------------
``angles[..., j]`` is the rotation angle of channel ``j``; the last dim is ``cat(f, f)`` where ``f`` holds one
angle per frequency slot (``head_dim // 2`` of them).  A rotary application computes
``t * cos(angles) + rotate_half(t) * sin(angles)`` with the non-interleaved ``rotate_half``
(``[x1, x2] -> [-x2, x1]``, i.e. megatron ``rotary_interleaved=False``, transformers' ``rotate_half``).
Angles are always float32; cos/sin are cast to the dtype of the rotated tensor by the application, as in both
megatron and transformers' text path.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "get_rope_index",
    "position_ids_for_sample",
    "packed_position_ids",
    "split_video_grids_per_frame",
    "MRotaryEmbedding",
    "mrope_slot_axes",
    "VisionRotaryEmbedding",
    "vision_patch_positions",
    "vision_rotary_angles",
    "to_device",
    "apply_rotary",
]

# Modality codes, as transformers' ``mm_token_type_ids`` (text 0, image 1, video 2).
_TEXT, _IMAGE, _VIDEO = 0, 1, 2
_KIND_NAME = {_IMAGE: "image", _VIDEO: "video frame"}

Grid = tuple[int, int, int]
GridLike = Tensor | Sequence[Sequence[int]] | None


# ------------------------------------------------------------------------------------------------------------------
# Position ids (language model)
# ------------------------------------------------------------------------------------------------------------------


def _grid_rows(grid_thw: GridLike, name: str) -> list[Grid]:
    """Turn a ``[n, 3]`` grid tensor / nested sequence into a list of int triples (validated)."""
    if grid_thw is None:
        return []
    rows = grid_thw.tolist() if isinstance(grid_thw, Tensor) else [list(r) for r in grid_thw]
    out: list[Grid] = []
    for i, row in enumerate(rows):
        if len(row) != 3:
            raise ValueError(f"{name}[{i}] must be a (t, h, w) triple, got {row!r}")
        t, h, w = (int(v) for v in row)
        if t < 1 or h < 1 or w < 1:
            raise ValueError(f"{name}[{i}] = {(t, h, w)} has a non-positive size")
        out.append((t, h, w))
    return out


def split_video_grids_per_frame(video_grid_thw: GridLike) -> list[Grid]:
    """One ``(1, h, w)`` grid per (temporally merged) video frame, videos in order.

    Qwen3-VL separates the frames of a video by timestamp text, so each frame is its own vision block in the
    token sequence (transformers does ``repeat_interleave(grid, grid[:, 0])`` and sets ``t = 1``).
    """
    frames: list[Grid] = []
    for t, h, w in _grid_rows(video_grid_thw, "video_grid_thw"):
        frames.extend([(1, h, w)] * t)
    return frames


def _grid_positions(start: int, t: int, gh: int, gw: int, device: torch.device) -> Tensor:
    """Positions ``[3, t*gh*gw]`` of one vision block: (t, h, w) grid coordinates plus ``start``, row-major."""
    n_hw = gh * gw
    pos_t = torch.arange(t, device=device).repeat_interleave(n_hw)
    pos_h = torch.arange(gh, device=device).repeat_interleave(gw).repeat(t)
    pos_w = torch.arange(gw, device=device).repeat(t * gh)
    return torch.stack((pos_t, pos_h, pos_w)) + start


def _sample_positions(
    ids: Tensor,
    image_grids: Sequence[Grid],
    frame_grids: Sequence[Grid],
    *,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
    spatial_merge_size: int,
    where: str,
) -> tuple[Tensor, int, int]:
    """Positions ``[3, n]`` (int64) of one unpadded token sequence ``ids`` ``[n]``.

    Consumes grids from the front of ``image_grids`` / ``frame_grids`` (one per contiguous run of image /
    video placeholder tokens) and returns how many of each it used.
    """
    device = ids.device
    n = ids.numel()
    if n == 0:
        return torch.zeros(3, 0, dtype=torch.long, device=device), 0, 0

    kinds = torch.zeros(n, dtype=torch.long, device=device)
    kinds[ids == image_token_id] = _IMAGE
    kinds[ids == video_token_id] = _VIDEO
    # Runs of equal modality: [start, end) boundaries.
    change = torch.nonzero(kinds[1:] != kinds[:-1]).flatten() + 1
    starts = torch.cat((change.new_zeros(1), change))
    bounds = starts.tolist() + [n]
    run_kinds = kinds[starts].tolist()
    # Token right before each run (to check that every vision run opens with <|vision_start|>).
    prev_tok = torch.where(starts > 0, ids[(starts - 1).clamp_min(0)], ids.new_full((), -1)).tolist()

    m = spatial_merge_size
    pieces: list[Tensor] = []
    cur = 0
    used = {_IMAGE: 0, _VIDEO: 0}
    grids = {_IMAGE: image_grids, _VIDEO: frame_grids}
    for r, kind in enumerate(run_kinds):
        s, e = bounds[r], bounds[r + 1]
        length = e - s
        if kind == _TEXT:
            # Text advances all three axes together.
            pieces.append(torch.arange(cur, cur + length, device=device).expand(3, -1))
            cur += length
            continue
        name = _KIND_NAME[kind]
        k = used[kind]
        if k >= len(grids[kind]):
            raise ValueError(
                f"{where}: {name} placeholder run #{k} (tokens {s}:{e}) has no grid left "
                f"({len(grids[kind])} {name} grid(s) given)"
            )
        t, h, w = grids[kind][k]
        used[kind] = k + 1
        if h % m or w % m:
            raise ValueError(f"{where}: {name} grid {(t, h, w)} is not divisible by spatial_merge_size {m}")
        gh, gw = h // m, w // m
        if t * gh * gw != length:
            raise ValueError(
                f"{where}: {name} placeholder run at tokens {s}:{e} has {length} tokens but its grid {(t, h, w)} "
                f"gives {t * gh * gw} (= t*h*w/{m * m})"
            )
        if prev_tok[r] != vision_start_token_id:
            raise ValueError(
                f"{where}: {name} placeholder run at tokens {s}:{e} is not preceded by <|vision_start|> "
                f"(id {vision_start_token_id}); got {prev_tok[r]}"
            )
        pieces.append(_grid_positions(cur, t, gh, gw, device))
        # Next text starts after the largest spatial extent of the block (transformers' rule; t is ignored).
        cur += max(h, w) // m
    return torch.cat(pieces, dim=1), used[_IMAGE], used[_VIDEO]


def position_ids_for_sample(
    input_ids: Tensor,
    image_grid_thw: GridLike = None,
    video_grid_thw: GridLike = None,
    *,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
    spatial_merge_size: int,
) -> Tensor:
    """MRoPE position ids ``LongTensor [3, s]`` of ONE unpadded sample ``input_ids [s]``.

    ``image_grid_thw`` / ``video_grid_thw`` (``[n, 3]``, in patches, as the processor returns them) must be exactly
    this sample's images / videos, in order; every grid must be used.  Positions: text tokens advance (t, h, w)
    together by 1; each image block takes ``(t, h, w)`` grid coordinates (merged by ``spatial_merge_size``)
    offset by the running position, after which the running position advances by ``max(h, w) // merge``; a video
    is one such block per frame (temporal grid 1 each, frames separated by timestamp text).  Identical to the
    corresponding row of transformers' ``get_rope_index``.  The MRoPE delta of the sample is
    ``pos.max() + 1 - s``.  Raises ``ValueError`` on a placeholder / grid mismatch.
    """
    if input_ids.dim() == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids[0]
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be [s] (or [1, s]), got shape {tuple(input_ids.shape)}")
    image_grids = _grid_rows(image_grid_thw, "image_grid_thw")
    frame_grids = split_video_grids_per_frame(video_grid_thw)
    pos, n_img, n_frm = _sample_positions(
        input_ids,
        image_grids,
        frame_grids,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        vision_start_token_id=vision_start_token_id,
        spatial_merge_size=spatial_merge_size,
        where="sample",
    )
    _check_all_used(n_img, len(image_grids), n_frm, len(frame_grids))
    return pos


def packed_position_ids(
    input_ids: Tensor,
    cu_seqlens: Tensor | Sequence[int],
    image_grid_thw: GridLike = None,
    video_grid_thw: GridLike = None,
    *,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
    spatial_merge_size: int,
) -> Tensor:
    """MRoPE position ids ``[3, 1, s]`` of ONE packed row ``input_ids`` ``[1, s]`` (or ``[s]``).

    Sample ``i`` is ``input_ids[cu_seqlens[i]:cu_seqlens[i + 1]]`` and gets the positions it would get alone
    (:func:`position_ids_for_sample`), so every sample starts again at 0.  Grids are consumed in sample order (all
    images of sample 0, then of sample 1, ...; likewise videos) and must all be used.  Tokens from ``cu_seqlens[-1]``
    on (padding) get position 0, as padding does in :func:`get_rope_index`; nothing attends to them.  The dtype is
    that of ``input_ids``.
    """
    row = input_ids[0] if input_ids.dim() == 2 and input_ids.shape[0] == 1 else input_ids
    if row.dim() != 1:
        raise ValueError(f"a packed row must be [1, s] (or [s]), got shape {tuple(input_ids.shape)}")
    bounds = [int(b) for b in (cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else cu_seqlens)]
    if not bounds or bounds[0] != 0 or any(b > e for b, e in zip(bounds, bounds[1:])) or bounds[-1] > row.numel():
        raise ValueError(f"cu_seqlens must rise from 0 to at most {row.numel()}, got {bounds}")
    out = torch.zeros(3, 1, row.numel(), dtype=row.dtype, device=row.device)
    segments = [(start, end) for start, end in zip(bounds, bounds[1:])]
    positions = _positions_of_rows(
        [row[start:end] for start, end in segments], image_grid_thw, video_grid_thw,
        [f"packed sample {i} (tokens {start}:{end})" for i, (start, end) in enumerate(segments)],
        image_token_id=image_token_id, video_token_id=video_token_id,
        vision_start_token_id=vision_start_token_id, spatial_merge_size=spatial_merge_size)
    for (start, end), pos in zip(segments, positions):
        out[:, 0, start:end] = pos.to(out.dtype)
    return out


def _positions_of_rows(rows: list[Tensor], image_grid_thw: GridLike, video_grid_thw: GridLike, names: list[str], *,
                       image_token_id: int, video_token_id: int, vision_start_token_id: int,
                       spatial_merge_size: int) -> list[Tensor]:
    """MRoPE positions [3, len(row)] of each row of real tokens, each as if alone; grids consumed in row order and
    all of them used (``names`` say where a mismatch is)."""
    image_grids = _grid_rows(image_grid_thw, "image_grid_thw")
    frame_grids = split_video_grids_per_frame(video_grid_thw)
    out = []
    next_img = next_frm = 0
    for ids, name in zip(rows, names):
        pos, n_img, n_frm = _sample_positions(
            ids, image_grids[next_img:], frame_grids[next_frm:], image_token_id=image_token_id,
            video_token_id=video_token_id, vision_start_token_id=vision_start_token_id,
            spatial_merge_size=spatial_merge_size, where=name)
        next_img += n_img
        next_frm += n_frm
        out.append(pos)
    _check_all_used(next_img, len(image_grids), next_frm, len(frame_grids))
    return out


def _check_all_used(n_img: int, total_img: int, n_frm: int, total_frm: int) -> None:
    if n_img != total_img:
        raise ValueError(f"{total_img} image grid(s) given but only {n_img} image placeholder run(s) found")
    if n_frm != total_frm:
        raise ValueError(f"{total_frm} video frame grid(s) given but only {n_frm} video placeholder run(s) found")


def get_rope_index(
    input_ids: Tensor,
    image_grid_thw: GridLike = None,
    video_grid_thw: GridLike = None,
    attention_mask: Tensor | None = None,
    *,
    image_token_id: int,
    video_token_id: int,
    vision_start_token_id: int,
    spatial_merge_size: int,
) -> tuple[Tensor, Tensor]:
    """MRoPE position ids of a batch: ``(position_ids [3, b, s], mrope_position_deltas [b, 1])``.

    Same values as transformers' ``Qwen3VLMoeModel.get_rope_index`` (5.x; the modality of a token is decided by
    ``image_token_id`` / ``video_token_id``, as the processor's ``mm_token_type_ids`` do).  Grids are consumed in
    batch order (all images of sample 0, then sample 1, ...; likewise videos).  With ``attention_mask``
    (``[b, s]``, 1 = real token) positions run over the attended tokens only (left or right padding); padded
    positions are 0 and the delta is ``max_pos + 1 - num_attended``.  ``position_ids`` has the dtype of
    ``input_ids``; deltas are int64; both on ``input_ids.device``.  Unlike transformers, a mismatch between
    placeholder runs and grids (missing, surplus, wrong token count, no ``<|vision_start|>`` before a run) raises
    ``ValueError`` instead of failing obscurely or being ignored.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [b, s], got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    b, s = input_ids.shape
    device = input_ids.device
    masks = [attention_mask[i].bool() if attention_mask is not None else None for i in range(b)]
    rows = [input_ids[i] if masks[i] is None else input_ids[i][masks[i]] for i in range(b)]
    positions = _positions_of_rows(
        rows, image_grid_thw, video_grid_thw, [f"batch row {i}" for i in range(b)], image_token_id=image_token_id,
        video_token_id=video_token_id, vision_start_token_id=vision_start_token_id,
        spatial_merge_size=spatial_merge_size)
    position_ids = torch.zeros(3, b, s, dtype=input_ids.dtype, device=device)
    deltas: list[int] = []
    for i, (ids, mask, pos) in enumerate(zip(rows, masks, positions)):
        if mask is None:
            position_ids[:, i] = pos.to(position_ids.dtype)
        else:
            position_ids[:, i, mask] = pos.to(position_ids.dtype)
        # An empty row (fully masked) gets delta 0; transformers would fail on it.
        deltas.append(int(pos.max()) + 1 - ids.numel() if ids.numel() else 0)
    mrope_position_deltas = torch.tensor(deltas, dtype=torch.long, device=device).unsqueeze(1)
    return position_ids, mrope_position_deltas


# ------------------------------------------------------------------------------------------------------------------
# Language-model rotary angles (interleaved MRoPE)
# ------------------------------------------------------------------------------------------------------------------


def _rope_inv_freq(dim: int, theta: float) -> Tensor:
    """``1 / theta^(2i/dim)``, i < dim/2, float32 on the CPU -- the exact expression transformers uses."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))


def mrope_slot_axes(head_dim: int, mrope_section: Sequence[int], interleaved: bool = True) -> Tensor:
    """Which position axis (0 = t, 1 = h, 2 = w) drives each of the ``head_dim // 2`` frequency slots.

    Interleaved (Qwen3-VL): slot ``j`` uses h if ``j % 3 == 1 and j < 3 * section[1]``, w if
    ``j % 3 == 2 and j < 3 * section[2]``, else t -- i.e. T,H,W,T,H,W,... then T for the tail ([24, 20, 20]:
    60 cycling slots then 4 T slots).  Contiguous (Qwen2-VL / megatron ``MultimodalRotaryEmbedding``): the
    first ``section[0]`` slots use t, the next ``section[1]`` h, the last ``section[2]`` w.
    """
    half = head_dim // 2
    sections = [int(x) for x in mrope_section]
    if len(sections) != 3 or any(x < 0 for x in sections):
        raise ValueError(f"mrope_section must be 3 non-negative ints (t, h, w), got {list(mrope_section)!r}")
    if sum(sections) != half:
        raise ValueError(f"mrope_section {sections} must sum to head_dim // 2 = {half}")
    j = torch.arange(half)
    if interleaved:
        axes = torch.zeros(half, dtype=torch.long)
        axes[(j % 3 == 1) & (j < 3 * sections[1])] = 1
        axes[(j % 3 == 2) & (j < 3 * sections[2])] = 2
        return axes
    return torch.repeat_interleave(torch.arange(3), torch.tensor(sections))


class _Float32InvFreq(nn.Module):
    """Keeps a float32 ``inv_freq`` buffer float32 when the module is cast (``.bfloat16()``, ``.half()``, ...)."""

    inv_freq: Tensor

    def _init_inv_freq(self, inv_freq: Tensor) -> None:
        self._inv_freq_master = inv_freq  # CPU float32 master copy (not a buffer: never cast, never saved)
        self.register_buffer("inv_freq", inv_freq.clone(), persistent=False)

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = self._inv_freq_master.to(self.inv_freq.device)
        return self


class MRotaryEmbedding(_Float32InvFreq):
    """Text rotary angles of Qwen3-VL with interleaved MRoPE, in megatron's ``rotary_pos_emb`` layout.

    ``forward(position_ids [3, b, s])`` (int, any device; ``[b, s]`` is broadcast to the 3 axes) returns float32
    angles ``[s, b, 1, head_dim]`` = ``cat(f, f)`` with ``f[..., j] = position_ids[axis(j)] * inv_freq[j]``
    (``axis`` from :func:`mrope_slot_axes`).  ``cos``/``sin`` of it, permuted to ``[b, s, head_dim]``, equal
    transformers' ``Qwen3VLMoeTextRotaryEmbedding`` output; feed it to megatron attention with
    ``rotary_interleaved=False`` (or to :func:`apply_rotary`).  Only the default rope type (no scaling,
    attention factor 1) is supported.
    """

    def __init__(
        self,
        head_dim: int,
        rope_theta: float,
        mrope_section: Sequence[int],
        interleaved: bool = True,
    ) -> None:
        super().__init__()
        if head_dim <= 0 or head_dim % 2:
            raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
        self.head_dim = int(head_dim)
        self.rope_theta = rope_theta
        self.mrope_section = tuple(int(x) for x in mrope_section)
        self.interleaved = bool(interleaved)
        self._init_inv_freq(_rope_inv_freq(self.head_dim, rope_theta))
        self.register_buffer(
            "slot_axes", mrope_slot_axes(self.head_dim, self.mrope_section, self.interleaved), persistent=False
        )

    def forward(self, position_ids: Tensor) -> Tensor:
        if position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        if position_ids.dim() != 3 or position_ids.shape[0] != 3:
            raise ValueError(f"position_ids must be [3, b, s] (or [b, s]), got shape {tuple(position_ids.shape)}")
        device = position_ids.device
        inv_freq = self.inv_freq.to(device=device, dtype=torch.float32)
        axes = self.slot_axes.to(device)
        # [3, b, s] -> [s, b, 3] -> per-slot position [s, b, head_dim/2]
        pos = position_ids.permute(2, 1, 0).float().index_select(-1, axes)
        freqs = pos * inv_freq
        return torch.cat((freqs, freqs), dim=-1).unsqueeze(2)

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, rope_theta={self.rope_theta}, mrope_section={list(self.mrope_section)}, "
            f"interleaved={self.interleaved}"
        )


# ------------------------------------------------------------------------------------------------------------------
# Vision rotary angles (axial 2D)
# ------------------------------------------------------------------------------------------------------------------


def to_device(t: Tensor, device: torch.device | str | None) -> Tensor:
    """`t` (built on the host) on `device`: an asynchronous copy (`non_blocking`), so the host does not wait for
    the device's queue; the copy is staged at once, so `t` may be freed or reused right after."""
    if device is None or torch.device(device) == t.device:
        return t
    return t.to(device, non_blocking=True)


@lru_cache(maxsize=4096)
def _frame_patch_positions(h: int, w: int, m: int) -> Tensor:
    """(row, col) of the h*w patches of one frame in the vision tower's patch order, [h*w, 2] long on the host
    (cached per frame size: read-only)."""
    if h % m or w % m:
        raise ValueError(f"grid (h={h}, w={w}) is not divisible by spatial_merge_size {m}")
    blk_h = torch.arange(h // m).view(-1, 1, 1, 1) * m
    blk_w = torch.arange(w // m).view(1, -1, 1, 1) * m
    in_h = torch.arange(m).view(1, 1, -1, 1)
    in_w = torch.arange(m).view(1, 1, 1, -1)
    shape = (h // m, w // m, m, m)
    return torch.stack(((blk_h + in_h).expand(shape).reshape(-1), (blk_w + in_w).expand(shape).reshape(-1)), -1)


def vision_patch_positions(grid_thw: GridLike, spatial_merge_size: int, device: torch.device | None = None) -> Tensor:
    """``LongTensor [num_patches, 2]`` of (h, w) patch coordinates in the vision tower's patch order.

    Per image / video (in order), per frame: the ``merge x merge`` blocks in row-major block order, and inside a
    block its patches row-major -- the order in which the processor emits patches, so that the merger can fold
    each 2x2 block into one token.  Frames of a video repeat the same coordinates.

    ``grid_thw``: a ``[n, 3]`` tensor or a list of (t, h, w); a grid on the host (a list or a CPU tensor) is read
    without a device sync. The table is built on the host and copied to ``device`` (default: the grid tensor's
    device, else the CPU) without waiting (see :func:`to_device`).
    """
    if device is None:
        device = grid_thw.device if isinstance(grid_thw, Tensor) else torch.device("cpu")
    m = spatial_merge_size
    frames = [_frame_patch_positions(h, w, m) for t, h, w in _grid_rows(grid_thw, "grid_thw") for _ in range(t)]
    if not frames:
        return torch.zeros(0, 2, dtype=torch.long, device=device)
    return to_device(torch.cat(frames), device)


class VisionRotaryEmbedding(_Float32InvFreq):
    """Axial 2D rotary angles of the Qwen3-VL ViT, in megatron layout.

    One set of ``head_dim // 4`` frequencies (``1 / theta^(2i / (head_dim/2))``) is shared by the h and w
    coordinates: ``f = cat(h * inv_freq, w * inv_freq)`` (``head_dim // 2`` slots) and the angles are
    ``cat(f, f)`` over the whole head dim (no partial rotary).  ``forward(grid_thw)`` returns float32
    ``[num_patches, 1, 1, head_dim]`` in :func:`vision_patch_positions` order, so that rotating q/k of shape
    ``[num_patches, 1, heads, head_dim]`` with :func:`apply_rotary` (``compute_dtype=torch.float32``, as the
    reference upcasts) reproduces transformers' ``apply_rotary_pos_emb_vision``.
    """

    def __init__(self, head_dim: int, spatial_merge_size: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim <= 0 or head_dim % 4:
            raise ValueError(f"vision head_dim must be a positive multiple of 4, got {head_dim}")
        self.head_dim = int(head_dim)
        self.spatial_merge_size = int(spatial_merge_size)
        self.theta = theta
        self._init_inv_freq(_rope_inv_freq(self.head_dim // 2, theta))

    def forward(self, grid_thw: GridLike, device: torch.device | None = None) -> Tensor:
        if device is None:
            device = grid_thw.device if isinstance(grid_thw, Tensor) else self.inv_freq.device
        pos = vision_patch_positions(grid_thw, self.spatial_merge_size, device=device)
        inv_freq = self.inv_freq.to(device=device, dtype=torch.float32)
        freqs = pos.float().unsqueeze(-1) * inv_freq  # [n, 2, head_dim/4]
        half = freqs.flatten(1)  # cat(h * inv_freq, w * inv_freq): [n, head_dim/2]
        return torch.cat((half, half), dim=-1)[:, None, None, :]

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, spatial_merge_size={self.spatial_merge_size}, theta={self.theta}"


def vision_rotary_angles(
    grid_thw: GridLike, *, head_dim: int, spatial_merge_size: int, theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Functional form of :class:`VisionRotaryEmbedding`: float32 ``[num_patches, 1, 1, head_dim]`` on ``device``
    (default: the grid tensor's device, else the CPU). The patch positions and frequencies are made on the host and
    copied without waiting; the angles are computed on ``device``, the same products as the module's."""
    if device is None:
        device = grid_thw.device if isinstance(grid_thw, Tensor) else torch.device("cpu")
    pos = vision_patch_positions(grid_thw, spatial_merge_size, device=device)
    inv_freq = to_device(_vision_inv_freq(int(head_dim), float(theta)), device)
    freqs = pos.float().unsqueeze(-1) * inv_freq  # [n, 2, head_dim/4]
    half = freqs.flatten(1)  # cat(h * inv_freq, w * inv_freq): [n, head_dim/2]
    return torch.cat((half, half), dim=-1)[:, None, None, :]


@lru_cache(maxsize=16)
def _vision_inv_freq(head_dim: int, theta: float) -> Tensor:
    if head_dim <= 0 or head_dim % 4:
        raise ValueError(f"vision head_dim must be a positive multiple of 4, got {head_dim}")
    return _rope_inv_freq(head_dim // 2, theta)


# ------------------------------------------------------------------------------------------------------------------
# Application
# ------------------------------------------------------------------------------------------------------------------

_megatron_bshd = None


def _megatron_apply_bshd():
    global _megatron_bshd
    if _megatron_bshd is None:  # imported lazily: megatron.core takes seconds to import
        from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

        _megatron_bshd = _apply_rotary_pos_emb_bshd
    return _megatron_bshd


def apply_rotary(t: Tensor, angles: Tensor, *, compute_dtype: torch.dtype | None = None) -> Tensor:
    """Rotate ``t`` by ``angles`` with megatron-core's unfused rotary path (``rotary_interleaved=False``).

    Layouts: ``t`` is ``[s, b, heads, d]`` with ``angles`` ``[s, b or 1, 1, d_rot]`` (sbhd), or packed
    ``[T, heads, d]`` with ``angles`` ``[T, 1, 1, d_rot]`` holding one row per packed token (thd; equal to
    megatron's thd path when the angles cover the whole packed batch, cp=1).  Channels ``d_rot:`` pass through.
    The result is ``t * cos(angles) + rotate_half(t) * sin(angles)`` with cos/sin cast to the compute dtype.
    ``compute_dtype`` (e.g. float32 for the ViT, as transformers upcasts there) rotates in that dtype and casts
    back; default: the dtype of ``t`` (the language model's behaviour in both frameworks).

    This calls megatron's ``_apply_rotary_pos_emb_bshd`` -- what ``apply_rotary_pos_emb`` routes to with
    ``config.apply_rope_fusion=False`` and no ``cu_seqlens``.  The public function is not called because it needs a
    ``TransformerConfig`` and, without an explicit ``cp_group``, asks ``parallel_state`` for the context-parallel
    group (an assertion error when parallel state is not initialised); the math itself is pure torch, no CUDA.
    """
    if angles.dim() != 4 or angles.shape[2] != 1:
        raise ValueError(f"angles must be [s, b, 1, d], got shape {tuple(angles.shape)}")
    if angles.shape[-1] > t.shape[-1]:
        raise ValueError(f"angles dim {angles.shape[-1]} > head dim {t.shape[-1]}")
    packed = t.dim() == 3
    if packed:
        t = t.unsqueeze(1)
    if t.dim() != 4 or t.shape[0] != angles.shape[0]:
        raise ValueError(f"t must be [s, b, h, d] or [T, h, d] matching angles {tuple(angles.shape)}")
    orig_dtype = t.dtype
    if compute_dtype is not None:
        t = t.to(compute_dtype)
    out = _megatron_apply_bshd()(t, angles, rotary_interleaved=False)
    out = out.to(orig_dtype)
    return out.squeeze(1) if packed else out
