"""Rank functions of the context-parallel tests (tests/multirank/test_context_parallel.py)."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from qwenvl_mcore.models.qwen3_vl_moe.attention import AttentionSegments, segment_attention
from qwenvl_mcore.parallel.context_parallel import RowSplit

ATTENTION_ROWS = ([0, 13, 20, 21, 38], 45), ([0, 3, 40], 40), ([0], 12)


def attention_checks(rank: int, world: int) -> list[dict]:
    """CP attention over `world` gloo ranks (all-gather of K/V, reduce-scatter of dK/dV) against full-row segment
    attention on each rank: worst absolute differences of the output and of dq, dk, dv at the rank's positions."""
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    group = dist.new_group(list(range(world)))
    out = []
    for i, (cu, s) in enumerate(ATTENTION_ROWS):
        gen = torch.Generator().manual_seed(i)
        q, k, v = (torch.randn(s, h, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
        grad = torch.randn(s, 4, 8, generator=gen, dtype=torch.float64)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = segment_attention(*full, AttentionSegments.packed_row(torch.tensor(cu), s), scale=0.3)
        ref.backward(grad)
        split = RowSplit.build(cu, s, world, multiple=2)
        local = [split.take(t, rank, dim=0, fill=0.0).requires_grad_() for t in (q, k, v)]
        o = split.attention(rank, group).attend(*local, scale=0.3)
        o.backward(split.take(grad, rank, dim=0, fill=0.0))
        src = split.local_source(rank)
        real = src >= 0
        def worst(a, b):
            return float((a - b).abs().max()) if a.numel() else 0.0

        diffs = {"out": worst(o.detach()[real], ref.detach()[src[real]]), "real": int(real.sum())}
        for name, mine, theirs in zip(("dq", "dk", "dv"), local, full):
            diffs[name] = worst(mine.grad[real], theirs.grad[src[real]])
        diffs["padding_grad_zero"] = bool((local[1].grad[~real] == 0).all())
        out.append(diffs)
    dist.destroy_process_group()
    return out
