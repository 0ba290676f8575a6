"""The experts' grouped GEMM (`torch.nn.functional.grouped_mm`, the GPU path) equals the per-expert loop, values and
gradients, on the CPU; the same comparison in bf16 on CUDA is in tools/bench/gpu_checks.py. Also the contract the
EP=1 dispatcher relies on (layers.ExpertGroups): rows past the counts go to the last expert, device counts are read
on the host never (grouped GEMM) or once per call (loop)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from qwenvl_mcore.models.qwen3_vl_moe.layers import GroupedExperts, expert_matmul, use_grouped_mm
from qwenvl_mcore.testing.host_reads import HostReads


def _counts(total: int, experts: int, g: torch.Generator, empty: tuple[int, ...] = ()) -> torch.Tensor:
    weights = torch.rand(experts, generator=g)
    weights[list(empty)] = 0
    counts = torch.floor(weights / weights.sum() * total).long()
    counts[int(torch.argmax(weights))] += total - int(counts.sum())
    return counts


@pytest.mark.parametrize("total,empty", [(37, (1, 4)), (64, ()), (0, (0, 1, 2, 3, 4, 5))])
def test_grouped_matmul_equals_loop(total, empty):
    g = torch.Generator().manual_seed(total)
    experts, k, n = 6, 16, 24
    counts = _counts(total, experts, g, empty) if total else torch.zeros(experts, dtype=torch.long)
    assert int(counts.sum()) == total and all(int(counts[e]) == 0 for e in empty)
    x = torch.randn(total, k, generator=g, requires_grad=True)
    w = torch.randn(experts, k, n, generator=g, requires_grad=True)
    got = expert_matmul(x, w, counts, grouped=True)
    want = expert_matmul(x, w, counts, grouped=False)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    if total == 0:
        return
    grad = torch.randn(got.shape, generator=g)
    for a, b in zip(torch.autograd.grad(got, (x, w), grad), torch.autograd.grad(want, (x, w), grad)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    # the loop itself is the plain per-expert product
    start = 0
    for e, c in enumerate(counts.tolist()):
        torch.testing.assert_close(want[start:start + c], x[start:start + c] @ w[e])
        start += c


class _Group(SimpleNamespace):
    def size(self):
        return 1

    def rank(self):
        return 0


def _experts(num_experts: int, hidden: int, ffn: int) -> GroupedExperts:
    config = SimpleNamespace(
        moe_ffn_hidden_size=ffn, hidden_size=hidden, use_cpu_initialization=True, params_dtype=torch.float32,
        perform_initialization=True, init_method=lambda t: torch.nn.init.normal_(t, std=0.2),
        output_layer_init_method=lambda t: torch.nn.init.normal_(t, std=0.2), activation_func=F.silu,
    )
    groups = SimpleNamespace(ep=_Group(), expt_tp=_Group(), expt_dp=_Group())
    return GroupedExperts(num_experts, config, pg_collection=groups)


def test_grouped_experts_layer_equals_loop_and_reference():
    """The whole SwiGLU experts layer (gate/up fused weight, down, routing-weight scale) gives the same output and
    gradients with the grouped GEMM and with the loop, and both equal transformers' per-expert formula."""
    torch.manual_seed(0)
    layer = _experts(num_experts=5, hidden=16, ffn=8)
    counts = torch.tensor([3, 0, 7, 1, 4])
    hidden = torch.randn(15, 16, requires_grad=True)
    probs = torch.rand(15)
    outs, grads = [], []
    for grouped in (True, False):
        layer.grouped_gemm = grouped
        out, bias = layer(hidden, counts, probs)
        assert bias is None
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), (hidden, layer.weight1, layer.weight2)))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    start, want = 0, []
    for e, c in enumerate(counts.tolist()):
        x = hidden[start:start + c]
        gate, up = x @ layer.weight1[e, :, 0], x @ layer.weight1[e, :, 1]
        want.append((F.silu(gate) * up) @ layer.weight2[e] * probs[start:start + c, None])
        start += c
    torch.testing.assert_close(outs[0], torch.cat(want), rtol=1e-6, atol=1e-6)


def test_grouped_gemm_default_is_cuda_bf16_only():
    assert not use_grouped_mm(torch.zeros(2, 2, dtype=torch.bfloat16))
    assert not use_grouped_mm(torch.zeros(2, 2))


@pytest.mark.parametrize("extra", [0, 5])
def test_rows_past_the_counts_go_to_the_last_expert(extra):
    """ExpertGroups: rows after sum(counts) (the local dispatcher's padding) run with the last expert, the same in
    the grouped GEMM and the loop, values and gradients; the offsets are int32 on the rows' device and end at all
    rows."""
    from qwenvl_mcore.models.qwen3_vl_moe.layers import ExpertGroups

    g = torch.Generator().manual_seed(10 + extra)
    counts = torch.tensor([4, 0, 3, 2, 0])
    rows = int(counts.sum()) + extra
    x = torch.randn(rows, 16, generator=g, requires_grad=True)
    w = torch.randn(5, 16, 8, generator=g, requires_grad=True)
    groups = ExpertGroups(counts, rows)
    assert groups.offsets(x.device).dtype == torch.int32
    assert groups.offsets(x.device).tolist() == [4, 4, 7, 9, rows]
    assert groups.sizes() == [4, 0, 3, 2, extra]
    got = expert_matmul(x, w, groups, grouped=True)
    want = expert_matmul(x, w, counts, grouped=False)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(want[9:], x[9:] @ w[4])
    grad = torch.randn(got.shape, generator=g)
    for a, b in zip(torch.autograd.grad(got, (x, w), grad), torch.autograd.grad(want, (x, w), grad)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_counts_that_exceed_the_rows_are_refused():
    from qwenvl_mcore.models.qwen3_vl_moe.layers import ExpertGroups

    with pytest.raises(ValueError, match="do not fit 3 rows"):
        ExpertGroups(torch.tensor([2, 2]), 3).sizes()


@pytest.mark.parametrize("grouped,reads", [(True, 0), (False, 1)])
def test_experts_read_device_counts_at_most_once(grouped, reads):
    """The experts layer with counts as a tensor (on the device from the local dispatcher): the grouped GEMM never
    reads them on the host, the loop once per call (both projections share it); rows past the counts have
    probability 0, so their outputs are 0 and they add nothing to the weight gradients."""
    torch.manual_seed(1)
    layer = _experts(num_experts=4, hidden=16, ffn=8)
    layer.grouped_gemm = grouped
    counts = torch.tensor([3, 0, 5, 2])
    hidden = torch.randn(13, 16, requires_grad=True)
    probs = torch.cat([torch.rand(10), torch.zeros(3)])
    mode = HostReads()
    with mode:
        out, _ = layer(hidden, counts, probs)
    assert len(mode.reads) == reads
    assert bool((out[10:] == 0).all())
    g1, g2, gx = torch.autograd.grad(out.square().sum(), (layer.weight1, layer.weight2, hidden))
    layer.grouped_gemm = False
    ref, _ = layer(hidden[:10], counts, probs[:10])
    r1, r2 = torch.autograd.grad(ref.square().sum(), (layer.weight1, layer.weight2))
    torch.testing.assert_close(out[:10], ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g1, r1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g2, r2, rtol=1e-6, atol=1e-6)
    assert bool((gx[10:] == 0).all())
