"""Context parallelism's pure parts: the split of a packed row over CP ranks (round trip, load balance, positions,
fixed length) and the attention blocks of each rank against full-row segment attention (no process group)."""

from __future__ import annotations

import random

import pytest
import torch

from qwenvl_mcore.models.qwen3_vl_moe.attention import AttentionSegments, segment_attention
from qwenvl_mcore.parallel.context_parallel import RowSplit, chunk_owner, local_token_count, split_length

ROWS = [  # (cu_seqlens, s): odd samples, samples shorter than 2*cp, one-token samples, no padding, all padding
    ([0, 13, 20, 21, 38], 45),
    ([0, 7, 9, 31], 31),
    ([0, 1, 2, 3], 10),
    ([0], 9),
    ([0, 64], 64),
]


def _random_rows(count=20, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        lengths = [rng.randint(1, 23) for _ in range(rng.randint(1, 6))]
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        rows.append((cu, cu[-1] + rng.randint(0, 9)))
    return rows


@pytest.mark.parametrize("cp", [2, 3, 4])
@pytest.mark.parametrize("multiple", [1, 2])
def test_split_round_trip_and_fixed_length(cp, multiple):
    """Every original position sits in exactly one slot; the split row's length depends only on s; unsplit of the
    ranks' slices in rank order gives the row back."""
    for cu, s in ROWS + _random_rows():
        split = RowSplit.build(cu, s, cp, multiple)
        assert split.length == split_length(s, cp, multiple) and split.n % multiple == 0
        assert split.length >= s and split.length - s < cp * multiple
        real = split.source[split.source >= 0]
        assert sorted(real.tolist()) == list(range(s))
        row = torch.arange(100, 100 + s)
        parts = torch.cat([split.take(row, r, dim=0, fill=-7) for r in range(cp)])
        assert torch.equal(split.unsplit(parts, dim=0), row)
        assert int((parts == -7).sum()) == split.length - s


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_load_balance_chunks(cp):
    """Each sample is cut into 2*cp chunks differing by at most one token; rank r holds chunks r and 2*cp-1-r;
    the ranks' real tokens differ by at most one over the row; padding follows the samples on every rank."""
    for cu, s in ROWS + _random_rows(seed=1):
        split = RowSplit.build(cu, s, cp)
        held = []
        for r in range(cp):
            src = split.local_source(r).tolist()
            n_real = sum(1 for x in src if 0 <= x < cu[-1])
            assert all(not (0 <= x < cu[-1]) for x in src[n_real:])  # samples first, then padding
            held.append(n_real)
        assert max(held) - min(held) <= 1, (cu, held)
        assert [start for start, _ in split.chunks] == [a for a, b in zip(cu[:-1], cu[1:]) if b > a]
        for start, chunks in split.chunks:
            L = next(b - a for a, b in zip(cu[:-1], cu[1:]) if a == start)
            assert len(chunks) == 2 * cp and sum(size for _, size in chunks) == L
            sizes = [size for _, size in chunks]
            assert max(sizes) - min(sizes) <= 1, (L, sizes)
            for k, (c0, size) in enumerate(chunks):
                assert c0 == sum(sizes[:k])
                r = chunk_owner(k, cp)
                mine = set(split.local_source(r).tolist())
                assert set(range(start + c0, start + c0 + size)) <= mine


def test_position_ids_per_rank_are_the_full_row_ids():
    """Any [3, 1, s] tensor taken for a rank equals the full row at that rank's original positions."""
    cu, s = [0, 13, 20, 21, 38], 45
    pos = torch.randint(0, 50, (3, 1, s))
    for cp in (2, 4):
        split = RowSplit.build(cu, s, cp, multiple=2)
        for r in range(cp):
            src = split.local_source(r)
            local = split.take(pos, r, dim=2, fill=0)
            assert torch.equal(local[..., src >= 0], pos[..., src[src >= 0]])
            assert bool((local[..., src < 0] == 0).all())


def test_local_token_counts_sum_to_the_row():
    cu, s = [0, 13, 20, 21, 38], 45
    labels = torch.randint(0, 5, (1, s))
    labels[labels == 0] = -100
    labels[:, 38:] = -100
    for cp in (2, 3, 4):
        counts = [local_token_count(labels, cu, cp, r) for r in range(cp)]
        assert sum(counts) == int((labels != -100).sum())


@pytest.mark.parametrize("cp", [2, 4])
def test_rank_blocks_equal_full_row_attention(cp):
    """Each rank's attention over the gathered split row equals full-row segment attention (causal inside every
    sample, padding alone) at that rank's positions, GQA included; gradients through the blocks too."""
    torch.manual_seed(0)
    for cu, s in ROWS + _random_rows(6, seed=2):
        q, k, v = torch.randn(s, 4, 8, dtype=torch.float64), torch.randn(s, 2, 8, dtype=torch.float64), \
            torch.randn(s, 2, 8, dtype=torch.float64)
        ref = segment_attention(q, k, v, AttentionSegments.packed_row(torch.tensor(cu), s), scale=0.3)
        split = RowSplit.build(cu, s, cp, multiple=2)
        k_row = torch.cat([split.take(k, r, dim=0, fill=0.0) for r in range(cp)]).requires_grad_()
        v_row = torch.cat([split.take(v, r, dim=0, fill=0.0) for r in range(cp)]).requires_grad_()
        outs = []
        for r in range(cp):
            attn = split.attention(r, group=None)
            outs.append(attn.attend_gathered(split.take(q, r, dim=0, fill=0.0), k_row, v_row, scale=0.3))
        out = split.unsplit(torch.cat(outs), dim=0)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        # backward: gradient w.r.t. the full row's k equals the reference's (added padding slots get none)
        kk = k.clone().requires_grad_()
        grad = torch.randn_like(ref)
        segment_attention(q, kk, v, AttentionSegments.packed_row(torch.tensor(cu), s), scale=0.3).backward(grad)
        out.backward(grad)
        torch.testing.assert_close(split.unsplit(k_row.grad, dim=0), kk.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_vision_shares_cover_the_frames_in_order_and_balance(cp):
    """The ViT's shares: consecutive patch ranges covering every patch once, whole frames (a video may be cut
    between frames), grid rows that add up to the frames of the original rows, feature ranges of patches / 4, and
    patch counts within one frame of the even share."""
    from qwenvl_mcore.parallel.context_parallel import vision_shares

    for grid in ([[1, 4, 6]], [[1, 4, 6], [4, 8, 8], [1, 2, 2]], [[8, 4, 4]], [[1, 16, 16], [2, 4, 4], [3, 2, 6]]):
        shares = vision_shares(torch.tensor(grid), cp)
        total = sum(t * h * w for t, h, w in grid)
        assert shares[0]["patches"][0] == 0 and shares[-1]["patches"][1] == total
        assert all(a["patches"][1] == b["patches"][0] for a, b in zip(shares, shares[1:]))
        for s in shares:
            assert s["patches"][1] - s["patches"][0] == sum(t * h * w for t, h, w in s["grid"])
            assert s["features"][1] - s["features"][0] == (s["patches"][1] - s["patches"][0]) // 4
        frames = [(h, w) for t, h, w in grid for _ in range(t)]
        assert [(h, w) for s in shares for t, h, w in s["grid"] for _ in range(t)] == frames
        biggest = max(h * w for h, w in frames)
        assert all(abs((s["patches"][1] - s["patches"][0]) - total / cp) <= biggest for s in shares), shares


def test_rows_the_split_takes_and_refuses():
    """A packed row is taken as is; one unpacked right-padded row becomes a packed row of one sample; several rows
    or left padding are refused naming the fix."""
    from qwenvl_mcore.models.qwen3_vl_moe.model import MultimodalInputs
    from qwenvl_mcore.parallel.context_parallel import as_packed_row

    ids = torch.arange(10).unsqueeze(0)
    row = as_packed_row(MultimodalInputs(input_ids=ids, attention_mask=(ids < 7).long()))
    assert row.cu_seqlens.tolist() == [0, 7]
    assert as_packed_row(MultimodalInputs(input_ids=ids)).cu_seqlens.tolist() == [0, 10]
    packed = MultimodalInputs(input_ids=ids, cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32))
    assert as_packed_row(packed) is packed
    with pytest.raises(ValueError, match="data.packing"):
        as_packed_row(MultimodalInputs(input_ids=torch.zeros(2, 10, dtype=torch.long)))
    with pytest.raises(ValueError, match="right padding"):
        as_packed_row(MultimodalInputs(input_ids=ids, attention_mask=(ids >= 3).long()))
