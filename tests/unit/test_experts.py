"""The experts' grouped GEMM (`torch.nn.functional.grouped_mm`, the GPU path) equals the per-expert loop, values and
gradients, on the CPU; the same comparison in bf16 on CUDA is in tools/bench/gpu_checks.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from qwenvl_mcore.models.qwen3_vl_moe.layers import GroupedExperts, expert_matmul, use_grouped_mm


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
