"""Segment attention (packed LLM rows, ViT frames) equals attention under the dense block-diagonal mask, forward
and backward, with grouped-query heads; the GPU's varlen kernel is checked against the same reference by
tools/bench/gpu_checks.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenvl_mcore.models.qwen3_vl_moe.attention import AttentionSegments, segment_attention, varlen_available


def _dense_reference(q, k, v, segments):
    """SDPA over the whole sequence with the dense mask: q [s, hq, d] -> [s, hq, d]."""
    qb, kb, vb = (t.transpose(0, 1)[None] for t in (q, k, v))
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=~segments.dense_mask(), enable_gqa=True)
    return out[0].transpose(0, 1)


@pytest.mark.parametrize("causal,lengths", [
    (True, [5, 3, 5, 1, 1, 1]),   # packed row: samples of equal and different lengths, then padding singletons
    (True, [16]),                 # one sample
    (False, [4, 4, 4, 12, 8]),    # ViT: three frames of one video, two images
])
def test_segments_equal_dense_mask_forward_and_backward(causal, lengths):
    g = torch.Generator().manual_seed(len(lengths))
    s, hq, hkv, d = sum(lengths), 4, 2, 8
    q, k, v = (torch.randn(s, h, d, generator=g, dtype=torch.float64, requires_grad=True)
               for h in (hq, hkv, hkv))
    segments = AttentionSegments.from_lengths(lengths, causal=causal)
    got = segment_attention(q, k, v, segments)
    grad = torch.randn(got.shape, generator=g, dtype=torch.float64)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    want = _dense_reference(q, k, v, segments)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # and each segment alone is plain (causal) attention over that segment
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        alone = F.scaled_dot_product_attention(q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1),
                                               is_causal=causal, enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(got[sl], alone, rtol=1e-12, atol=1e-12)
        start += n


def test_segments_validate_their_cover():
    segments = AttentionSegments.from_lengths([3, 2], causal=True)
    assert segments.cu_seqlens.tolist() == [0, 3, 5] and segments.total == 5 and segments.max_seqlen == 3
    q = torch.zeros(6, 2, 4)
    with pytest.raises(ValueError, match="cover 5 tokens, the sequence has 6"):
        segment_attention(q, q, q, segments)
    with pytest.raises(ValueError, match="non-empty"):
        AttentionSegments.from_lengths([3, 0], causal=True)


def test_varlen_kernel_is_gpu_only():
    """The CPU always takes the exact grouped path (CI checks it); varlen needs CUDA and bf16/fp16."""
    assert not varlen_available(torch.zeros(2, 2, 2, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_tables_equal_megatrons_rotary(dtype):
    """Rotary applied from tables computed once (AttentionContext) is bit-identical to megatron's unfused rotary,
    which recomputes cos/sin in every layer."""
    from qwenvl_mcore.models.qwen3_vl_moe.attention import RotaryTables
    from qwenvl_mcore.models.qwen3_vl_moe.rope import apply_rotary

    g = torch.Generator().manual_seed(3)
    angles = torch.randn(9, 1, 1, 16, generator=g) * 40
    t = torch.randn(9, 1, 4, 16, generator=g).to(dtype)
    grad = torch.randn(9, 1, 4, 16, generator=g).to(dtype)
    ours, theirs = t.clone().requires_grad_(), t.clone().requires_grad_()
    out = RotaryTables(angles, dtype).apply(ours)
    assert torch.equal(out, apply_rotary(theirs, angles))
    out.backward(grad)
    apply_rotary(theirs, angles).backward(grad)
    assert torch.equal(ours.grad, theirs.grad)
