"""`VisualScatter` places visual features by host-built row indices; it must equal boolean-mask indexing (the
plain formulation) exactly, in values and gradients, on every sequence-parallel slice."""

from __future__ import annotations

import pytest
import torch

from qwenvl_mcore.models.qwen3_vl_moe.language import VisualScatter


def _reference(hidden, features, mask_local_sb, order_local_sb, accumulate):
    """hidden [s, b, h]; the visual rows selected by a boolean mask, written (or added) in place of a copy."""
    out = hidden.clone()
    rows = features[order_local_sb[mask_local_sb]]
    if accumulate:
        out[mask_local_sb] = out[mask_local_sb] + rows
    else:
        out[mask_local_sb] = rows
    return out


@pytest.mark.parametrize("sp_size", [1, 2, 4])
@pytest.mark.parametrize("accumulate", [False, True])
def test_visual_scatter_equals_boolean_indexing(sp_size, accumulate):
    g = torch.Generator().manual_seed(7)
    b, s, h = 2, 16, 5
    mask = torch.rand(b, s, generator=g) < 0.4
    mask[0, 3:7] = True  # a run of visual tokens crossing slices
    n = int(mask.sum())
    order = (torch.cumsum(mask.reshape(-1).long(), 0) - 1).reshape(b, s).transpose(0, 1)  # [s, b]
    features = torch.randn(n, h, generator=g, dtype=torch.float64)
    chunk = s // sp_size
    covered = 0
    for rank in range(sp_size):
        hidden = torch.randn(chunk, b, h, generator=g, dtype=torch.float64)
        grad = torch.randn(chunk, b, h, generator=g, dtype=torch.float64)
        local = slice(rank * chunk, (rank + 1) * chunk)
        mask_local = mask.transpose(0, 1)[local]
        scatter = VisualScatter.from_mask(mask, sp_rank=rank, sp_size=sp_size)
        assert scatter.positions.numel() == int(mask_local.sum())
        covered += scatter.positions.numel()

        ours_h, ours_f = hidden.clone().requires_grad_(), features.clone().requires_grad_()
        ref_h, ref_f = hidden.clone().requires_grad_(), features.clone().requires_grad_()
        out = (scatter.add if accumulate else scatter.replace)(ours_h, ours_f)
        ref = _reference(ref_h, ref_f, mask_local, order[local], accumulate)
        assert torch.equal(out, ref)
        out.backward(grad)
        ref.backward(grad)
        assert torch.equal(ours_h.grad, ref_h.grad)
        assert torch.equal(ours_f.grad, ref_f.grad)
        assert ours_f.grad.abs().sum() > 0 or not mask_local.any()
    assert covered == n  # the slices together place every feature once


def test_visual_scatter_moves_indices_to_the_given_device():
    mask = torch.tensor([[False, True, True, False]])
    scatter = VisualScatter.from_mask(mask, device=torch.device("meta"))
    assert scatter.positions.device.type == "meta" and scatter.feature_rows.device.type == "meta"
