"""The pure layout transforms: exact inverses, the known layouts, and clear errors on shapes that fit neither."""

from __future__ import annotations

import pytest
import torch

from qwenvl_mcore.conversion import transforms as T


@pytest.mark.parametrize("heads, groups, d, extra", [(4, 2, 16, (48,)), (8, 8, 4, (32,)), (4, 2, 16, ())])
def test_qkv_round_trip_is_exact(heads, groups, d, extra):
    """qkv_from_mcore(qkv_to_mcore(q, k, v)) gives back q, k, v bit for bit (weights and biases)."""
    q, k, v = torch.randn(heads * d, *extra), torch.randn(groups * d, *extra), torch.randn(groups * d, *extra)
    fused = T.qkv_to_mcore(q, k, v, num_heads=heads, num_groups=groups, head_dim=d)
    per = heads // groups
    # group 0 holds its query heads, then its key, then its value
    assert torch.equal(fused[: per * d], q[: per * d])
    assert torch.equal(fused[per * d:(per + 1) * d], k[:d])
    back = T.qkv_from_mcore(fused, num_heads=heads, num_groups=groups, head_dim=d)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


def test_expert_layouts_convert_both_ways():
    """Released [E, h, 2F] and transformers-5 [E, 2F, h] map to the same weight1; export restores either."""
    e, h, f = 3, 5, 7
    released = torch.randn(e, h, 2 * f)
    tf5 = released.transpose(1, 2).contiguous()
    assert T.expert_layout_of(released, num_experts=e, hidden=h, ffn=f) == T.RELEASED
    assert T.expert_layout_of(tf5, num_experts=e, hidden=h, ffn=f) == T.TRANSFORMERS5
    w1 = T.gate_up_to_mcore(released, T.RELEASED)
    assert torch.equal(w1, T.gate_up_to_mcore(tf5, T.TRANSFORMERS5))
    assert torch.equal(w1[:, :, 0], released[:, :, :f])  # gate = first half
    assert torch.equal(T.gate_up_from_mcore(w1, T.RELEASED), released)
    assert torch.equal(T.gate_up_from_mcore(w1, T.TRANSFORMERS5), tf5)
    down = torch.randn(e, f, h)
    assert torch.equal(T.down_from_mcore(T.down_to_mcore(down.transpose(1, 2), T.TRANSFORMERS5)), down)


def test_expert_shape_errors_name_the_problem():
    """A gate_up that fits neither layout, or both (hidden == 2F), is refused with a message saying why."""
    with pytest.raises(T.LayoutMismatch, match="fits neither"):
        T.expert_layout_of(torch.zeros(3, 5, 9), num_experts=3, hidden=5, ffn=7)
    with pytest.raises(T.LayoutMismatch, match="cannot be told"):
        T.expert_layout_of(torch.zeros(3, 8, 8), num_experts=3, hidden=8, ffn=4)
