"""Router statistics stay on the device until the step reads them (routing.RoutingStats.aux_loss_total and
layer_counts): the same numbers as the host-side aux_losses / per-layer sums, with no host read."""

from __future__ import annotations

import torch

from qwenvl_mcore.models.qwen3_vl_moe.routing import RoutingStats
from qwenvl_mcore.testing.host_reads import HostReads


def _stats(num_experts: int = 4) -> RoutingStats:
    g = torch.Generator().manual_seed(3)
    stats = RoutingStats(num_experts)
    for mb, tokens in enumerate([5, 0, 7]):  # micro-batch 1 is all padding: no aux value
        record = stats.for_microbatch(mb)
        for layer in (1, 2):
            counts = torch.randint(0, 2 * tokens + 1, (num_experts,), generator=g) if tokens else \
                torch.zeros(num_experts, dtype=torch.long)
            probs = torch.rand(num_experts, generator=g) * tokens
            record.record(layer, counts, probs, torch.tensor(tokens))
        record.publish([1, 2])
    return stats


def test_aux_loss_total_equals_the_host_values_without_a_read():
    stats = _stats()
    mode = HostReads()
    with mode:
        total = stats.aux_loss_total()
    assert len(mode.reads) == 0
    values = stats.aux_losses()
    assert len(values) == 2
    value_sum, count = total.tolist()
    assert count == 2.0
    assert abs(value_sum - sum(values)) <= 1e-15 * abs(sum(values))


def test_aux_loss_total_of_no_microbatch_is_zero():
    assert RoutingStats(4).aux_loss_total().tolist() == [0.0, 0.0]


def test_layer_counts_sum_the_microbatches_on_the_device():
    stats = _stats()
    mode = HostReads()
    with mode:
        counts = stats.layer_counts(3, device=torch.device("cpu"))
    assert len(mode.reads) == 0
    assert counts.dtype == torch.float64 and counts.shape == (3, 4)
    for layer in (1, 2):
        want = sum(mb.layers[layer][0].double() for mb in stats.micro.values())
        assert torch.equal(counts[layer - 1], want)
    assert torch.equal(counts[2], torch.zeros(4, dtype=torch.float64))
