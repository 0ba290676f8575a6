"""Core attention: torch SDPA for whole sequences, and segment (variable-length) attention for packed LLM rows and
the ViT's per-frame segments.

A packed micro-batch row holds several samples, and a ViT micro-batch several images and video frames; attention
must stay inside each. `AttentionSegments` describes those segments and travels where megatron passes the attention
mask (megatron hands `attention_mask` to the core attention untouched). `SDPAttention` then runs, in order of
preference:

1. **varlen flash attention** (`torch.nn.attention.varlen.varlen_attn`) on CUDA in bf16/fp16: one kernel over the
   whole row in megatron's own [s, b=1, heads, dim] layout, no mask tensor, cost proportional to sum(L_i^2);
2. **segments grouped by length**: each group of equal-length segments is one batched SDPA call (flash on the GPU,
   math on the CPU). Exact on every device; this is the path the CPU tests check against a dense mask.

A dense block-diagonal mask (`AttentionSegments.dense_mask`) is kept only as the reference the tests compare with:
it costs s^2 memory per layer and falls back to SDPA's slower masked kernels.

The rotary embedding is applied here too, from cos/sin tables computed once per forward (`AttentionContext`):
megatron's attention would recompute them from the angles in every layer (six small kernels per layer and tensor).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.module import MegatronModule

from qwenvl_mcore.parallel.context_parallel import ContextParallelAttention


@dataclass(eq=False)
class AttentionSegments:
    """Segments of a sequence of s tokens (batch size 1) that attention must not cross.

    `cu_seqlens`: int32 [n + 1] boundaries on the compute device, 0 = cu[0] < ... < cu[n] = s (every token in
    exactly one segment); `lengths`: the same on the host. `causal`: causal inside each segment (LLM) or not (ViT).
    """

    cu_seqlens: torch.Tensor
    lengths: tuple[int, ...]
    causal: bool
    _dense: torch.Tensor | None = field(default=None, repr=False)
    _groups: list | None = field(default=None, repr=False)

    @classmethod
    def from_lengths(cls, lengths, *, causal: bool, device=None) -> "AttentionSegments":
        lengths = tuple(int(n) for n in lengths)
        if any(n <= 0 for n in lengths):
            raise ValueError(f"attention segments must be non-empty, got lengths {list(lengths)}")
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0).to(torch.int32)
        return cls(cu.to(device), lengths, causal)

    @classmethod
    def packed_row(cls, cu_seqlens: torch.Tensor, s: int, *, device=None) -> "AttentionSegments":
        """Causal segments of a packed LLM row: the samples of `cu_seqlens` (boundaries of the real tokens, which
        may end before s), then every padding token as a segment of its own, so padding attends only to itself (its
        softmax stays finite) and nothing real attends to it."""
        cu = [int(x) for x in cu_seqlens.tolist()]
        lengths = [b - a for a, b in zip(cu[:-1], cu[1:]) if b > a] + [1] * (s - cu[-1])
        return cls.from_lengths(lengths, causal=True, device=device)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths)

    def segment_ids(self) -> torch.Tensor:
        """Segment index of every token, [s] (long, on the device of cu_seqlens)."""
        lengths = torch.tensor(self.lengths, device=self.cu_seqlens.device)
        return torch.repeat_interleave(torch.arange(len(self.lengths), device=lengths.device), lengths)

    def length_groups(self) -> list[tuple[int, int, torch.Tensor]]:
        """(length n, number m of segments that long, their token rows [m * n] on the device), built once and
        shared by every layer that attends over these segments."""
        if self._groups is None:
            starts: dict[int, list[int]] = {}
            start = 0
            for n in self.lengths:
                starts.setdefault(n, []).append(start)
                start += n
            device = self.cu_seqlens.device
            self._groups = [(n, len(s), (torch.tensor(s, device=device)[:, None]
                                         + torch.arange(n, device=device)).reshape(-1))
                            for n, s in starts.items()]
        return self._groups

    def dense_mask(self) -> torch.Tensor:
        """Reference bool mask [1, 1, s, s], True = masked (megatron's convention); built once."""
        if self._dense is None:
            seg = self.segment_ids()
            allowed = seg[:, None] == seg[None, :]
            if self.causal:
                allowed &= torch.ones_like(allowed).tril()
            self._dense = ~allowed[None, None]
        return self._dense


class RotaryTables:
    """cos and sin of rotary angles [s, b or 1, 1, d] in the compute dtype, and their application to q or k
    [s, b, heads, d]: t * cos + rotate_half(t) * sin, megatron's unfused rotary (`rotary_interleaved=False`, the
    whole head dim rotated), bit for bit.

    rotate_half(t) * sin = cat(-x2, x1) * sin is computed as roll(t, d/2) * cat(-sin1, sin2): negation is exact,
    so the products are the same numbers, from 4 kernels per call (and 2 in backward) instead of 6 (and 4)."""

    def __init__(self, angles: torch.Tensor, dtype: torch.dtype):
        if angles.dim() != 4 or angles.shape[2] != 1:
            raise ValueError(f"rotary angles must be [s, b, 1, d], got {tuple(angles.shape)}")
        self.cos = torch.cos(angles).to(dtype)
        sin = torch.sin(angles).to(dtype)
        self.half = sin.shape[-1] // 2
        self.signed_sin = torch.cat((-sin[..., : self.half], sin[..., self.half:]), dim=-1)

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        if t.shape[-1] != self.cos.shape[-1]:
            raise ValueError(f"rotary tables of dim {self.cos.shape[-1]} for heads of dim {t.shape[-1]}")
        return t * self.cos + torch.roll(t, self.half, dims=-1) * self.signed_sin


@dataclass(eq=False)
class AttentionContext:
    """What every layer's core attention needs besides q, k and v, built once per forward and passed where megatron
    passes the attention mask (with megatron's own `rotary_pos_emb` left None).

    `mask`: None (causal or full, by the layer), `AttentionSegments`, a `ContextParallelAttention` (this rank's
    slice of a row split over the CP ranks, see parallel/context_parallel.py), or a bool mask (True = masked out);
    `rotary`: tables applied to q and k before attention (None: no rotary).
    """

    mask: "AttentionSegments | ContextParallelAttention | torch.Tensor | None" = None
    rotary: RotaryTables | None = None


class SegmentSelfAttention(SelfAttention):
    """megatron's SelfAttention, with selective recompute of the core attention done by `SDPAttention` itself:
    megatron's own recompute hands the attention mask to a checkpoint that saves only tensors, and ours travels as an
    `AttentionContext`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.core_attention.recompute = self.checkpoint_core_attention
        self.checkpoint_core_attention = False


@lru_cache(maxsize=1)
def _varlen_kernel():
    """(varlen_attn, its keyword names) when this torch has it, else None. Its arguments changed between torch
    releases (`is_causal` became `window_size`), so they are read from the signature."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def varlen_available(t: torch.Tensor) -> bool:
    """Whether `segment_attention` uses the flash varlen kernel for tensors like t."""
    return t.is_cuda and t.dtype in (torch.bfloat16, torch.float16) and _varlen_kernel() is not None


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: AttentionSegments, *,
                      scale: float | None = None, use_varlen: bool | None = None) -> torch.Tensor:
    """Attention of q [s, hq, d] over k, v [s, hkv, d] (hq a multiple of hkv) within `segments`: [s, hq, d].

    `use_varlen`: None picks the varlen kernel when available (see `varlen_available`); False forces the grouped
    SDPA path (the reference on the GPU).
    """
    s = q.shape[0]
    if segments.total != s:
        raise ValueError(f"attention segments cover {segments.total} tokens, the sequence has {s}")
    if use_varlen is None:
        use_varlen = varlen_available(q)
    if use_varlen:
        return _varlen(q, k, v, segments, scale)
    return _grouped_sdpa(q, k, v, segments, scale)


def _varlen(q, k, v, segments: AttentionSegments, scale):
    kernel, names = _varlen_kernel()
    kwargs = {"scale": scale}
    if "window_size" in names:
        kwargs["window_size"] = (-1, 0) if segments.causal else (-1, -1)
    elif "is_causal" in names:
        kwargs["is_causal"] = segments.causal
    elif segments.causal:
        raise RuntimeError("this torch's varlen_attn has neither window_size nor is_causal")
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in names:
            kwargs["enable_gqa"] = True
        else:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    cu, n = segments.cu_seqlens, segments.max_seqlen
    return kernel(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, n, n, **kwargs)


def _grouped_sdpa(q, k, v, segments: AttentionSegments, scale):
    """One batched SDPA call per distinct segment length (exact; any device)."""
    out = q.new_empty(q.shape)
    for n, m, rows in segments.length_groups():
        rows = rows.to(q.device)
        def gather(t):  # [m*n, h, d] -> [m, h, n, d]
            return t.index_select(0, rows).view(m, n, t.shape[1], t.shape[2]).transpose(1, 2)
        o = F.scaled_dot_product_attention(gather(q), gather(k), gather(v), is_causal=segments.causal and n > 1,
                                           scale=scale, enable_gqa=True)
        out = out.index_copy(0, rows, o.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2]))
    return out


class SDPAttention(MegatronModule):
    """megatron core attention on torch kernels (flash / efficient / varlen on the GPU, math on the CPU).

    Contract (megatron's): q [sq, b, np, hn], k/v [sk, b, ng, hn] (GQA groups expanded by the kernel), returns
    [sq, b, np*hn]. `attention_mask` is an `AttentionContext` (rotary tables applied to q and k first, then its
    mask) or directly a mask: None (causal for causal layers, full otherwise); an `AttentionSegments` (b == 1:
    packed samples / ViT frames, see `segment_attention`); or a bool tensor broadcastable to [b, np, sq, sk],
    True = masked out. Needs no CUDA RNG and no CUDA mask helper.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type="self", attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None, **_unused):
        super().__init__(config=config)
        from megatron.core.transformer.enums import AttnMaskType

        self.causal = attn_mask_type == AttnMaskType.causal
        self.softmax_scale = softmax_scale
        tp = config.tensor_model_parallel_size
        self.hidden_size_per_partition = config.kv_channels * config.num_attention_heads // tp
        self.recompute = False  # set by SegmentSelfAttention under selective recompute

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **_unused):
        if packed_seq_params is not None:
            raise ValueError("SDPAttention: packed sequences are passed as AttentionSegments, not packed_seq_params.")
        if self.recompute and self.training and torch.is_grad_enabled():
            from megatron.core import tensor_parallel

            def core_attention(q, k, v):  # megatron's checkpoint saves tensors only: the mask rides in the closure
                return self._attend(q, k, v, attention_mask)

            return tensor_parallel.checkpoint(core_attention, False, query, key, value)
        return self._attend(query, key, value, attention_mask)

    def _attend(self, query, key, value, attention_mask):
        sq, b = query.shape[0], query.shape[1]
        if isinstance(attention_mask, AttentionContext):
            if attention_mask.rotary is not None:
                query, key = attention_mask.rotary.apply(query), attention_mask.rotary.apply(key)
            attention_mask = attention_mask.mask
        if isinstance(attention_mask, ContextParallelAttention):  # this rank's slice of a row split over CP
            if b != 1:
                raise ValueError(f"context-parallel attention needs batch size 1, got {b}")
            out = attention_mask.attend(query[:, 0], key[:, 0], value[:, 0], scale=self.softmax_scale)
            return out.reshape(sq, 1, self.hidden_size_per_partition)
        if isinstance(attention_mask, AttentionSegments):
            if b != 1:
                raise ValueError(f"attention segments need batch size 1, got {b}")
            out = segment_attention(query[:, 0], key[:, 0], value[:, 0], attention_mask, scale=self.softmax_scale)
            return out.reshape(sq, 1, self.hidden_size_per_partition)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=self.softmax_scale,
                                                 enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, scale=self.softmax_scale,
                                                 enable_gqa=True)
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
